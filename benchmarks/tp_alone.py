"""What Torch-Pruning alone does with a model: its documented recipe, no hand work, in a child process.

The recipe a user starts from (Torch-Pruning's README): `MetaPruner` with L2 magnitude importance, the classifier
in `ignored_layers`, one step at `pruning_ratio` 0.3 per layer (about -50% MACs, the matrix's target), then a
forward on the pruned model. The outcome is where it stopped: building the pruner, its step, the forward (or an
output of another shape), or finished with the MACs it cut. Every model runs in its own process under a time
limit and an address-space limit, because the library can hang or grow without bound on some graphs; either is
an outcome too. `python -m benchmarks.tp_alone SOURCE NAME SIZE` prints one JSON line.
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
RATIO = 0.3
LIMIT_S, LIMIT_BYTES = 120, 12 << 30


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:160] if text else ''}"


def probe(source: str, name: str, size: int) -> dict[str, Any]:
    """Run the recipe in this process; the outcome as a dict (never raises for the library's failures)."""
    import torch
    import torch_pruning as tp

    from core.config import ModelConfig
    from core.models import build_model, count_macs
    from stages._pruning import classifier_layers

    spec = ModelConfig(source=source, name=name, num_classes=10, in_chans=3, input_size=[size, size])
    torch.manual_seed(0)
    model = build_model(spec, with_weights=False).eval()
    example = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        shape = tuple(model(example).shape)
    before, _ = count_macs(model, spec)
    t0 = time.perf_counter()
    try:
        pruner = tp.pruner.MetaPruner(model, example, importance=tp.importance.MagnitudeImportance(p=2),
                                      pruning_ratio=RATIO, ignored_layers=classifier_layers(model, 10))
    except Exception as exc:  # noqa: BLE001 - where the library stops is what this reports
        return {"outcome": "build", "error": _first_line(exc)}
    try:
        pruner.step()
    except Exception as exc:  # noqa: BLE001
        return {"outcome": "step", "error": _first_line(exc)}
    try:
        with torch.no_grad():
            out = model(example)
    except Exception as exc:  # noqa: BLE001
        return {"outcome": "forward", "error": _first_line(exc)}
    if tuple(out.shape) != shape:
        return {"outcome": "forward", "error": f"the output changed shape from {list(shape)} to {list(out.shape)}"}
    after, _ = count_macs(model, spec)
    return {"outcome": "ok", "cut": round(1.0 - after / before, 4), "seconds": round(time.perf_counter() - t0, 1)}


def run_one(source: str, name: str, size: int) -> dict[str, Any]:
    """The recipe on one model in a child process, bounded in time and memory."""
    cmd = [sys.executable, "-m", "benchmarks.tp_alone", source, name, str(size)]
    try:
        done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=LIMIT_S,
                              preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_AS, (LIMIT_BYTES, LIMIT_BYTES)))
    except subprocess.TimeoutExpired:
        return {"outcome": "hang", "error": f"still running after {LIMIT_S} s"}
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode == 0 and lines:
        return json.loads(lines[-1])
    tail = (done.stderr.strip().splitlines() or [""])[-1]
    if "MemoryError" in done.stderr or "std::bad_alloc" in done.stderr or "DefaultCPUAllocator" in done.stderr:
        return {"outcome": "memory", "error": f"over {LIMIT_BYTES >> 30} GB of address space ({tail[:120]})"}
    return {"outcome": "crash", "error": f"exit {done.returncode}: {tail[:160]}"}


def cell(r: dict[str, Any] | None) -> str:
    """The table's words for one outcome."""
    if not r:
        return "-"
    if r["outcome"] == "ok":
        return f"-{r['cut']:.1%}"
    where = {"build": "fails building its pruner", "step": "fails in its step", "forward": "pruned model fails",
             "hang": "hangs", "memory": "runs out of memory", "crash": "crashes"}[r["outcome"]]
    return f"{where} ({r['error'][:70]})" if r["outcome"] in ("build", "step", "forward") else where


if __name__ == "__main__":
    src, model_name, px = sys.argv[1], sys.argv[2], int(sys.argv[3])
    print(json.dumps(probe(src, model_name, px)), flush=True)
