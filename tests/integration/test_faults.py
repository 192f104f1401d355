"""Hostile input and a hostile machine: every failure class gets its documented exit code, a message that names
the thing and the fix, no traceback, and every file that existed before is byte for byte the same.

One test per row of the failure table in docs/failures.md (`FAILURES` below is that table's order)."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from core.rundir import sha256
from tests.conftest import REPO, run_cli, tiny_config, write_config


def hashes(*roots: Path) -> dict[str, str]:
    out = {}
    for root in roots:
        files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
        out.update({str(p): sha256(p) for p in files if p.name not in ("log.txt", "metrics.jsonl")})
    return out


def expect(done: subprocess.CompletedProcess, code: int, *needles: str) -> str:
    err = " ".join((done.stderr + done.stdout).split())
    assert done.returncode == code, err[-3000:]
    assert "Traceback" not in done.stderr, done.stderr[-3000:]
    for needle in needles:
        assert needle in err, (needle, err[-3000:])
    return err


@pytest.fixture
def cli(capsys):
    """`compress` in this process (as main() runs it, minus the sys.exit): most cases need no fresh process."""
    from pipeline.cli import run

    def call(*args: str) -> subprocess.CompletedProcess:
        capsys.readouterr()
        code = run(list(args))
        out = capsys.readouterr()
        return subprocess.CompletedProcess(list(args), code, out.out, out.err)

    return call


@pytest.fixture
def tiny(tmp_path: Path) -> Path:
    return write_config(tmp_path / "tiny.yaml", tiny_config())


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("faults")
    config = write_config(root / "tiny.yaml", tiny_config(finetune={"max_epochs": 0}, layer_truncate={"max_layers": 0}))
    done = run_cli("pipeline", str(config), "--run-dir", str(root / "run"))
    assert done.returncode == 0, done.stderr[-2000:]
    return config, root / "run"


# ------------------------------------------------------------------------------- the run directory is ours alone


def test_a_users_folder_is_never_written_into(cli, tiny: Path, tmp_path: Path):
    folder = tmp_path / "deploy"
    folder.mkdir()
    (folder / "model.onnx").write_bytes(b"the user's own model, not ours")
    (folder / "notes.txt").write_text("do not touch")
    before = hashes(folder)
    expect(cli("pipeline", str(tiny), "--run-dir", str(folder)), 2, "is not empty and is not a run directory",
           "model.onnx, notes.txt", "Nothing was changed")
    expect(cli("pipeline", str(tiny), "--run-dir", str(folder), "--fresh"), 2, "holds model.onnx",
           "even --fresh will not replace them")
    expect(cli("pipeline", str(tiny), "--run-dir", str(folder), "--dry-run"), 2, "is not a run directory")
    assert hashes(folder) == before and sorted(p.name for p in folder.iterdir()) == ["model.onnx", "notes.txt"]


@pytest.mark.parametrize("run_dir, needle", [("", "is the current folder"), (".", "is the current folder"),
                                             ("/proc/compress-run", "kernel pseudo file system"),
                                             ("/sys/compress-run", "kernel pseudo file system")])
def test_run_directories_that_can_never_be_ours(cli, tiny: Path, run_dir: str, needle: str):
    for extra in ([], ["--dry-run"]):
        expect(cli("pipeline", str(tiny), "--run-dir", run_dir, *extra), 2, needle)


def test_a_file_where_the_run_directory_would_be(cli, tiny: Path, tmp_path: Path):
    path = tmp_path / "run"
    path.write_text("a file")
    for extra in ([], ["--dry-run"]):
        expect(cli("pipeline", str(tiny), "--run-dir", str(path), *extra), 2, "is a file, not a folder")
    inside = tmp_path / "run" / "sub"
    expect(cli("pipeline", str(tiny), "--run-dir", str(inside), "--dry-run"), 2, "is a file")
    assert path.read_text() == "a file"


@contextlib.contextmanager
def _tmpfs(where: Path, size: str, readonly: bool = False):
    """A real small (or read-only) file system, where the machine lets us mount one (root in a VM or container)."""
    where.mkdir(parents=True, exist_ok=True)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({mounted.stderr.strip()}); the in-process tests cover the logic")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], capture_output=True)


def test_read_only_file_system(cli, tiny: Path, tmp_path: Path):
    with _tmpfs(tmp_path / "ro", "4m") as fs:
        subprocess.run(["mount", "-o", "remount,ro", str(fs)], check=True)
        for extra in ([], ["--dry-run"]):
            expect(cli("pipeline", str(tiny), "--run-dir", str(fs / "run"), *extra), 2, "is not writable",
                   "Read-only file system")


def test_no_room_for_the_run_is_found_before_any_work(cli, tiny: Path, tmp_path: Path):
    with _tmpfs(tmp_path / "small", "8m") as fs:
        for extra in ([], ["--dry-run"]):
            expect(cli("pipeline", str(tiny), "--run-dir", str(fs / "run"), *extra), 2, "MB is needed",
                   "MB is free")
        assert not (fs / "run").exists()


def test_disk_full_while_writing_a_checkpoint_keeps_earlier_files_and_exits_2(finished, tmp_path: Path,
                                                                              monkeypatch, capsys):
    """The disk fills up during a stage (after the free-space check passed): exit 2, nothing finished is lost,
    and the same command resumes once there is room."""
    from core import rundir
    from pipeline.cli import run

    config, run_dir = finished
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    before = hashes(copy)
    real = rundir._atomic_write

    def full(path: Path, data: bytes) -> None:
        if path.name == "checkpoint.pt" and "03_filter_prune" in str(path):
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        real(path, data)

    monkeypatch.setattr(rundir, "_atomic_write", full)
    assert run(["pipeline", str(config), "--run-dir", str(copy), "--from", "filter_prune"]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "no space left on the device while writing" in err and "03_filter_prune/checkpoint.pt" in err
    assert "earlier files are intact" in err and "Traceback" not in err
    assert hashes(copy) == before, "every file written before is unchanged"
    monkeypatch.setattr(rundir, "_atomic_write", real)
    assert run(["pipeline", str(config), "--run-dir", str(copy)]) == 0


# ------------------------------------------------------------------------------- input checked at the boundary


def _weights_with_nan(tmp: Path) -> Path:
    from core.config import ModelConfig
    from core.models import build_model

    state = build_model(ModelConfig(**tiny_config()["model"])).state_dict()
    state["layer1.0.conv1.weight"][0, 0, 0, 0] = float("nan")
    state["fc.bias"][1] = float("inf")
    torch.save(state, tmp / "nan.pt")
    return tmp / "nan.pt"


def test_non_finite_weights_are_named(cli, tmp_path: Path):
    cfg = write_config(tmp_path / "c.yaml", tiny_config(model={**tiny_config()["model"],
                                                               "weights": str(_weights_with_nan(tmp_path))},
                                                        train={"enabled": False}))
    for extra in ([], ["--dry-run"]):
        expect(cli("pipeline", str(cfg), "--run-dir", str(tmp_path / "r"), *extra), 2, "NaN or Inf",
               "layer1.0.conv1.weight", "fc.bias")
    assert not (tmp_path / "r" / "manifest.json").exists()


def test_fewer_outputs_than_classes_is_an_error_more_is_a_warning(cli, tmp_path: Path):
    model = {"source": "timm", "name": "resnet18", "in_chans": 1, "input_size": [32, 32]}
    fewer = write_config(tmp_path / "f.yaml", tiny_config(model={**model, "num_classes": 8}, data={"kind": "demo"}))
    for extra in ([], ["--dry-run"]):
        expect(cli("pipeline", str(fewer), "--run-dir", str(tmp_path / "r"), *extra), 2,
               "model.num_classes is 8 but the data has 10 classes", "set model.num_classes: 10")
    more = write_config(tmp_path / "m.yaml", tiny_config(model={**model, "num_classes": 12}, data={"kind": "demo"}))
    expect(cli("pipeline", str(more), "--run-dir", str(tmp_path / "r"), "--dry-run"), 0,
           "WARNING: model.num_classes is 12 but the data has 10 classes")


def _image_folder(root: Path, bad: bool = True) -> Path:
    from PIL import Image

    for cls in ("cat", "dog"):
        (root / cls).mkdir(parents=True)
        for i in range(6):
            Image.new("RGB", (36, 36), (40 * i, 30, 200 if cls == "cat" else 20)).save(root / cls / f"{i}.png")
    if bad:
        (root / "dog" / "3.png").write_bytes(b"\x89PNG\r\n\x1a\n not really an image")
    return root


def test_an_unreadable_image_is_named_and_can_be_skipped(cli, tmp_path: Path):
    root = _image_folder(tmp_path / "imgs")
    cfg = tiny_config(model={"source": "timm", "name": "resnet18", "num_classes": 2, "in_chans": 3,
                             "input_size": [32, 32]}, data={"kind": "imagefolder", "root": str(root),
                                                            "val_fraction": 0.25, "batch_size": 4},
                      calibrate={"batches": 1, "batch_size": 4})
    path = write_config(tmp_path / "c.yaml", cfg)
    expect(cli("pipeline", str(path), "--run-dir", str(tmp_path / "r"), "--until", "calibrate"), 2,
           f"cannot read image {root / 'dog' / '3.png'}", "data.skip_corrupt: true")
    manifest = json.loads((tmp_path / "r" / "manifest.json").read_text())
    assert all(e["status"] in ("done", "skipped") for e in manifest["stages"].values()), "no stage left failed"
    done = cli("pipeline", str(path), "--run-dir", str(tmp_path / "r2"), "--until", "calibrate",
                   "--set", "data.skip_corrupt=true")
    expect(done, 0, "1 unreadable image(s) skipped", "dog/3.png")


@pytest.mark.parametrize("case", ["not utf-8", "duplicate key", "a folder"])
def test_config_files_that_are_not_configs(cli, tmp_path: Path, case: str):
    if case == "not utf-8":
        path, needle = tmp_path / "c.yaml", "is not UTF-8 text (byte 0xe9 at line 2)"
        path.write_bytes(b"name: tiny\n# caf\xe9 latin-1\nmodel: {name: resnet18}\n")
    elif case == "duplicate key":
        path, needle = tmp_path / "c.yaml", "the key 'lr' appears twice in one section (first at line 4)"
        path.write_text("name: tiny\nmodel: {name: resnet18}\ntrain:\n  lr: 0.1\n  lr: 10\n")
    else:
        path, needle = tmp_path, "is a folder; pass a YAML file"
    for extra in ([], ["--dry-run"]):
        expect(cli("pipeline", str(path), *extra), 2, needle)


@pytest.mark.parametrize("manifest, needle", [
    ("[1, 2]", "the top level is a list"),
    ('{"stages": {"load": "done"}}', "stage 'load' has no status"),
    ('{"stages": {"load": {"status": "done", "files": {"../../etc/passwd": "x"}}}}', "paths inside the run dir"),
    ('{"stages": []}', "`stages` is not an object"),
])
def test_a_manifest_of_the_wrong_shape(cli, tiny: Path, tmp_path: Path, manifest: str, needle: str):
    run = tmp_path / "run"
    run.mkdir()
    (run / "manifest.json").write_text(manifest)
    before = hashes(run)
    for extra in ([], ["--dry-run"]):
        expect(cli("pipeline", str(tiny), "--run-dir", str(run), *extra), 2, "is not a manifest of this tool",
               needle, "--fresh")
    assert hashes(run) == before


def test_validate_on_a_file_that_is_not_a_model(cli, finished, tmp_path: Path):
    config, _ = finished
    fake = tmp_path / "model.onnx"
    fake.write_text("this is a text file")
    expect(cli("validate", str(fake), "--config", str(config)), 2, "is not an ONNX model ONNX Runtime can load")


def test_export_to_a_path_that_cannot_be_written(cli, finished):
    _, run = finished
    before = hashes(run)
    expect(cli("export", str(run), "--output", "/proc/model.onnx"), 2, "cannot be written")
    expect(cli("export", str(run), "--output", str(run / "manifest.json" / "x.onnx")), 2, "is a file")
    assert hashes(run) == before


def test_training_that_diverges_stops_with_the_learning_rate_named(cli, tmp_path: Path):
    cfg = write_config(tmp_path / "c.yaml", tiny_config(train={"enabled": True, "epochs": 2, "lr": 1e6}))
    done = cli("pipeline", str(cfg), "--run-dir", str(tmp_path / "r"))
    expect(done, 2, "training diverged", "lower train.lr (now 1e+06)")
    manifest = json.loads((tmp_path / "r" / "manifest.json").read_text())
    assert "train" not in manifest["stages"], "a diverged stage is never recorded as done"
    assert not (tmp_path / "r" / "01_train" / "checkpoint.pt").exists()


def test_report_on_a_damaged_run_names_the_damage(cli, finished, tmp_path: Path):
    _, run = finished
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    ckpt = copy / "03_filter_prune" / "checkpoint.pt"
    ckpt.write_bytes(ckpt.read_bytes()[:-100])
    expect(cli("report", str(copy)), 2, "damaged", "stage 'filter_prune': 03_filter_prune/checkpoint.pt",
           "--from filter_prune")
    text = (copy / "report.md").read_text()
    assert "Status: **damaged**" in text and "03_filter_prune/checkpoint.pt" in text


def test_a_forged_checkpoint_never_suggests_unpickling(cli, finished, tmp_path: Path):
    import pickle

    config, run = finished
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    ckpt = copy / "02_calibrate" / "checkpoint.pt"

    class Payload:
        def __reduce__(self):
            return (os.system, ("touch " + str(tmp_path / "pwned"),))

    torch.save({"state": Payload()}, ckpt, pickle_module=pickle)
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["stages"]["calibrate"]["files"]["02_calibrate/checkpoint.pt"] = sha256(ckpt)  # forged to match
    (copy / "manifest.json").write_text(json.dumps(manifest))
    err = expect(cli("pipeline", str(config), "--run-dir", str(copy), "--from", "filter_prune"), 2,
                 "02_calibrate/checkpoint.pt is not a checkpoint this tool wrote")
    assert "weights_only=False" not in err and not (tmp_path / "pwned").exists()


def test_readme_failure_table_has_a_test_per_row():
    """Every row of the failure table (docs/failures.md) names the tests that hold it, and they exist."""
    import ast
    import re

    text = (REPO / "docs" / "failures.md").read_text()
    table = text[text.index("<!-- failure-table: start -->"):text.index("<!-- failure-table: end -->")]
    rows = [line for line in table.splitlines() if line.startswith("| ") and not line.startswith("| failure")]
    tests = {node.name for path in (REPO / "tests").rglob("test_*.py")
             for node in ast.walk(ast.parse(path.read_text())) if isinstance(node, ast.FunctionDef)}
    assert len(rows) >= 20
    for row in rows:
        named = re.findall(r"`(test_\w+)`", row)
        assert named and set(named) <= tests, row
