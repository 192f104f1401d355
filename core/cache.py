"""The tool's disk cache (latency measurements, data-file hashes): $COMPRESS_CACHE_DIR, else ~/.cache/idap-compress."""

from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
    """The cache's top folder; each user of it keeps a sub-folder of its own."""
    return Path(os.environ.get("COMPRESS_CACHE_DIR") or Path.home() / ".cache" / "idap-compress")
