"""The run directory contract: atomic writes, manifest with hashes, checkpoints loadable with weights_only."""

from __future__ import annotations

import errno
import hashlib
import io
import json
import os
import re
import shutil
import tempfile
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch

from core.errors import UserInputError

MANIFEST = "manifest.json"
# Everything the pipeline writes at the top of a run directory; it never writes, replaces or deletes anything else.
OWNED = frozenset({MANIFEST, "config.json", "summary.json", "model.onnx", "model.engine", "model.engine.json",
                   "model.int8.onnx", "log.txt", "metrics.jsonl", "report.md",
                   "report.html", "figures", "tensorboard", "exports", ".lock"})
STAGE_DIR = re.compile(r"^\d\d_[a-z_]+$")
# The temporary files this tool names (atomic_write's, and probe_dir's): `.<name>.<8 random chars>.tmp` and
# `.compress-probe-<8>`. A process killed with SIGKILL inside a write leaves one behind; nothing else matches.
TEMP_FILE = re.compile(r"^\.(?:.+\.[a-z0-9_]{8}\.tmp|compress-probe-[a-z0-9_]{8})$")


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
    """Write bytes so that a crash leaves either the old file or the new one, never a torn one.

    A full disk or a file system that refuses the write is bad environment, not a bug: UserInputError (exit 2)
    with the path and the size needed; the temporary file is removed and the old file stays as it was.
    """
    try:
        _atomic_write(path, data)
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            try:
                free = f"{shutil.disk_usage(nearest_existing(path.parent)).free / 1e6:,.1f} MB free"
            except OSError:
                free = "free space unknown"
            raise UserInputError(f"no space left on the device while writing {path} ({len(data) / 1e6:,.1f} MB "
                                 f"needed, {free}); earlier files are intact. Free some space and re-run the same "
                                 f"command to resume") from exc
        if exc.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
            raise UserInputError(f"cannot write {path}: {exc.strerror}; choose a writable location") from exc
        raise


def _atomic_write(path: Path, data: bytes) -> None:
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


def nearest_existing(path: Path) -> Path:
    """`path` itself or its closest ancestor that exists."""
    p = Path(os.path.abspath(path))
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


def check_writable(path: Path, what: str) -> None:
    """Raise UserInputError unless a file can be created at `path`; leaves nothing behind.

    Catches a read-only file system, missing permission, pseudo file systems (/proc, /sys), a regular file where
    a folder is needed, and a folder where the file would go, before any work is done.
    """
    path = Path(path)
    if path.is_dir():
        raise UserInputError(f"{what} {str(path)!r} is a folder; give a file path")
    parent = nearest_existing(path.parent)
    if not parent.is_dir():
        raise UserInputError(f"{what} {str(path)!r} cannot be created: {str(parent)!r} is a file, not a folder")
    probe_dir(parent, f"{what} {str(path)!r}")


def probe_dir(folder: Path, what: str) -> None:
    """Create and remove a temporary file in `folder`: the one reliable test that it can be written."""
    try:
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=".compress-probe-")
        os.close(fd)
        os.unlink(tmp)
    except OSError as exc:
        raise UserInputError(f"{what} cannot be written: {str(folder)!r} is not writable ({exc.strerror or exc}); "
                             f"choose a folder on a writable file system") from exc


