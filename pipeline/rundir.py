"""The run directory contract: atomic writes, manifest with hashes, checkpoints loadable with weights_only."""

from __future__ import annotations

import fcntl
import hashlib
import io
import json
import os
import tempfile
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch

from pipeline.errors import UserInputError

MANIFEST = "manifest.json"


def now() -> str:
    """UTC timestamp in ISO format."""
    return datetime.now(UTC).isoformat(timespec="seconds")


def sha256(path: Path) -> str:
    """Hex sha256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def atomic_write(path: Path, data: bytes) -> None:
    """Write bytes so that a crash leaves either the old file or the new one, never a torn one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        # mkstemp creates 0600; artifacts are shared with CI and deployment tools, so use the umask.
        umask = os.umask(0)
        os.umask(umask)
        os.fchmod(fd, 0o666 & ~umask)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_json(path: Path, obj: Any) -> None:
    """Atomically write pretty JSON."""
    atomic_write(path, (json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n").encode())


def atomic_torch_save(path: Path, obj: Any) -> None:
    """Atomically torch.save tensors and plain data."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    atomic_write(path, buf.getvalue())


def load_checkpoint(path: Path) -> dict[str, Any]:
    """Load a checkpoint with weights_only=True (tensors and plain data only)."""
    return torch.load(path, map_location="cpu", weights_only=True)


class RunDir:
    """runs/<name>/: stage folders, manifest.json and the final artifacts."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self._lock_fd: int | None = None

    @property
    def manifest_path(self) -> Path:
        return self.root / MANIFEST

    def lock(self) -> None:
        """Take an exclusive lock so that two runs never write the same directory."""
        self.root.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.root / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as exc:
            os.close(fd)
            raise UserInputError(f"run directory {self.root} is in use by another compress process; wait for "
                                 f"it to finish or pass another --run-dir") from exc
        self._lock_fd = fd

    def unlock(self) -> None:
        if self._lock_fd is not None:
            fcntl.flock(self._lock_fd, fcntl.LOCK_UN)
            os.close(self._lock_fd)
            self._lock_fd = None

    def read_manifest(self) -> dict[str, Any]:
        """The manifest, or an empty one for a new run."""
        if not self.manifest_path.is_file():
            return {"stages": {}}
        try:
            data = json.loads(self.manifest_path.read_text())
        except json.JSONDecodeError as exc:
            raise UserInputError(f"{self.manifest_path} is not valid JSON ({exc}); it was edited or damaged "
                                 f"outside the tool. Restore it, or run with --fresh to start this run over") from exc
        data.setdefault("stages", {})
        return data

    def write_manifest(self, manifest: dict[str, Any]) -> None:
        atomic_json(self.manifest_path, manifest)

    def stage_dir(self, index: int, name: str) -> Path:
        return self.root / f"{index:02d}_{name}"

    def rel(self, path: Path) -> str:
        return str(Path(path).resolve().relative_to(self.root.resolve()))

    def file_hashes(self, paths: list[Path]) -> dict[str, str]:
        return {self.rel(p): sha256(p) for p in paths}

    def corrupted_files(self, entry: dict[str, Any]) -> list[str]:
        """Files of a finished stage that are missing or whose sha256 no longer matches."""
        bad = []
        for rel, digest in entry.get("files", {}).items():
            p = self.root / rel
            if not p.is_file() or sha256(p) != digest:
                bad.append(rel)
        return bad
