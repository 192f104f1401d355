"""Latency-targeted pruning: requested vs achieved speedup, and what the measurements cost.

Each model is built with random weights (latency does not depend on them) and pruned by the pipeline's own
Pruner towards `filter_prune.target_speedup` on ONNX Runtime CPU at batch 1 (the validation runtime here), with
the L2 criterion (no data needed) and the pipeline's closed loop (SpeedupGoal). The achieved speedup is then
measured the way `validate` does it: base and pruned exported, timed in 10 interleaved blocks of at least
0.2 s each, the median per-block speedup with its 10th-90th percentile spread. Every run starts from an empty
latency cache; the second ResNet-50 2x run reuses the first one's. Latency efficiency is the validated speedup
over the MACs ratio.
"""

from __future__ import annotations

import contextlib
import os
import statistics
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
from torch.utils.data import DataLoader, TensorDataset

TARGETS = (1.5, 2.0, 3.0)


def _context(cfg, seed: int = 0) -> SimpleNamespace:
    spec = cfg.model
    g = torch.Generator().manual_seed(seed)
    data = TensorDataset(torch.randn(8, spec.in_chans, *spec.input_size, generator=g),
                         torch.randint(0, spec.num_classes, (8,), generator=g))
    return SimpleNamespace(config=cfg, device=torch.device("cpu"), loader=lambda *a, **k: DataLoader(data, 4),
                           track=lambda items, *a, **k: items)


def validated_speedup(base, model, cfg) -> dict[str, float]:
    """The speedup as the validate stage measures it."""
    from export.runtime import OrtModel
    from export.torch2onnx import torch2onnx
    from export.validation import latency, speedup

    spec = cfg.model
    with tempfile.TemporaryDirectory() as tmp:
        rts = {}
        for role, m in (("base", base), ("compressed", model)):
            path = Path(tmp) / f"{role}.onnx"
            torch2onnx(m.eval(), torch.zeros(1, spec.in_chans, *spec.input_size), path,
                       cfg.export.model_copy(update={"dynamic_batch": False}), {})
            rts[role] = OrtModel(path, cfg.validate_.threads)
        lat = latency(rts, (1, spec.in_chans, *spec.input_size), 10, 100, blocks=10, block_seconds=0.2)
    return speedup(lat)


def prune_to_speedup(source: str, name: str, target: float, size: int | None = None,
                     max_steps: int = 16, round_to: int | str = 8, models: dict | None = None) -> dict[str, Any]:
    """Prune a random-weight zoo model to a speedup target; `models`, given, receives base and pruned."""
    from core.models import build_model, clone, count_macs
    from pipeline.config import Config
    from stages._criteria import CRITERIA
    from stages._goals import goal_for
    from stages._latency import LatencyMeter
    from stages._pruner import Pruner, alignment
    from stages.filter_prune import take_step

    model_cfg = {"source": source, "name": name, "num_classes": 1000}
    if size:
        model_cfg["input_size"] = [size, size]
    cfg = Config.model_validate({"name": "lat", "model": model_cfg,
                                 "filter_prune": {"criterion": "l2", "target_speedup": target, "steps": max_steps,
                                                  "p0": 0.15, "round_to": round_to}})
    torch.manual_seed(0)
    model = build_model(cfg.model, with_weights=False).eval()
    base = clone(model)
    g0 = count_macs(model, cfg.model)[0]
    ctx = _context(cfg)
    t0 = time.perf_counter()
    meter = LatencyMeter(cfg)
    pruner = Pruner(CRITERIA.get("l2")(), ctx, alignment(cfg, meter))
    goal = goal_for(ctx, model, meter)
    taken = []
    for t in range(max_steps):
        if goal.reached():
            break
        decision = take_step(pruner, goal, model, t, None, clone(model))
        if decision.removal.units == 0:
            break
        goal.accept(decision)
        taken.append(decision)
    steps, retries = len(taken), sum(d.plan.attempt - 1 for d in taken)
    seconds = time.perf_counter() - t0
    g1 = count_macs(model, cfg.model)[0]
    val = validated_speedup(base, model, cfg)
    if models is not None:
        models.update(base=base, pruned=model, config=cfg)
    record = goal.record([d.measured for d in taken])
    pairs = [(s.get("predicted_since_ms", s["predicted_ms"]), s.get("measured_since_ms", s["measured_ms"]))
             for s in record["steps"] if s["timed"]]  # a timing after untimed steps covers them too
    errors = [abs(m - p) / m for p, m in pairs if p and m > 0]
    return {"model": f"{source}:{name}", "size": cfg.model.input_size[0], "target": target,
            "achieved": val["speedup"], "low": val["speedup_low"], "high": val["speedup_high"],
            "stage_speedup": record["speedup"], "error": val["speedup"] / target - 1.0, "steps": steps,
            "retries": retries,
            "macs_ratio": g0 / g1, "efficiency": val["speedup"] / (g0 / g1), "round_to": pruner.round_to,
            "seconds": seconds, "measure_seconds": record["measure_seconds"], "hits": record["cache_hits"],
            "misses": record["cache_misses"],
            "prediction_error": statistics.median(errors) if errors else None}


