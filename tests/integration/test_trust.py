"""What a nightly job can trust: a re-run reuses nothing today's data would change, says why in the words the dry
run used, never leaves a previous run's artifacts looking current, and cleans up after a killed process."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from stages import PIPELINE
from tests.conftest import REPO, run_cli, run_here, tiny_config, write_config
from tests.pipeline.test_inputs import image_folder


def folder_yaml(path: Path, root: Path, **sections) -> Path:
    return write_config(path, tiny_config(
        model={"source": "timm", "name": "resnet18", "num_classes": 2, "in_chans": 3, "input_size": [32, 32]},
        data={"kind": "imagefolder", "root": str(root), "batch_size": 8, "eval_batch_size": 16}, **sections))


@pytest.fixture(scope="module")
def folder_run(tmp_path_factory) -> tuple[Path, Path, Path, dict[str, str]]:
    tmp = tmp_path_factory.mktemp("trust")
    data = image_folder(tmp / "data", per_class=12)
    config = folder_yaml(tmp / "folder.yaml", data)
    env = {"COMPRESS_CACHE_DIR": str(tmp / "cache")}
    done = run_cli("pipeline", str(config), "--run-dir", str(tmp / "run"), env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    return config, tmp / "run", data, env


def plan_reasons(stdout: str) -> dict[str, str]:
    """stage -> 'action: why' from the dry run's plan table."""
    out = {}
    for line in stdout.splitlines():
        cells = [c.strip() for c in re.split(r"[│┃]", line)[1:-1]]
        if len(cells) == 4 and cells[1] in PIPELINE:
            out[cells[1]] = cells[2] if cells[2] == "reused" else f"{cells[2]}: {cells[3]}"
    return out


def log_reasons(stderr: str) -> dict[str, str]:
    """stage -> 'action: why' from the run's log lines ("[3] filter_prune: re-runs: ...")."""
    out = {}
    for m in re.finditer(r"\[\d\] (\w+): ((?:runs|re-runs|off): [^\n]+|reused)", stderr):
        out.setdefault(m.group(1), m.group(2).split(" (")[0] if m.group(2).startswith("reused") else m.group(2))
    return out


