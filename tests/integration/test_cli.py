"""End-to-end CLI on a finished tiny run: resume, invalidation, gates, and every kind of bad input (exit 2)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from core.config import ModelConfig
from core.models import build_model
from core.rundir import sha256
from export import tensorrt
from pipeline.cli import main
from stages import PIPELINE
from tests.conftest import REPO, tiny_config, write_config
from tests.report_checks import check_numbers


def cli(*args: str) -> int:
    with pytest.raises(SystemExit) as exit_info:
        main(list(args))
    return exit_info.value.code


def snapshot(run_dir: Path) -> dict[str, str]:
    """Hashes of every file of a run directory except the append-only logs."""
    return {str(p.relative_to(run_dir)): sha256(p) for p in sorted(run_dir.rglob("*"))
            if p.is_file() and p.name not in ("log.txt", "metrics.jsonl")}


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("finished")
    config = write_config(root / "tiny.yaml", tiny_config())
    assert cli("pipeline", str(config), "--run-dir", str(root / "run")) == 0
    return config, root / "run"


def test_finished_run_has_the_contract(finished):
    _, run = finished
    summary = json.loads((run / "summary.json").read_text())
    for key in ("name", "model", "base", "compressed", "delta_pct", "latency_ms", "parity", "artifacts", "gates"):
        assert key in summary
    assert summary["compressed"]["gflops"] < summary["base"]["gflops"]
    assert summary["compressed"]["params_m"] < summary["base"]["params_m"]
    # export.tensorrt.mode and validate.runtime default to auto: the engine where TensorRT and a GPU exist
    expected = "tensorrt" if tensorrt.unavailable_reason() is None else "onnxruntime-cpu"
    assert summary["latency_ms"]["backend"] == expected and summary["latency_ms"]["batch"] == 1
    assert summary["gates"] == {"passed": True, "failures": []}
    lat = summary["latency_ms"]
    assert lat["speedup_low"] <= lat["speedup"] <= lat["speedup_high"] and lat["blocks"] == 5
    assert lat["threads"] >= 1 and lat["device"]
    assert summary["targets"]["flops_reduction"]["met"] is True
    art = summary["artifacts"]
    if tensorrt.unavailable_reason() is None:
        assert art["tensorrt_status"] == "built" and (run / art["tensorrt"]).is_file()
    else:  # export.tensorrt.mode defaults to auto: skipped, with the reason where CI keeps it
        assert art["tensorrt"] is None and art["tensorrt_status"] == "skipped"
        assert tensorrt.unavailable_reason() in art["tensorrt_reason"]
        assert not (run / "model.engine").exists()
    manifest = json.loads((run / "manifest.json").read_text())
    assert [s["status"] for s in manifest["stages"].values()] == ["done"] * len(PIPELINE)
    dynamics = torch.load(run / "03_filter_prune" / "checkpoint.pt", weights_only=True)["state"]["dynamics"]
    assert dynamics[0]["step"] == 0 and all({"params_m", "gflops", "top1", "top5"} <= d.keys() for d in dynamics)
    assert manifest["stages"]["filter_prune"]["metrics"]["graph_builds"] == len(dynamics) - 1


def test_log_has_one_line_per_step_decision_and_epoch(finished):
    """Off a terminal (CI, nohup) the log still says what happens, with figures rounded for humans."""
    import re

    _, run = finished
    log = (run / "log.txt").read_text()
    dynamics = torch.load(run / "03_filter_prune" / "checkpoint.pt", weights_only=True)["state"]["dynamics"]
    decisions = torch.load(run / "04_layer_truncate" / "checkpoint.pt", weights_only=True)["state"]["decisions"]
    steps = re.findall(r"filter_prune step (\d+)/\d+: GMACs [\d.]+ \([-+][\d.]+%\), target -\d+% MACs, params [\d.]+M, "
                       r"top-1 [\d.]+ ", log)
    assert [int(s) for s in steps] == [d["step"] for d in dynamics[1:]]
    assert len(re.findall(r"layer_truncate decision \d+: ", log)) == len(decisions) >= 1
    assert re.search(r"finetune epoch 1/1: loss [\d.]+, top-1 [\d.]+", log)
    assert re.search(r"train epoch 1/1: loss [\d.]+, top-1 [\d.]+", log)
    assert not re.search(r"\d\.\d{6,}", log), "numbers in the log are rounded for humans"


def test_missed_target_warns_and_its_gate_exits_3(finished, tmp_path: Path, capsys):
    config, run = finished
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    assert cli("pipeline", str(config), "--run-dir", str(copy), "--set", "filter_prune.steps=1") == 0
    err = " ".join(capsys.readouterr().err.split())
    summary = json.loads((copy / "summary.json").read_text())
    target = summary["targets"]["flops_reduction"]
    assert target["requested"] == 0.5 and target["met"] is False and target["achieved"] < 0.5
    assert target["stop_reason"] == "took all 1 step (filter_prune.steps)"
    assert "WARNING target flops_reduction 0.5 was NOT met" in (copy / "log.txt").read_text()
    assert "WARNING: target flops_reduction 0.5 was not met" in err and "MISSED" in err
    assert "Target flops_reduction 0.5: **MISSED**" in (copy / "report.md").read_text()
    assert cli("pipeline", str(config), "--run-dir", str(copy), "--set", "filter_prune.steps=1",
               "--set", "validate.gates.min_flops_reduction=0.7") == 3
    assert "min_flops_reduction" in json.loads((copy / "summary.json").read_text())["gates"]["failures"][0]


def test_rerun_reuses_every_stage(finished, capsys):
    config, run = finished
    before = snapshot(run)
    assert cli("pipeline", str(config), "--run-dir", str(run)) == 0
    assert capsys.readouterr().err.count("reused") == len(PIPELINE)
    after = snapshot(run)
    assert {k: v for k, v in after.items() if k != "manifest.json"} == \
        {k: v for k, v in before.items() if k != "manifest.json"}


def test_config_change_invalidates_that_stage_and_later(finished, tmp_path: Path, capsys):
    config, run = finished
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    assert cli("pipeline", str(config), "--run-dir", str(copy), "--set", "finetune.lr=0.02") == 0
    err = capsys.readouterr().err
    for stage in ("load", "train", "calibrate", "filter_prune", "layer_truncate"):
        assert f"{stage}: reused" in err
    assert "finetune: re-runs: config changed (finetune)" in err
    for stage in ("export", "validate"):
        assert f"{stage}: re-runs: upstream stage finetune re-runs" in err


@pytest.mark.parametrize("gate, value", [("min_speedup", "50"), ("max_latency_ms", "0.000001"),
                                         ("max_parity_error", "1e-15")])
def test_failed_gate_exits_3_and_keeps_artifacts(finished, tmp_path: Path, capsys, gate: str, value: str):
    config, run = finished
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    code = cli("pipeline", str(config), "--run-dir", str(copy), "--set", f"validate.gates.{gate}={value}")
    assert code == 3
    summary = json.loads((copy / "summary.json").read_text())
    assert summary["gates"]["passed"] is False and len(summary["gates"]["failures"]) == 1
    assert gate in summary["gates"]["failures"][0]
    assert (copy / "model.onnx").is_file()
    err = " ".join(capsys.readouterr().err.split())
    assert "validation gates failed" in err and gate in err
    for stage in ("filter_prune", "export"):
        assert f"{stage}: reused" in err, "a gate change re-runs validate only"
    report = (copy / "report.md").read_text()
    assert "Status: **gates failed**" in report and summary["gates"]["failures"][0] in report


def test_tensorrt_required_without_tensorrt_exits_2_with_the_install_hint(finished, capsys):
    if tensorrt.unavailable_reason() is None:
        pytest.skip("TensorRT and a GPU are available here")
    config, run = finished
    before = snapshot(run)
    assert cli("pipeline", str(config), "--run-dir", str(run), "--set", "export.tensorrt.mode=required") == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "export.tensorrt.mode is 'required' but" in err and "pip install 'idap-compress[gpu]'" in err
    assert snapshot(run) == before


def test_validate_verb_gates_and_input_checks(finished, tmp_path: Path, capsys):
    config, run = finished
    onnx_path, base = run / "model.onnx", run / "07_validate" / "base.onnx"
    out = tmp_path / "v.json"
    code = cli("validate", str(onnx_path), "--config", str(config), "--base", str(base), "--output", str(out),
               "--set", "validate.gates.min_speedup=50")
    assert code == 3
    result = json.loads(out.read_text())
    assert result["gates"]["passed"] is False and "min_speedup" in result["gates"]["failures"][0]
    assert "max_parity_error: no PyTorch model to compare with" in result["gates"]["unchecked"]
    capsys.readouterr()
    assert cli("validate", str(onnx_path), "--config", str(config), "--set", "model.input_size=[64,64]") == 2
    assert "takes inputs of shape 1x32x32 but the config's model gives 1x64x64" in capsys.readouterr().err
    assert cli("validate", str(onnx_path), "--config", str(config), "--runtime", "tensorrt") == 2
    assert "runs .engine files" in capsys.readouterr().err


def test_export_verb_errors_leave_the_run_alone(finished, tmp_path: Path, capsys):
    _, run = finished
    before = snapshot(run)
    assert cli("export", str(run), "--format", "tflite") == 2
    assert "Choose one of: onnx, tensorrt" in capsys.readouterr().err
    assert cli("export", str(tmp_path), "--format", "onnx") == 2
    assert "is not a run directory" in capsys.readouterr().err
    if tensorrt.unavailable_reason() is not None:
        assert cli("export", str(run), "--format", "tensorrt") == 2
        assert "pip install 'idap-compress[gpu]'" in " ".join(capsys.readouterr().err.split())
    assert snapshot(run) == before


def test_until_stops_and_dry_run_plans(finished, tmp_path: Path, capsys):
    config, _ = finished
    run = tmp_path / "run"
    assert cli("pipeline", str(config), "--run-dir", str(run), "--until", "calibrate") == 0
    manifest = json.loads((run / "manifest.json").read_text())
    assert list(manifest["stages"]) == ["load", "train", "calibrate"]
    assert "Status: **stopped** after stage `calibrate`; `filter_prune` and later have not run" in \
        (run / "report.md").read_text()
    capsys.readouterr()
    assert cli("pipeline", str(config), "--run-dir", str(run), "--dry-run") == 0
    out = capsys.readouterr().err
    assert "calibrate" in out and "reused" in out and "first run" in out


def test_resnet50_example_dry_run_prints_the_plan(capsys, tmp_path: Path):
    import torchvision

    weights = tmp_path / "w.pt"
    torch.save(torchvision.models.resnet50(num_classes=2).state_dict(), weights)
    for cls in ("cat", "dog"):
        (tmp_path / "images" / "train" / cls).mkdir(parents=True)
    code = cli("pipeline", str(REPO / "configs" / "resnet50.yaml"), "--dry-run", "--run-dir", str(tmp_path / "r"),
               "--set", f"data.root={tmp_path / 'images'}", "--set", f"model.weights={weights}",
               "--set", "model.num_classes=2")
    out = capsys.readouterr().err
    assert code == 0, out
    assert all(s in out for s in ("load", "filter_prune", "validate")) and "config is valid" in out
    assert "prunable groups" in out and "truncation candidates" in out, "the dry run runs the pre-flight check"


def _other_arch_weights(tmp_path: Path) -> str:
    path = tmp_path / "resnet34.pt"
    torch.save(build_model(ModelConfig(source="timm", name="resnet34", num_classes=4, in_chans=1)).state_dict(), path)
    return str(path)


BAD_INPUTS = {
    "malformed_yaml": (lambda tmp, cfg: _write_raw(tmp, "name: tiny\nmodel: [unclosed\n"), [], "malformed YAML"),
    "unknown_key": (lambda tmp, cfg: write_config(tmp / "c.yaml", tiny_config(finetune={"epoch": 1})), [],
                    "Did you mean 'max_epochs'"),
    "out_of_range": (lambda tmp, cfg: cfg, ["--set", "filter_prune.target_flops_reduction=1.5"], "less than 1"),
    "missing_dataset_root": (lambda tmp, cfg: cfg, ["--set", "data.kind=cifar10", "--set", "data.root=/nonexistent/x"],
                             "data.root '/nonexistent/x' does not exist"),
    "unknown_model": (lambda tmp, cfg: cfg, ["--set", "model.name=resnet-18"], "Did you mean 'resnet18'"),
    "weights_of_other_arch": (lambda tmp, cfg: cfg, ["--set", "model.weights={weights}"], "does not fit timm:resnet18"),
    "from_unknown_stage": (lambda tmp, cfg: cfg, ["--from", "finetuning"], "Did you mean 'finetune'"),
    "tensorrt_runtime_without_engine": (lambda tmp, cfg: cfg, ["--set", "validate.runtime=tensorrt", "--set",
                                       "export.tensorrt.mode=off"], "no engine is built"),
    "unknown_criterion": (lambda tmp, cfg: cfg, ["--set", "filter_prune.criterion=tayler"], "Did you mean 'taylor'"),
}


def _write_raw(tmp: Path, text: str) -> Path:
    (tmp / "raw.yaml").write_text(text)
    return tmp / "raw.yaml"


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_exits_2_and_alters_nothing(finished, tmp_path: Path, capsys, case: str):
    config, run = finished
    make, extra, expected = BAD_INPUTS[case]
    extra = [a.replace("{weights}", _other_arch_weights(tmp_path)) if "{weights}" in a else a for a in extra]
    before = snapshot(run)
    code = cli("pipeline", str(make(tmp_path, config)), "--run-dir", str(run), *extra)
    err = capsys.readouterr().err
    assert code == 2, err
    assert expected in " ".join(err.split()), err
    assert snapshot(run) == before


def test_corrupted_checkpoint_is_reported_then_recomputed_with_from(finished, tmp_path: Path, capsys):
    config, run = finished
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    ckpt = copy / "02_calibrate" / "checkpoint.pt"
    data = bytearray(ckpt.read_bytes())
    data[len(data) // 2] ^= 0xFF
    ckpt.write_bytes(bytes(data))
    before = snapshot(copy)
    assert cli("pipeline", str(config), "--run-dir", str(copy)) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "02_calibrate/checkpoint.pt" in err and "--from calibrate" in err
    assert snapshot(copy) == before
    assert cli("pipeline", str(config), "--run-dir", str(copy), "--from", "calibrate") == 0
    assert sha256(ckpt) == sha256(run / "02_calibrate" / "checkpoint.pt"), "recomputed checkpoint is identical"


def test_downstream_reruns_when_an_upstream_checkpoint_changed(finished, tmp_path: Path, capsys):
    """A re-run upstream stage whose output differs makes later finished stages stale, even with equal configs."""
    config, run = finished
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    # as if finetune had been recomputed (e.g. --from finetune, killed before export) with another result
    (copy / "05_finetune" / "result.json").write_text("changed")
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["stages"]["finetune"]["files"]["05_finetune/result.json"] = sha256(copy / "05_finetune" / "result.json")
    (copy / "manifest.json").write_text(json.dumps(manifest))
    assert cli("pipeline", str(config), "--run-dir", str(copy)) == 0
    err = " ".join(capsys.readouterr().err.split())
    assert "finetune: reused" in err
    assert "export: re-runs: an upstream checkpoint changed after it ran" in err


def test_metrics_jsonl_and_tensorboard_record_the_same_values(finished, tmp_path: Path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from core.metrics import read_metrics

    config, run = finished
    rows = read_metrics(run)
    assert {r["stage"] for r in rows} == set(PIPELINE)
    names = {r["name"] for r in rows}
    assert {"prune/gflops", "prune/top1", "recovery/loss", "truncate/divergence", "stage/seconds"} <= names
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    assert cli("pipeline", str(config), "--run-dir", str(copy), "--from", "finetune",
               "--set", "logging.tensorboard=true") == 0
    new = [r for r in read_metrics(copy)[len(rows):]]
    assert {r["stage"] for r in new} == {"finetune", "export", "validate"}
    events = EventAccumulator(str(copy / "tensorboard"))
    events.Reload()
    loss = [r["value"] for r in new if r["stage"] == "finetune" and r["name"] == "recovery/loss"]
    assert [e.value for e in events.Scalars("finetune/recovery/loss")] == pytest.approx(loss, rel=1e-6)


def test_report_verb_on_a_finished_run_and_on_a_non_run(finished, tmp_path: Path, capsys):
    _, run = finished
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    (copy / "report.md").unlink()
    assert cli("report", str(copy)) == 0
    check_numbers(copy)
    assert cli("report", str(tmp_path / "nothing")) == 2
    assert "is not a run directory" in capsys.readouterr().err
