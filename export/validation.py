"""Scoring, timing and gating a deployed artifact; shared by the validate stage and `compress validate`."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import numpy as np

from export.runtime import Runtime, latency_stats
from pipeline.config import GatesConfig


def _identity(items: Iterable, *_: Any, **__: Any) -> Iterable:
    return items


def accuracy(model: Runtime, batches: Iterable, track: Callable = _identity) -> dict[str, float]:
    """Top-1/top-5 in percent of an artifact over (images, labels) batches."""
    c1 = c5 = n = 0
    for x, y in track(batches, "accuracy"):
        logits = model(x.numpy())
        top = np.argsort(-logits, axis=1)[:, : min(5, logits.shape[1])]
        y = y.numpy()
        c1 += int((top[:, 0] == y).sum())
        c5 += int((top == y[:, None]).any(axis=1).sum())
        n += len(y)
    if n == 0:
        raise ValueError("the validation split is empty")
    return {"top1": 100.0 * c1 / n, "top5": 100.0 * c5 / n, "samples": n}


def latency(models: dict[str, Runtime], shape: tuple[int, ...], warmup: int, runs: int,
            track: Callable = _identity) -> dict[str, dict[str, float]]:
    """Latency of one or more artifacts on the same input; runs interleaved so machine noise hits all alike."""
    x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    for m in models.values():
        for _ in range(warmup):
            m.time_once(x)
    samples: dict[str, list[float]] = {k: [] for k in models}
    for i in track(range(runs), "latency runs", total=runs):
        order = list(models) if i % 2 == 0 else list(reversed(models))
        for k in order:
            samples[k].append(models[k].time_once(x))
    return {k: latency_stats(v) for k, v in samples.items()}


def check_gates(summary: dict[str, Any], gates: GatesConfig) -> tuple[list[str], list[str]]:
    """(failures, unchecked): each failed gate spelled out, and gates that lacked the figure they need."""
    fails, unchecked = [], []

    def need(value: Any, gate: str, why: str) -> bool:
        if value is None:
            unchecked.append(f"{gate}: {why}")
        return value is not None

    base, comp, lat = summary.get("base"), summary["compressed"], summary["latency_ms"]
    if gates.max_top1_drop is not None and need(base, "max_top1_drop", "no base artifact to compare with"):
        drop = base["top1"] - comp["top1"]
        if drop > gates.max_top1_drop:
            fails.append(f"top-1 dropped {drop:.2f} points (base {base['top1']:.2f} -> {comp['top1']:.2f}) > "
                         f"max_top1_drop {gates.max_top1_drop}")
    if gates.min_speedup is not None and need(lat.get("speedup"), "min_speedup", "no base artifact to time"):
        if lat["speedup"] < gates.min_speedup:
            fails.append(f"speedup {lat['speedup']:.2f}x < min_speedup {gates.min_speedup}x")
    if gates.max_latency_ms is not None and lat["compressed"] > gates.max_latency_ms:
        fails.append(f"latency {lat['compressed']:.3f} ms (median, {lat['backend']}, batch {lat['batch']}) > "
                     f"max_latency_ms {gates.max_latency_ms}")
    fp16 = lat.get("precision") == "fp16"
    limit = gates.max_parity_error_fp16 if fp16 else gates.max_parity_error
    key = "max_parity_error_fp16" if fp16 else "max_parity_error"
    parity = summary.get("parity") or {}
    if limit is not None and need(parity.get("max_abs_diff"), key, "no PyTorch model to compare with"):
        if parity["max_abs_diff"] > limit:
            fails.append(f"artifact vs PyTorch max_abs_diff {parity['max_abs_diff']:.2e} > {key} {limit:.0e}")
    return fails, unchecked
