"""INT8 after pruning through the pipeline: three artifacts validated side by side, resumes that redo only what
export.quantize changes, the gate that names the layers to keep in FP32, and bad input as exit 2."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from export.runtime import int8_saturation
from tests.conftest import REPO, run_cli, tiny_config, write_config


def _manifest(run: Path) -> dict:
    return json.loads((run / "manifest.json").read_text())["stages"]


def test_quantize_added_on_resume_reruns_export_and_validate_only(tmp_path: Path):
    cfg = write_config(tmp_path / "c.yaml", tiny_config())
    run = tmp_path / "run"
    done = run_cli("pipeline", str(cfg), "--run-dir", str(run))
    assert done.returncode == 0, done.stderr[-3000:]
    assert not (run / "model.int8.onnx").exists() and "quantized" not in json.loads((run / "summary.json").read_text())
    before = _manifest(run)
    done = run_cli("pipeline", str(cfg), "--run-dir", str(run), "--set", "export.quantize=int8",
                   "--set", "export.calibration=entropy")
    assert done.returncode == 0, done.stderr[-3000:]
    after = _manifest(run)
    rerun = [n for n in after if after[n].get("finished") != before[n].get("finished")]
    assert rerun == ["export", "validate"], rerun
    s = json.loads((run / "summary.json").read_text())
    q = s["quantized"]
    assert s["artifacts"]["int8"] == "model.int8.onnx" and (run / "model.int8.onnx").is_file()
    assert q["precision"] == "int8" and q["runtime"] == "onnxruntime-cpu" and q["calibration"]["method"] == "entropy"
    assert 0.0 <= q["agreement"] <= 100.0 and q["top1_drop"] == pytest.approx(s["compressed"]["top1"] - q["top1"],
                                                                               abs=1e-3)
    for key in ("speedup_vs_base", "speedup_vs_compressed"):
        assert q[key]["speedup_low"] <= q[key]["speedup"] <= q[key]["speedup_high"]
    assert q["bytes"] < s["compressed"]["bytes"] < s["base"]["bytes"]
    assert all("max_parity_error" not in u for u in s["gates"].get("unchecked", [])), "FP32 parity still checked"
    report = (run / "report.md").read_text()
    assert "Deployed artifacts: FP32 and INT8" in report and "| model.int8.onnx | int8 |" in report
    assert re.search(r"INT8 model\.int8\.onnx: top-1 [\d.]+ \(FP32 compressed", done.stdout + done.stderr)
    # and removing it again removes the file: an older INT8 model is never left to be shipped
    done = run_cli("pipeline", str(cfg), "--run-dir", str(run))
    assert done.returncode == 0 and not (run / "model.int8.onnx").exists()
    assert "quantized" not in json.loads((run / "summary.json").read_text())


def test_an_int8_gate_failure_names_the_layers_to_keep_in_fp32(tmp_path: Path):
    """The outlier model (tests/fixtures/outlier.py): one layer's input INT8 cannot represent. The gate fails with
    exit 3 and names it; excluding it passes."""
    cfg = tiny_config(model={"source": "python", "name": str(REPO / "tests/fixtures/outlier.py") + ":build",
                             "num_classes": 10, "in_chans": 1, "input_size": [32, 32]},
                      data={"kind": "demo", "max_train_samples": 960, "max_val_samples": 300, "batch_size": 64,
                            "eval_batch_size": 150},
                      train={"epochs": 8, "lr": 0.2}, filter_prune={"enabled": False},
                      layer_truncate={"enabled": False}, finetune={"enabled": False},
                      export={"quantize": "int8"}, validate={"gates": {"max_top1_drop_int8": 5.0}})
    path = write_config(tmp_path / "c.yaml", cfg)
    run = tmp_path / "run"
    done = run_cli("pipeline", str(path), "--run-dir", str(run))
    assert done.returncode == 3, done.stderr[-3000:]
    s = json.loads((run / "summary.json").read_text())
    assert s["compressed"]["top1"] >= 50.0, "the FP32 model learned the digits"
    assert s["quantized"]["sensitivity"][0]["layer"] == "conv2", s["quantized"]["sensitivity"]
    assert any("max_top1_drop_int8" in f and "conv2" in f and "quantize_exclude" in f for f in s["gates"]["failures"])
    assert "conv2" in (run / "report.md").read_text().split("Deployed artifacts")[1]
    done = run_cli("pipeline", str(path), "--run-dir", str(run), "--set", "export.quantize_exclude=[conv2]")
    q = json.loads((run / "summary.json").read_text())["quantized"]
    print(f"INT8 top-1 drop: {s['quantized']['top1_drop']} with conv2 in INT8, {q['top1_drop']} without "
          f"(exit {done.returncode}, caveat {q.get('caveat')})")
    assert q["excluded_layers"] == ["conv2"]
    saturates = int8_saturation()
    if saturates is None:
        assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
        assert q["top1_drop"] <= 5.0 and "sensitivity" not in q and "caveat" not in q
    else:  # this CPU's INT8 kernels saturate: the figure is the CPU's and says so; excluding conv2 still helps
        assert q["caveat"] == saturates and q["top1_drop"] < s["quantized"]["top1_drop"], q


@pytest.mark.parametrize("override, needle", [
    ("export.calibration=kl", "'minmax', 'entropy' or 'percentile'"),
    ("validate.runtime=onnxruntime-cuda", "one of auto, onnxruntime-cpu, tensorrt"),
    ("export.quantize=int4", "'int8'"),
    ("export.quantize_exclude=[layer9.conv]", "not a layer of the model"),
])
def test_bad_int8_settings_exit_2_with_the_allowed_values(tmp_path: Path, override: str, needle: str):
    cfg = write_config(tmp_path / "c.yaml", tiny_config(export={"quantize": "int8"}))
    done = run_cli("pipeline", str(cfg), "--run-dir", str(tmp_path / "run"), "--set", override)
    assert done.returncode == 2, done.stdout + done.stderr
    assert needle in done.stderr and "Traceback" not in done.stderr
    assert not (tmp_path / "run" / "00_load").exists(), "refused before any stage ran"


def test_an_int8_artifact_on_the_cuda_provider_is_refused(tmp_path: Path):
    from core.errors import UserInputError
    from export.quantize import int8_model
    from export.runtime import OrtModel
    from tests.export.test_quantize import Outlier, _batches, _export

    model = Outlier(scale=1.0)
    fp32 = _export(model, tmp_path / "m.onnx")
    int8_model(fp32, tmp_path / "q.onnx", _batches(1), "minmax", 99.9, [], set(), tmp_path / "w")
    with pytest.raises(UserInputError, match="INT8 model.*onnxruntime-cpu"):
        OrtModel(tmp_path / "q.onnx", 1, "cuda")