@contextlib.contextmanager
def _cache(path: Path):
    """Latency measurements kept in `path` (COMPRESS_CACHE_DIR) for the duration."""
    before = os.environ.get("COMPRESS_CACHE_DIR")
    os.environ["COMPRESS_CACHE_DIR"] = str(path)
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("COMPRESS_CACHE_DIR", None)
        else:
            os.environ["COMPRESS_CACHE_DIR"] = before


def run(quick: bool = False) -> dict[str, Any]:
    from benchmarks.arch import ARCHITECTURES

    # every run starts from an empty cache, or a repeated benchmark would report what an earlier one measured;
    # the second ResNet-50 2x run reuses the first one's
    with tempfile.TemporaryDirectory() as tmp:
        rows = []
        for target in ((2.0,) if quick else TARGETS):
            with _cache(Path(tmp) / f"resnet50-{target}"):
                rows.append(prune_to_speedup("timm", "resnet50", target))
            print(f"latency-target resnet50 {target}x: {rows[-1]['achieved']:.2f}x ({rows[-1]['error']:+.1%})",
                  flush=True)
        archs = []
        for label, (source, name) in ([] if quick else ARCHITECTURES.items()):
            with _cache(Path(tmp) / name):
                archs.append({**prune_to_speedup(source, name, 2.0), "label": label})
            print(f"latency-target {label} 2x: {archs[-1]['achieved']:.2f}x ({archs[-1]['error']:+.1%})", flush=True)
        with _cache(Path(tmp) / "resnet50-2.0"):
            again = prune_to_speedup("timm", "resnet50", 2.0)  # the same run again: measured by the first
    return {"resnet50": rows, "archs": archs, "second_run": again}


def markdown(res: dict[str, Any]) -> str:
    lines = ["## Latency targets", "", (__doc__ or "").split("\n\n", 1)[1].strip(), "",
             "### timm ResNet-50, 3x224x224", "",
             "| target | achieved (validated) | spread | error | steps | MACs ratio | latency efficiency | "
             "latency-model error (median per step) | measuring (s) |", "|---|---|---|---|---|---|---|---|---|"]
    for r in res["resnet50"]:
        pe = "-" if r["prediction_error"] is None else f"{r['prediction_error']:.0%}"
        lines.append(f"| {r['target']:g}x | {r['achieved']:.2f}x | {r['low']:.2f}-{r['high']:.2f} | "
                     f"{r['error']:+.1%} | {r['steps']} | {r['macs_ratio']:.2f}x | {r['efficiency']:.2f} | {pe} | "
                     f"{r['measure_seconds']:.0f} of {r['seconds']:.0f} |")
    if res["archs"]:
        lines += ["", "### The ten published architectures at 2x", "",
                  "| model | input | achieved | spread | error | MACs ratio | efficiency | steps |",
                  "|---|---|---|---|---|---|---|---|"]
        for r in res["archs"]:
            lines.append(f"| {r['label']} | {r['size']} | {r['achieved']:.2f}x | {r['low']:.2f}-{r['high']:.2f} | "
                         f"{r['error']:+.1%} | {r['macs_ratio']:.2f}x | {r['efficiency']:.2f} | {r['steps']} |")
        errs = [abs(r["error"]) for r in res["archs"]]
        lines += ["", f"Median absolute error over the ten: {statistics.median(errs):.1%}; worst {max(errs):.1%}."]
    s = res["second_run"]
    first = next(r for r in res["resnet50"] if r["target"] == 2.0)
    lines += ["", f"A second identical ResNet-50 2x run: {s['hits']} measurements from the cache, {s['misses']} new, "
              f"{s['measure_seconds']:.1f} s measuring (first run: {first['measure_seconds']:.1f} s).", ""]
    return "\n".join(lines) + "\n"