def test_added_images_rerun_from_load_with_the_reason_the_dry_run_gave(folder_run, tmp_path: Path, monkeypatch):
    config, run, data, env = folder_run
    monkeypatch.setenv("COMPRESS_CACHE_DIR", env["COMPRESS_CACHE_DIR"])  # the dry runs run in this process
    monkeypatch.setenv("COLUMNS", "200")  # the plan table's reasons on one line each
    run2, data2 = tmp_path / "run", tmp_path / "data"
    shutil.copytree(run, run2)
    shutil.copytree(data, data2, symlinks=True)
    cfg2 = folder_yaml(tmp_path / "c.yaml", data2)
    same = run_here("pipeline", str(cfg2), "--run-dir", str(run2), "--dry-run")
    # another data folder with the same files: the content is the same, so nothing re-runs but load's config
    assert plan_reasons(same.stderr)["load"] == "re-runs: config changed (data)", same.stderr
    image_folder(data2, per_class=32)  # 20 images more in each class
    (data2 / "class1" / "0.png").unlink()
    dry = run_here("pipeline", str(cfg2), "--run-dir", str(run2), "--dry-run")
    planned = plan_reasons(dry.stderr)
    assert planned["load"] == "re-runs: config changed (data); data changed (40 files added, 1 file removed under " \
                              "data.root)", dry.stderr
    done = run_cli("pipeline", str(cfg2), "--run-dir", str(run2), env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    assert log_reasons(done.stderr) == planned, "the run does what the dry run said, for the reasons it gave"
    summary = json.loads((run2 / "summary.json").read_text())
    assert summary["run"]["current"] is True and summary["run"]["status"] == "complete"
    # the listing the next plan compares with is the new one
    listing = json.loads((run2 / "00_load" / "data_files.json").read_text())
    assert len(listing) == 63 and "class1/0.png" not in listing
    again = run_here("pipeline", str(cfg2), "--run-dir", str(run2), "--dry-run")
    assert set(plan_reasons(again.stderr).values()) == {"reused"}


@pytest.mark.parametrize("make_loop", ["link to its own folder", "class folder links to itself"])
def test_a_symlink_loop_is_exit_2_in_the_dry_run_and_the_real_run(tmp_path: Path, make_loop: str, monkeypatch):
    data = image_folder(tmp_path / "data")
    if make_loop == "link to its own folder":
        (data / "class0" / "again").symlink_to(".")
    else:
        os.symlink("class2", data / "class2")
    config = folder_yaml(tmp_path / "c.yaml", data)
    monkeypatch.setenv("COMPRESS_CACHE_DIR", str(tmp_path / "cache"))
    for extra in (["--dry-run"], []):
        result = run_here("pipeline", str(config), "--run-dir", str(tmp_path / "run"), *extra)
        text = " ".join((result.stdout + result.stderr).split())
        assert result.returncode == 2, text[-2000:]
        assert "Traceback" not in text and ("a loop" in text or "points to itself" in text), text[-2000:]


def _wait_for(predicate, proc: subprocess.Popen, timeout: float = 120.0) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return
        if proc.poll() is not None:
            raise AssertionError(f"the run ended ({proc.returncode}) before the instant the test waits for")
        time.sleep(0.01)
    raise AssertionError("timed out")


def _superseded(path: Path) -> bool:
    try:
        return json.loads(path.read_text()).get("run", {}).get("current") is False
    except (OSError, ValueError):
        return False


def test_a_killed_rerun_leaves_artifacts_that_say_they_are_not_current(folder_run, tmp_path: Path):
    config, run, _, env = folder_run
    run2 = tmp_path / "run"
    shutil.copytree(run, run2)
    before = json.loads((run2 / "summary.json").read_text())
    assert before["run"]["current"] is True and before["run"]["onnx_sha256"]
    proc = subprocess.Popen([sys.executable, "-m", "pipeline.cli", "pipeline", str(config), "--run-dir", str(run2),
                             "--set", "finetune.lr=0.02"], cwd=REPO, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, env={**os.environ, "PYTHONPATH": str(REPO), **env})
    try:
        _wait_for(lambda: _superseded(run2 / "summary.json"), proc)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
    finally:
        proc.kill()
    summary = json.loads((run2 / "summary.json").read_text())
    assert summary["run"]["current"] is False and summary["run"]["status"] == "superseded"
    assert "finetune re-runs: config changed (finetune)" in summary["run"]["note"]
    assert summary["compressed"] == before["compressed"], "the previous figures stay, marked"
    manifest = json.loads((run2 / "manifest.json").read_text())
    assert {manifest["stages"][n]["status"] for n in ("export", "validate")} <= {"outdated"}
    report = run_cli("report", str(run2), env=env)
    assert report.returncode == 0, report.stderr[-2000:]
    text = (run2 / "report.md").read_text()
    assert "**interrupted**" in text and "summary.json is from an earlier validation" in text
    resumed = run_cli("pipeline", str(config), "--run-dir", str(run2), "--set", "finetune.lr=0.02", env=env)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert json.loads((run2 / "summary.json").read_text())["run"]["current"] is True


class _Killed(BaseException):
    """Stands in for SIGKILL: nothing after it runs, not even critical()'s deferral."""


@pytest.mark.parametrize("kill_after", [0, 1, 2])
def test_a_kill_between_any_two_writes_of_a_supersede_leaves_no_summary_ahead_of_the_manifest(
        tmp_path: Path, monkeypatch, kill_after: int):
    """The killed-rerun test above catches this only when the kill lands between two writes; here every instant
    is tried: whatever is on disk, a summary that says superseded never sits beside stages still marked done,
    and the manifest's recorded sha256 of summary.json is true whenever the summary was written."""
    import core.rundir as rundir
    from core.rundir import RunDir, sha256
    from pipeline import runner
    from pipeline.plan import PlanItem

    run = RunDir(tmp_path / "run")
    run.root.mkdir()
    (run.root / "summary.json").write_text(json.dumps({"run": {"current": True}, "compressed": {"top1": 0.9}}))
    digest = sha256(run.root / "summary.json")
    manifest = {"stages": {name: {"status": "done", "files": {"summary.json": digest} if name == "validate" else {}}
                           for name in ("finetune", "export", "validate")}}
    run.write_manifest(manifest)
    plan = [PlanItem(i, name, "h", "run", "config changed (finetune)") for i, name in
            enumerate(("finetune", "export", "validate"))]
    real, writes = rundir._atomic_write, []

    def write(path, data):
        if len(writes) == kill_after:
            raise _Killed
        writes.append(path.name)
        real(path, data)

    monkeypatch.setattr(rundir, "_atomic_write", write)
    with pytest.raises(_Killed) if kill_after < 2 else contextlib.nullcontext():
        runner._supersede(run, json.loads(json.dumps(manifest)), plan)
    on_disk = json.loads(run.manifest_path.read_text())
    summary = json.loads((run.root / "summary.json").read_text())
    statuses = {n: e["status"] for n, e in on_disk["stages"].items()}
    if summary["run"]["current"] is False:
        assert set(statuses.values()) == {"outdated"}, (writes, statuses)
    assert on_disk["stages"]["validate"]["files"]["summary.json"] == sha256(run.root / "summary.json") or \
        summary["run"]["current"] is True, writes
    assert len(writes) == kill_after


def test_an_interrupted_rerun_writes_a_report_that_says_where_it_stopped(folder_run, tmp_path: Path):
    config, run, _, env = folder_run
    run2 = tmp_path / "run"
    shutil.copytree(run, run2)
    (run2 / "report.md").unlink()
    proc = subprocess.Popen([sys.executable, "-m", "pipeline.cli", "pipeline", str(config), "--run-dir", str(run2),
                             "--set", "finetune.max_epochs=30"], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env={**os.environ, "PYTHONPATH": str(REPO), **env})
    try:
        _wait_for(lambda: "finetune epoch 1/30" in (run2 / "log.txt").read_text(), proc)
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 143, out[-2000:]
    text = (run2 / "report.md").read_text()
    assert "**interrupted** in stage `finetune` by SIGTERM" in text


def test_temporary_files_of_a_killed_run_are_removed_on_the_next_start(folder_run, tmp_path: Path):
    config, run, _, env = folder_run
    run2 = tmp_path / "run"
    shutil.copytree(run, run2)
    ours = [run2 / ".model.onnx.k3j_9x2a.tmp", run2 / "05_finetune" / ".checkpoint.pt.0abcdefg.tmp",
            run2 / ".compress-probe-a1b2c3d4"]
    theirs = [run2 / ".model.onnx.keep", run2 / "05_finetune" / "notes.tmp", run2 / ".model.onnx.abc.tmp"]
    for p in ours + theirs:
        p.write_bytes(b"x" * 1000)
    done = run_cli("pipeline", str(config), "--run-dir", str(run2), env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    assert not any(p.exists() for p in ours) and all(p.exists() for p in theirs)
    assert "removed 3 temporary file(s) a killed earlier run left" in " ".join(done.stderr.split())
