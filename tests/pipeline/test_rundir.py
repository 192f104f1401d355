"""Atomic writes and hash checks of the run directory."""

from __future__ import annotations

from pathlib import Path

import pytest

from core import rundir
from core.errors import UserInputError
from core.registry import Registry


def test_atomic_write_keeps_old_file_when_interrupted(tmp_path: Path, monkeypatch):
    p = tmp_path / "f.bin"
    rundir.atomic_write(p, b"old")

    def boom(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(rundir.os, "replace", boom)
    with pytest.raises(KeyboardInterrupt):
        rundir.atomic_write(p, b"new")
    assert p.read_bytes() == b"old"
    assert [x.name for x in tmp_path.iterdir()] == ["f.bin"], "temp file must be cleaned up"


def test_corrupted_files_detected(tmp_path: Path):
    rd = rundir.RunDir(tmp_path)
    f = tmp_path / "00_x" / "a.pt"
    rundir.atomic_write(f, b"abc")
    entry = {"files": rd.file_hashes([f])}
    assert rd.corrupted_files(entry) == []
    f.write_bytes(b"abd")
    assert rd.corrupted_files(entry) == ["00_x/a.pt"]
    f.unlink()
    assert rd.corrupted_files(entry) == ["00_x/a.pt"]


def test_second_process_cannot_take_the_lock(tmp_path: Path):
    a, b = rundir.RunDir(tmp_path), rundir.RunDir(tmp_path)
    a.lock()
    try:
        with pytest.raises(UserInputError, match="in use"):
            b.lock()
    finally:
        a.unlock()
    b.lock()
    b.unlock()


def test_registry_duplicates_raise_and_unknown_lists_known():
    reg: Registry[int] = Registry("thing")
    reg.register("alpha")(1)
    with pytest.raises(ValueError, match="twice"):
        reg.register("alpha")(2)
    with pytest.raises(UserInputError, match="Did you mean 'alpha'.*Known things: alpha"):
        reg.get("alpah")
