"""What fingerprinting a data folder costs: 10,000 small images, first run (every file read and hashed), second run
(stat only, hashes from the cache), a fresh copy of the same files (new modification times: read again, same
fingerprint), and 40 images added (only they are read)."""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

FILES = 10_000


def _timed(fn) -> tuple[float, Any]:
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def run(out: Path, seeds: list[int], quick: bool) -> dict[str, Any]:
    from PIL import Image

    from core._datafiles import fingerprint, scan

    n = FILES // 10 if quick else FILES
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["COMPRESS_CACHE_DIR"] = str(Path(tmp) / "cache")
        root = Path(tmp) / "data"
        for i in range(n):
            folder = root / f"class{i % 10}"
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(folder / f"{i}.png")
        size = sum(p.stat().st_size for p in root.rglob("*.png"))
        rows = {}
        rows["first run (read and hash every file)"], first = _timed(lambda: fingerprint(scan(root)))
        rows["second run (stat, hashes from the cache)"], second = _timed(lambda: fingerprint(scan(root)))
        rows["listing alone (scan)"], _ = _timed(lambda: scan(root))
        for p in root.rglob("*.png"):
            os.utime(p, (1_000_000, 1_000_000))
        rows["a fresh copy of the same files (new mtimes: read again)"], copy = _timed(lambda: fingerprint(scan(root)))
        for i in range(40):
            Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(root / "class0" / f"new{i}.png")
        rows["40 images added"], added = _timed(lambda: fingerprint(scan(root)))
    return {"files": n, "bytes": size, "seconds": rows, "same_after_copy": copy["digest"] == first["digest"],
            "same_second": second["digest"] == first["digest"], "changed_after_add": added["digest"] != first["digest"]}


def markdown(res: dict[str, Any]) -> str:
    lines = ["## Data fingerprint", "",
             f"Fingerprinting a folder of {res['files']:,} small PNG images ({res['bytes'] / 1e6:.1f} MB): every "
             f"file's relative path, size and content sha256 (content hashes cached by path, size and mtime). The "
             f"images are written just before, so they are in the page cache: on a cold disk the first run also "
             f"pays for reading {res['bytes'] / 1e6:.0f} MB.", "",
             "| case | seconds |", "| --- | --- |"]
    lines += [f"| {case} | {s:.2f} |" for case, s in res["seconds"].items()]
    lines += ["", f"The fingerprint is the same on the second run: {res['same_second']}; after a fresh copy with new "
                  f"modification times: {res['same_after_copy']}; it changes when 40 images are added: "
                  f"{res['changed_after_add']}.", ""]
    return "\n".join(lines)
