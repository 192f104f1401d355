"""SIGKILL inside each stage in turn; the rerun resumes without redoing finished stages and ends identical."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from stages import PIPELINE
from tests.conftest import REPO, run_cli, tiny_config, write_config
from tests.report_checks import check_report

# Where to kill: the n-th progress tick inside the stage's loop, or "commit" (work done, nothing saved yet).
KILL_POINTS = {"load": "commit", "train": "2", "calibrate": "1", "filter_prune": "4", "layer_truncate": "2",
               "finetune": "2",
               "export": "commit", "validate": "3"}


def _weights(path: Path) -> dict:
    ckpt = torch.load(path, weights_only=True)
    return {"model": {k: v.tolist() for k, v in (ckpt["model"] or {}).items()}, "structure": ckpt["structure"]}


def _comparable(run: Path) -> dict:
    summary = json.loads((run / "summary.json").read_text())
    summary.pop("latency_ms")  # wall-clock timing differs between any two runs
    for key in ("finished", "onnx_sha256"):  # the time it finished, and model.onnx's bytes (its metadata says
        summary["run"].pop(key)               # which run wrote it); the run's fingerprint and status must match
    summary.get("targets", {}).get("speedup", {}).pop("contended", None)
    return {"summary": summary, "weights": {p.parent.name: _weights(p) for p in sorted(run.glob("0*/checkpoint.pt"))}}


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("kill")
    config = write_config(root / "tiny.yaml", tiny_config())
    done = run_cli("pipeline", str(config), "--run-dir", str(root / "baseline"))
    assert done.returncode == 0, done.stderr
    return config, _comparable(root / "baseline")


def test_kill_points_cover_every_stage():
    assert set(KILL_POINTS) == set(PIPELINE)


# load is killed at the same point as export (work done, nothing saved yet), train resumes as finetune does (a test
# below kills finetune mid-epoch), calibrate is recomputed whole as validate is: those three run with -m slow,
# which keeps the default suite near 20 minutes on 2 cores
SLOW_KILLS = {"load", "train", "calibrate"}


@pytest.mark.parametrize("stage", [pytest.param(s, marks=pytest.mark.slow) if s in SLOW_KILLS else s
                                   for s in PIPELINE])
def test_sigkill_inside_stage_then_resume(setup, tmp_path: Path, stage: str):
    config, baseline = setup
    run = tmp_path / "run"
    killed = run_cli("pipeline", str(config), "--run-dir", str(run),
                     env={"COMPRESS_DEBUG_KILL_AT": f"{stage}:{KILL_POINTS[stage]}"})
    assert killed.returncode == -9, f"expected SIGKILL inside {stage}: {killed.stderr[-2000:]}"
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["stages"][stage]["status"] == "running"
    finished_before = {n: e["finished"] for n, e in manifest["stages"].items() if e["status"] == "done"}
    assert list(finished_before) == PIPELINE[: PIPELINE.index(stage)]
    if stage == "layer_truncate":  # a report of the killed run says what finished and where it stopped
        reported = run_cli("report", str(run), "--config", str(config))
        assert reported.returncode == 0, reported.stderr[-2000:]
        tables = check_report(run, figures=("dynamics.png", "widths.png"))
        text = (run / "report.md").read_text()
        assert "Status: **interrupted** in stage `layer_truncate`" in text
        assert [r["stage"] for r in tables["Dynamics"][0]] == ["filter_prune"] * len(tables["Dynamics"][0])
        assert {r["stage"]: r["status"] for r in tables["Stages"][0]}["layer_truncate"] == "running"

    resumed = run_cli("pipeline", str(config), "--run-dir", str(run))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    log = " ".join(resumed.stderr.split())
    for name in finished_before:
        assert f"{name}: reused" in log, f"{name} was redone after a kill in {stage}"
    assert f"{stage}: re-runs: previous attempt ended as 'running'" in log
    manifest = json.loads((run / "manifest.json").read_text())
    assert {n: manifest["stages"][n]["finished"] for n in finished_before} == finished_before
    assert _comparable(run) == baseline


def test_truncated_checkpoint_rebuilds_in_a_fresh_process(setup, tmp_path: Path):
    """The truncated model loaded with weights_only=True in another process gives the same logits."""
    import subprocess
    import sys

    from core.models import rebuild
    from pipeline.config import load_config

    config, _ = setup
    run = config.parent / "baseline"
    ckpt = torch.load(run / "04_layer_truncate" / "checkpoint.pt", weights_only=True)
    assert ckpt["state"]["removed_blocks"] and ckpt["structure"]["replaced"]
    x = torch.randn(2, 1, 32, 32, generator=torch.Generator().manual_seed(0))
    model = rebuild(load_config(config).model, ckpt["structure"], ckpt["model"]).eval()
    here = model(x).detach()
    torch.save(x, tmp_path / "x.pt")
    code = (
        "import sys, torch; from pipeline.config import load_config; from core.models import rebuild\n"
        f"ck = torch.load({str(run / '04_layer_truncate' / 'checkpoint.pt')!r}, weights_only=True)\n"
        f"m = rebuild(load_config(__import__('pathlib').Path({str(config)!r})).model, ck['structure'], ck['model'])\n"
        f"torch.save(m.eval()(torch.load({str(tmp_path / 'x.pt')!r})).detach(), {str(tmp_path / 'y.pt')!r})\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parents[2])
    assert torch.equal(torch.load(tmp_path / "y.pt"), here)


def test_finetune_killed_mid_epoch_resumes_from_the_last_finished_epoch(tmp_path: Path):
    cfg = tiny_config(finetune={"max_epochs": 3})
    config = write_config(tmp_path / "ft.yaml", cfg)
    whole = run_cli("pipeline", str(config), "--run-dir", str(tmp_path / "whole"))
    assert whole.returncode == 0, whole.stderr[-2000:]
    steps = (192 - round(192 * 0.2)) // 32  # training steps per epoch of the tiny config
    run = tmp_path / "killed"
    killed = run_cli("pipeline", str(config), "--run-dir", str(run),
                     env={"COMPRESS_DEBUG_KILL_AT": f"finetune:{steps + 2}"})  # inside epoch 2
    assert killed.returncode == -9
    assert torch.load(run / "05_finetune" / "progress.pt", weights_only=True)["round"] == 1
    resumed = run_cli("pipeline", str(config), "--run-dir", str(run))
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resuming after round 1 of 3" in " ".join(resumed.stderr.split())
    assert _comparable(run) == _comparable(tmp_path / "whole")


# SIGINT, SIGTERM and SIGHUP take one handler: SIGTERM runs by default (CI time limits send it; SIGHUP has its own
# test in test_user_faults.py), SIGINT with -m slow (the default suite's time)
@pytest.mark.parametrize("sig, code", [pytest.param(signal.SIGINT, 130, marks=pytest.mark.slow),
                                       (signal.SIGTERM, 143)])
def test_signal_during_filter_prune_stops_cleanly_then_resumes(setup, tmp_path: Path, sig: int, code: int):
    """Ctrl-C (SIGINT) and a CI time limit (SIGTERM): the documented code, the stage marked interrupted, every
    earlier checkpoint intact, and the resumed run ends with the same tensors as an uninterrupted one."""
    config, baseline = setup
    run = tmp_path / "run"
    env = {**os.environ, "COLUMNS": "200", "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-m", "pipeline.cli", "pipeline", str(config), "--run-dir", str(run)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=REPO)
    log = run / "log.txt"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and not (log.is_file() and "filter_prune step 1/" in log.read_text()):
        assert proc.poll() is None, proc.communicate()[1][-2000:]
        time.sleep(0.2)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == code, err[-2000:]
    assert "Traceback" not in err and f"stopped by {signal.Signals(sig).name}" in err
    manifest = json.loads((run / "manifest.json").read_text())
    entry = manifest["stages"]["filter_prune"]
    assert entry["status"] == "interrupted" and entry["signal"] == signal.Signals(sig).name
    assert [n for n, e in manifest["stages"].items() if e["status"] == "done"] == ["load", "train", "calibrate"]
    assert f"interrupted by {signal.Signals(sig).name}" in log.read_text()
    resumed = run_cli("pipeline", str(config), "--run-dir", str(run))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "filter_prune: re-runs: previous attempt ended as 'interrupted'" in " ".join(resumed.stderr.split())
    assert _comparable(run) == baseline
