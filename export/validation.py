"""Scoring, timing and gating a deployed artifact; shared by the validate stage and `compress validate`."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np

from export.config import GatesConfig
from export.runtime import Runtime, busy_warning, latency_stats


def _identity(items: Iterable, *_: Any, **__: Any) -> Iterable:
    return items


def accuracy(model: Runtime, batches: Iterable, track: Callable = _identity, predictions: bool = False,
             ) -> dict[str, Any]:
    """Top-1/top-5 in percent of an artifact over (images, labels) batches (and, asked, its top-1 predictions)."""
    c1 = c5 = n = 0
    preds = []
    for x, y in track(batches, "accuracy"):
        logits = model(x.numpy())
        top = np.argsort(-logits, axis=1)[:, : min(5, logits.shape[1])]
        y = y.numpy()
        c1 += int((top[:, 0] == y).sum())
        c5 += int((top == y[:, None]).any(axis=1).sum())
        n += len(y)
        preds.append(top[:, 0])
    if n == 0:
        raise ValueError("the validation split is empty")
    out: dict[str, Any] = {"top1": 100.0 * c1 / n, "top5": 100.0 * c5 / n, "samples": n}
    if predictions:
        out["predictions"] = np.concatenate(preds)
    return out


SETTLE_S = 0.05  # pause before each model's block


def latency(models: dict[str, Runtime], shape: tuple[int, ...], warmup: int, runs: int,
            track: Callable = _identity, blocks: int = 10, block_seconds: float = 0.0) -> dict[str, dict[str, Any]]:
    """Latency of one or more artifacts on the same input, timed in interleaved blocks.

    The runs are cut into `blocks` blocks; in each block every model runs its share back to back (after a short
    pause and one untimed run that wakes its thread pool), the order alternating from block to block, and for
    at least `block_seconds` (so that sub-millisecond models are timed long enough for machine noise to average
    out). Noise that lasts longer than a block hits all models alike, and each block gives one speedup
    estimate, so the spread of the speedup across blocks says how far a single figure can be trusted.
    """
    x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    for m in models.values():
        for _ in range(warmup):
            m.time_once(x)
    blocks = max(1, min(blocks, runs))
    per_block = [runs // blocks + (1 if b < runs % blocks else 0) for b in range(blocks)]
    samples: dict[str, list[float]] = {k: [] for k in models}
    block_medians: dict[str, list[float]] = {k: [] for k in models}
    for b in track(range(blocks), "latency blocks", total=blocks):
        order = list(models) if b % 2 == 0 else list(reversed(models))
        for k in order:
            # the previous model's intra-op threads keep spinning for a while after its last run and would
            # slow this one down (measured: up to 2x on 2 cores); let them park first
            time.sleep(SETTLE_S)
            models[k].time_once(x)
            times: list[float] = []
            start = time.perf_counter()
            while len(times) < per_block[b] or time.perf_counter() - start < block_seconds:
                times.append(models[k].time_once(x))
            samples[k] += times
            block_medians[k].append(float(np.median(times)))
    return {k: {**latency_stats(v), "block_medians": block_medians[k]} for k, v in samples.items()}


# A latency timing taken while other processes held the timing cores is taken again this many times; one that
# stays contended is reported with its caveat (summary.json latency_ms.contended) and cannot pass a latency gate.
CONTENDED_RETRIES = 2


def clean_latency(models: dict[str, Runtime], shape: tuple[int, ...], warmup: int, runs: int, threads: int | None,
                  track: Callable = _identity, blocks: int = 10, block_seconds: float = 0.0,
                  warn: Callable[[str], None] | None = None) -> tuple[dict[str, dict[str, Any]], dict[str, Any]]:
    """`latency` on a quiet machine if it can be had: (timings, conditions). The conditions are MachineLoad's record
    of the last attempt plus `contended` (why the figures cannot be trusted, or None) and `attempts`."""
    from export.runtime import MachineLoad, busy_warning

    for attempt in range(1, CONTENDED_RETRIES + 2):
        with MachineLoad() as load:
            lat = latency(models, shape, warmup, runs, track, blocks=blocks, block_seconds=block_seconds)
        record = load.record()
        busy = busy_warning(record, threads)
        if busy is None or attempt > CONTENDED_RETRIES:
            break
        if warn:
            warn(f"{busy}; timing again ({attempt}/{CONTENDED_RETRIES})")
    return lat, {**record, "contended": busy, "attempts": attempt}


def speedup(lat: dict[str, dict[str, Any]], base: str = "base", compressed: str = "compressed",
            ) -> dict[str, float]:
    """The speedup and its spread: the median, 10th and 90th percentiles of the per-block speedups (each block
    times both models back to back, so its ratio is free of noise slower than a block)."""
    ratios = np.asarray(lat[base]["block_medians"]) / np.asarray(lat[compressed]["block_medians"])
    return {"speedup": float(np.median(ratios)),
            "speedup_low": float(np.percentile(ratios, 10)), "speedup_high": float(np.percentile(ratios, 90)),
            "blocks": int(ratios.size)}


def latency_record(lat: dict[str, dict[str, Any]], rt: Runtime, batch: int, warmup: int,
                   load: dict[str, Any] | None = None) -> dict[str, Any]:
    """summary.json's `latency_ms`: medians, p10/p90 per model, the speedup with its spread, the set-up, and
    how busy the rest of the machine was while timing (`load`, from MachineLoad)."""
    out: dict[str, Any] = {"backend": rt.backend, "batch": batch, "precision": rt.precision}
    for role in ("base", "compressed"):
        if role in lat:
            out[role] = lat[role]["median_ms"]
            out[f"{role}_p10"], out[f"{role}_p90"] = lat[role]["p10_ms"], lat[role]["p90_ms"]
        else:
            out[role] = None
    if "base" in lat:
        out.update(speedup(lat))
    else:
        out.update(speedup=None, speedup_low=None, speedup_high=None)
    out.update(runs={role: v["runs"] for role, v in lat.items()}, warmup=warmup, threads=getattr(rt, "threads", None),
               device=getattr(rt, "device", None))
    if load is not None:
        out["machine"] = {k: v for k, v in load.items() if k != "contended"}
        # why these figures may not hold on the next run (others competed for the timing cores), or None
        out["contended"] = load.get("contended", busy_warning(load, out["threads"]))
    return out


def compare(artifact: np.ndarray, reference: np.ndarray) -> dict[str, Any]:
    """Parity of an artifact's logits with PyTorch's on the same images: absolute and relative (to the largest
    PyTorch logit) difference, and whether the comparison says anything: logits that do not depend on the input
    (a model at initialisation, e.g.) make any two implementations agree."""
    diff = float(np.abs(artifact - reference).max())
    scale = float(np.abs(reference).max())
    spread = float(np.abs(reference - reference.mean(axis=0, keepdims=True)).max())
    out: dict[str, Any] = {"max_abs_diff": diff, "max_rel_diff": diff / max(scale, 1e-12), "meaningful": True}
    if len(reference) > 1 and spread <= 1e-6 * max(scale, 1e-12):
        out.update(meaningful=False, why=f"the PyTorch logits are the same for all {len(reference)} images (spread "
                                         f"{spread:.1e}): they do not depend on the input, so any artifact agrees")
    return out


def check_gates(summary: dict[str, Any], gates: GatesConfig) -> tuple[list[str], list[str]]:
    """(failures, unchecked): each failed gate spelled out, and gates that lacked the figure they need."""
    fails, unchecked = [], []

    def need(value: Any, gate: str, why: str) -> bool:
        if value is None:
            unchecked.append(f"{gate}: {why}")
        return value is not None

    base, comp, lat = summary.get("base"), summary["compressed"], summary["latency_ms"]
    int8 = summary.get("quantized")  # with export.quantize: int8 the INT8 model is what ships: latency gates on it
    if gates.max_top1_drop is not None and need(base, "max_top1_drop", "no base artifact to compare with"):
        drop = base["top1"] - comp["top1"]
        if drop > gates.max_top1_drop:
            fails.append(f"top-1 dropped {drop:.2f} points (base {base['top1']:.2f} -> {comp['top1']:.2f}) > "
                         f"max_top1_drop {gates.max_top1_drop}")
    if gates.max_top1_drop_int8 is not None and need(int8, "max_top1_drop_int8", "export.quantize is not int8"):
        if int8["top1_drop"] > gates.max_top1_drop_int8:
            worst = ", ".join(r["layer"] for r in int8.get("sensitivity", [])[:3])
            hint = (f"; the layers whose quantization costs most: {worst} (keep them in FP32 with "
                    f"export.quantize_exclude)") if worst else ""
            fails.append(f"INT8 top-1 dropped {int8['top1_drop']:.2f} points vs the FP32 compressed model "
                         f"({comp['top1']:.2f} -> {int8['top1']:.2f}) > max_top1_drop_int8 "
                         f"{gates.max_top1_drop_int8}{hint}")
    if int8:
        shipped, what = {**int8["speedup_vs_base"], "median": int8["latency_ms"]}, "INT8 "
    else:
        shipped, what = {"speedup": lat.get("speedup"), "speedup_low": lat.get("speedup_low"),
                         "median": lat["compressed"]}, ""
    busy = lat.get("contended")
    for gate in ("min_speedup", "max_latency_ms"):
        if busy and getattr(gates, gate) is not None:  # a latency gate never passes on a figure that cannot hold
            fails.append(f"{gate}: the latency was timed on a busy machine ({busy}), so it cannot be gated on; "
                         f"re-time the artifacts on an idle machine (`compress validate`)")
    # a busy machine only takes the latency gates away (failed above): the MACs and parity gates never read a
    # timing, and must hold or fail as on a quiet machine
    if not busy and gates.min_speedup is not None and need(shipped["speedup"], "min_speedup",
                                                             "no base artifact to time"):
        low = shipped.get("speedup_low") or shipped["speedup"]  # the gate holds only if the spread's low end clears it
        if low < gates.min_speedup:
            fails.append(f"{what}speedup {shipped['speedup']:.2f}x (low end of its spread {low:.2f}x) < min_speedup "
                         f"{gates.min_speedup}x")
    if gates.min_flops_reduction is not None:
        achieved = -summary.get("delta_pct", {}).get("gflops", 0.0) / 100.0
        if achieved < gates.min_flops_reduction:
            fails.append(f"MACs reduced by {achieved:.1%} < min_flops_reduction {gates.min_flops_reduction:.1%}")
    if not busy and gates.max_latency_ms is not None and shipped["median"] > gates.max_latency_ms:
        fails.append(f"{what}latency {shipped['median']:.3f} ms (median, {lat['backend']}, batch {lat['batch']}) > "
                     f"max_latency_ms {gates.max_latency_ms}")
    return _parity(summary, gates, lat, fails, unchecked)


def _parity(summary: dict[str, Any], gates: GatesConfig, lat: dict[str, Any], fails: list[str],
            unchecked: list[str]) -> tuple[list[str], list[str]]:
    """The parity gates, appended to `fails` and `unchecked`."""
    def need(value: Any, gate: str, why: str) -> bool:
        if value is None:
            unchecked.append(f"{gate}: {why}")
        return value is not None

    # FP32 artifacts must match PyTorch in absolute terms; FP16 engines relative to the logits' scale (trained
    # ImageNet models have logits of 10-20, where half precision legitimately differs by more than 5e-2)
    if lat.get("precision") == "int8":  # an INT8 model's logits differ by design: judged by its decisions
        unchecked.append("max_parity_error: the artifact is INT8; its top-1 agreement and drop are checked instead")
        return fails, unchecked
    fp16 = lat.get("precision") == "fp16"
    limit = gates.max_parity_error_fp16 if fp16 else gates.max_parity_error
    key = "max_parity_error_fp16" if fp16 else "max_parity_error"
    measure = "max_rel_diff" if fp16 else "max_abs_diff"
    parity = summary.get("parity") or {}
    if limit is not None and need(parity.get(measure), key, "no PyTorch model to compare with"):
        if parity.get("meaningful") is False:
            unchecked.append(f"{key}: not meaningful: {parity.get('why')}")
        elif parity[measure] > limit:
            fails.append(f"artifact vs PyTorch {measure} {parity[measure]:.2e} > {key} {limit:.0e}")
    return fails, unchecked


def contended(lat: dict[str, Any]) -> str | None:
    """Why a summary's latency figures cannot be trusted (recorded by validate; older summaries: from their load)."""
    return lat.get("contended") if "contended" in lat else busy_warning(lat.get("machine"), lat.get("threads"))
