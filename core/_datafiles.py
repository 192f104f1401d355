"""A data folder read once: a walk that never enters a folder twice, and its fingerprint (paths, sizes, content).

Folder datasets (`imagefolder`, and torchvision's sets under `data.root`) are read from files the config only
names, so a run's checkpoints depend on what those files hold today. `scan` lists every file under a root,
following symbolic links but never into a folder already visited: a link back to an ancestor is a loop and a
clear error (it would read the same images again and again, and copies would land in both the training and the
validation split); a second link to a folder or file already listed is left out and reported.

`fingerprint` hashes the listing: relative path, size and content sha256 per file while the folder is small
enough to read in seconds (CONTENT_LIMIT bytes in all), else relative path, size and modification time. Content
hashes are cached on disk by path, size and modification time, so a second run only stats the files (10,000
images: well under a second), and a fresh copy of unchanged data (new modification times) still matches.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import stat as stat_mod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from core.errors import UserInputError
from core.rundir import sha256

# Folders up to this size are fingerprinted by content (read once, then cached); larger ones by size and mtime.
CONTENT_LIMIT = 2 << 30
CACHE_VERSION = 1


@dataclass(frozen=True)
class DataFile:
    """One file of a data folder, as found by `scan`."""

    rel: str  # path under the root, with "/" separators
    path: str  # the path it was found at (through any links)
    size: int
    mtime_ns: int
    inode: tuple[int, int]  # (device, inode): the same file reached twice is listed once


@dataclass
class Scan:
    """Every file under a root, each once, and the links that were not followed because they lead somewhere
    already listed."""

    root: Path
    files: list[DataFile] = field(default_factory=list)
    repeated: list[str] = field(default_factory=list)
    folders: list[str] = field(default_factory=list)  # the root's own sub-folders, empty ones included

    def top_folders(self) -> list[str]:
        """The names of the root's sub-folders (class folders of an image folder), sorted."""
        return sorted(self.folders)


def _stat(path: str, root: Path) -> os.stat_result:
    try:
        return os.stat(path)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise UserInputError(f"data.root {str(root)!r}: {path} is a symbolic link that points to itself (a link "
                                 f"loop; reading it fails with ELOOP). Remove the link or point it at a real "
                                 f"folder") from None
        if exc.errno == errno.ENOENT and os.path.islink(path):
            raise UserInputError(f"data.root {str(root)!r}: {path} is a broken symbolic link (its target "
                                 f"{os.readlink(path)!r} does not exist). Remove the link or restore its "
                                 f"target") from None
        raise UserInputError(f"data.root {str(root)!r}: cannot read {path} ({exc.strerror or exc}); fix its "
                             f"permissions or remove it") from None


def scan(root: Path) -> Scan:
    """List the files under `root` (hidden names skipped), each file and folder once, in sorted order.

    Raises UserInputError naming the path for a link loop (a link to a folder that contains it), a link to
    itself, a broken link, or an unreadable entry.
    """
    root = Path(root)
    out = Scan(root)
    top = _stat(str(root), root)
    if not stat_mod.S_ISDIR(top.st_mode):
        raise UserInputError(f"data.root {str(root)!r} is not a folder")
    seen_dirs = {(top.st_dev, top.st_ino)}
    seen_files: set[tuple[int, int]] = set()

    def walk(folder: str, rel: str, ancestors: tuple[tuple[int, int], ...]) -> None:
        try:
            names = sorted(e.name for e in os.scandir(folder))
        except OSError as exc:
            raise UserInputError(f"data.root {str(root)!r}: cannot list {folder} ({exc.strerror or exc}); fix its "
                                 f"permissions or remove it") from None
        for name in names:
            if name.startswith("."):
                continue
            path, sub = os.path.join(folder, name), f"{rel}{name}"
            st = _stat(path, root)
            key = (st.st_dev, st.st_ino)
            if stat_mod.S_ISDIR(st.st_mode):
                if key in ancestors:
                    raise UserInputError(
                        f"data.root {str(root)!r}: {path} is a symbolic link to {os.path.realpath(path)}, a folder "
                        f"that contains it: a loop, which would read the same images without end and put copies in "
                        f"both the training and the validation split. Remove the link")
                if key in seen_dirs:
                    out.repeated.append(sub)
                    continue
                seen_dirs.add(key)
                if not rel:
                    out.folders.append(name)
                walk(path, sub + "/", (*ancestors, key))
            elif stat_mod.S_ISREG(st.st_mode):
                if key in seen_files:
                    out.repeated.append(sub)
                    continue
                seen_files.add(key)
                out.files.append(DataFile(sub, path, st.st_size, st.st_mtime_ns, key))

    walk(str(root), "", ((top.st_dev, top.st_ino),))
    return out


def _hash_cache_path(root: Path) -> Path:
    from core.cache import cache_root

    key = hashlib.sha256(str(Path(os.path.abspath(root))).encode()).hexdigest()[:32]
    return cache_root() / "files" / f"{key}.json"


def _load_hash_cache(path: Path) -> dict[str, list[Any]]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    if not isinstance(data, dict) or data.get("version") != CACHE_VERSION or not isinstance(data.get("files"), dict):
        return {}
    return data["files"]


def fingerprint(found: Scan) -> dict[str, Any]:
    """The folder's identity: a digest over each file's relative path, size and content (or, past CONTENT_LIMIT,
    modification time), plus counts for messages. Content hashes come from the disk cache when a file's path, size
    and modification time are unchanged."""
    total = sum(f.size for f in found.files)
    by_content = total <= CONTENT_LIMIT
    digest = hashlib.sha256(f"{'content' if by_content else 'stat'}|".encode())
    entries: dict[str, str] = {}
    if by_content:
        cache_path = _hash_cache_path(found.root)
        cache = _load_hash_cache(cache_path)
        fresh: dict[str, list[Any]] = {}
        for f in found.files:
            hit = cache.get(f.rel)
            sha = hit[2] if hit and hit[0] == f.size and hit[1] == f.mtime_ns else sha256(Path(f.path))
            fresh[f.rel] = [f.size, f.mtime_ns, sha]
            entries[f.rel] = sha
        if fresh != cache:
            _save_hash_cache(cache_path, fresh)
    else:
        entries = {f.rel: f"{f.size}:{f.mtime_ns}" for f in found.files}
    for rel, ident in entries.items():
        digest.update(f"{rel}\0{ident}\n".encode())
    return {"digest": digest.hexdigest(), "files": len(found.files), "bytes": total,
            "by": "content" if by_content else "size+mtime", "entries": entries}


def _save_hash_cache(path: Path, files: dict[str, list[Any]]) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps({"version": CACHE_VERSION, "files": files}))
        os.replace(tmp, path)
    except OSError:
        pass  # a cache that cannot be written costs time on the next run, never a wrong answer


def describe_change(before: dict[str, str] | None, after: dict[str, str]) -> str:
    """'40 files added, 2 changed under data.root' from two fingerprints' entries (None: not recorded)."""
    if before is None:
        return "data changed"
    added = len(after.keys() - before.keys())
    removed = len(before.keys() - after.keys())
    changed = sum(1 for k in after.keys() & before.keys() if after[k] != before[k])
    parts = [f"{n} file{'s' if n != 1 else ''} {what}" for n, what in
             ((added, "added"), (removed, "removed"), (changed, "changed")) if n]
    return f"data changed ({', '.join(parts) or 'same files, another hashing mode'} under data.root)"