def json_bytes(obj: Any) -> bytes:
    """The bytes atomic_json writes for obj (so a caller can record their sha256 before writing them)."""
    return (json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n").encode()


def atomic_json(path: Path, obj: Any) -> None:
    """Atomically write pretty JSON."""
    atomic_write(path, json_bytes(obj))


def atomic_torch_save(path: Path, obj: Any) -> None:
    """Atomically torch.save tensors and plain data."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    atomic_write(path, buf.getvalue())


def load_checkpoint(path: Path) -> dict[str, Any]:
    """Load a checkpoint with weights_only=True (tensors and plain data only).

    A file that holds anything else (or is damaged) is refused with a message of ours: torch's own text
    suggests weights_only=False, which would run whatever code the file carries.
    """
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError as exc:
        raise UserInputError(f"checkpoint {path} is missing; re-run the stage that writes it (--from), or "
                             f"start over with --fresh") from exc
    except Exception as exc:  # noqa: BLE001 - unpickling errors, truncation, foreign formats: all bad input
        raise UserInputError(f"{path} is not a checkpoint this tool wrote: it is damaged or holds objects other "
                             f"than tensors and plain data ({type(exc).__name__}), and nothing was loaded from it. "
                             f"Re-run the stage that writes it with --from, or start over with --fresh") from None
    if not isinstance(data, dict):
        raise UserInputError(f"{path} is not a checkpoint this tool wrote (it holds a {type(data).__name__}); "
                             f"re-run the stage that writes it with --from, or start over with --fresh")
    return data


def _refusal(root: Path) -> str | None:
    """Why `root` can never be a run directory (the current folder, home, a system folder), or None."""
    resolved = Path(os.path.abspath(root))
    if str(root) in ("", ".") or resolved == Path.cwd():
        return "is the current folder; a run directory is a folder of its own, e.g. --run-dir runs/mine"
    if resolved == resolved.parent or resolved == Path.home():
        return "is the file-system root or your home folder"
    top = resolved.parts[1] if len(resolved.parts) > 1 else ""
    if top in ("proc", "sys", "dev"):
        return f"is inside /{top}, a kernel pseudo file system"
    return None


def _manifest_problem(data: Any) -> str | None:
    if not isinstance(data, dict):
        return f"the top level is a {type(data).__name__}, not an object"
    stages = data.get("stages", {})
    if not isinstance(stages, dict):
        return "`stages` is not an object"
    for name, entry in stages.items():
        if not isinstance(entry, dict) or not isinstance(entry.get("status"), str):
            return f"stage {name!r} has no status"
        files = entry.get("files", {})
        if not isinstance(files, dict) or not all(isinstance(k, str) and isinstance(v, str) and _inside(k)
                                                  for k, v in files.items()):
            return f"stage {name!r}: `files` is not a map of paths inside the run directory to sha256"
        ckpt = entry.get("checkpoint")
        if ckpt is not None and not (isinstance(ckpt, str) and _inside(ckpt)):
            return f"stage {name!r}: `checkpoint` is not a path inside the run directory"
    return None


def _inside(rel: str) -> bool:
    return bool(rel) and not Path(rel).is_absolute() and ".." not in Path(rel).parts


class RunDir:
    """runs/<name>/: stage folders, manifest.json and the final artifacts."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self._lock: Any = None  # a filelock.FileLock while this process holds the run directory

    @property
    def manifest_path(self) -> Path:
        return self.root / MANIFEST

    def lock(self) -> None:
        """Take an exclusive lock so that two runs never write the same directory."""
        self.root.mkdir(parents=True, exist_ok=True)
        from filelock import FileLock, Timeout

        lock = FileLock(self.root / ".lock", timeout=0)  # an OS lock: released when the process dies
        try:
            lock.acquire()
        except Timeout as exc:
            raise UserInputError(f"run directory {self.root} is in use by another compress process; wait for "
                                 f"it to finish or pass another --run-dir") from exc
        self._lock = lock

    def unlock(self) -> None:
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    def read_manifest(self) -> dict[str, Any]:
        """The manifest, or an empty one for a new run; a manifest of the wrong shape is refused."""
        if not self.manifest_path.is_file():
            return {"stages": {}}
        fix = "it was edited or damaged outside the tool. Restore it, or run with --fresh to start this run over"
        try:
            data = json.loads(self.manifest_path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise UserInputError(f"{self.manifest_path} is not valid JSON ({exc}); {fix}") from exc
        problem = _manifest_problem(data)
        if problem:
            raise UserInputError(f"{self.manifest_path} is not a manifest of this tool ({problem}); {fix}")
        data.setdefault("stages", {})
        return data

    def check_usable(self, fresh: bool = False, need_bytes: int = 0) -> None:
        """Before any work (also for --dry-run): the folder is a run directory or can become one without
        touching anything of the user's, it can be written, and it has room for the run's files."""
        root = self.root
        why = _refusal(root)
        if why:
            raise UserInputError(f"run directory {str(root)!r} {why}")
        if root.is_symlink() and not root.exists():
            raise UserInputError(f"run directory {str(root)!r} is a symbolic link to {os.readlink(root)!r}, which "
                                 f"does not exist; create that folder, remove the link, or pass another --run-dir")
        if root.exists() and not root.is_dir():
            raise UserInputError(f"run directory {str(root)!r} is a file, not a folder; pass another --run-dir")
        if self.manifest_path.is_file() and not fresh:
            self.read_manifest()  # a manifest of the wrong shape is refused before anything is touched
        if root.is_dir() and not self.manifest_path.is_file():
            foreign = sorted(p.name for p in root.iterdir())
            if foreign and not fresh:
                shown = ", ".join(foreign[:8]) + (f" and {len(foreign) - 8} more" if len(foreign) > 8 else "")
                raise UserInputError(f"{str(root)!r} is not empty and is not a run directory (no {MANIFEST}): it "
                                     f"holds {shown}. Nothing was changed. Pass a new or empty --run-dir, or "
                                     f"--fresh to add a run beside these files (never replacing them)")
            clash = [n for n in foreign if n in OWNED or STAGE_DIR.match(n)]
            if clash:
                raise UserInputError(f"{str(root)!r} is not a run directory but holds {', '.join(clash)}, which a "
                                     f"run would write; they are not the pipeline's, so even --fresh will not "
                                     f"replace them. Move them, or pass another --run-dir")
        base = nearest_existing(root)
        if not base.is_dir():
            raise UserInputError(f"run directory {str(root)!r} cannot be created: {str(base)!r} is a file")
        probe_dir(base, f"run directory {str(root)!r}")
        if need_bytes:
            free = shutil.disk_usage(base).free
            if free < need_bytes:
                raise UserInputError(f"run directory {str(root)!r}: about {need_bytes / 1e6:,.0f} MB is needed "
                                     f"for checkpoints and artifacts but {free / 1e6:,.0f} MB is free on its file "
                                     f"system; free some space or pass a --run-dir elsewhere")

    def remove_orphans(self) -> list[str]:
        """Delete the temporary files an earlier, killed process of this tool left in the run directory (its own
        naming pattern, TEMP_FILE, in the folders it writes); returns what was removed, relative to the root."""
        folders = [self.root] + [p for p in self.root.iterdir() if p.is_dir() and not p.is_symlink() and
                                 (STAGE_DIR.match(p.name) or p.name in OWNED)]
        removed = []
        for folder in folders:
            for p in folder.iterdir():
                if TEMP_FILE.match(p.name) and p.is_file() and not p.is_symlink():
                    try:
                        p.unlink()
                        removed.append(self.rel(p))
                    except OSError:
                        continue
        return removed

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
