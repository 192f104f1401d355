"""Stage `validate`: score and time the exported ONNX model through ONNX Runtime; write summary.json."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn

from export.runtime import OrtModel, latency_stats
from pipeline.models import count_macs
from pipeline.rundir import atomic_json
from pipeline.runner import STAGES, SUMMARY, Context, StageResult
from stages.export import export_model


def ort_accuracy(session: OrtModel, ctx: Context) -> dict[str, float]:
    """Top-1/top-5 in percent of an ONNX model on the validation split."""
    c1 = c5 = n = 0
    for x, y in ctx.track(ctx.loader("validation"), "ONNX accuracy"):
        logits = session(x.numpy())
        top = np.argsort(-logits, axis=1)[:, : min(5, logits.shape[1])]
        y = y.numpy()
        c1 += int((top[:, 0] == y).sum())
        c5 += int((top == y[:, None]).any(axis=1).sum())
        n += len(y)
    return {"top1": 100.0 * c1 / n, "top5": 100.0 * c5 / n}


def measure_latency(models: dict[str, OrtModel], ctx: Context) -> dict[str, dict[str, float]]:
    """Batch-N latency of several models, runs interleaved so machine noise hits all alike."""
    cfg, spec = ctx.config.validate_, ctx.config.model
    x = np.random.default_rng(0).standard_normal((cfg.batch, spec.in_chans, *spec.input_size)).astype(np.float32)
    for m in models.values():
        for _ in range(cfg.warmup):
            m.time_once(x)
    samples: dict[str, list[float]] = {k: [] for k in models}
    for i in ctx.track(range(cfg.runs), "latency runs", total=cfg.runs):
        order = list(models) if i % 2 == 0 else list(reversed(models))
        for k in order:
            samples[k].append(models[k].time_once(x))
    return {k: latency_stats(v) for k, v in samples.items()}


def check_gates(summary: dict[str, Any], ctx: Context) -> list[str]:
    """Each failed gate spelled out; empty when all pass."""
    g, fails = ctx.config.validate_.gates, []
    drop = summary["base"]["top1"] - summary["compressed"]["top1"]
    if g.max_top1_drop is not None and drop > g.max_top1_drop:
        fails.append(f"top-1 dropped {drop:.2f} points > max_top1_drop {g.max_top1_drop}")
    lat = summary["latency_ms"]
    if g.min_speedup is not None and lat["speedup"] < g.min_speedup:
        fails.append(f"speedup {lat['speedup']:.2f}x < min_speedup {g.min_speedup}x")
    if g.max_latency_ms is not None and lat["compressed"] > g.max_latency_ms:
        fails.append(f"latency {lat['compressed']:.3f} ms > max_latency_ms {g.max_latency_ms}")
    if g.max_parity_error is not None and summary["parity"]["max_abs_diff"] > g.max_parity_error:
        fails.append(f"ONNX vs PyTorch max_abs_diff {summary['parity']['max_abs_diff']:.2e} > "
                     f"max_parity_error {g.max_parity_error:.0e}")
    return fails


def _pct(new: float, old: float) -> float:
    return round(100.0 * (new - old) / old, 2) if old else 0.0


@STAGES.register("validate")
class Validate:
    name = "validate"
    description = "ONNX Runtime accuracy, parity vs PyTorch, base vs compressed latency; summary.json"

    def run(self, model: nn.Module | None, ctx: Context) -> StageResult:
        cfg, spec = ctx.config.validate_, ctx.config.model
        compressed = OrtModel(ctx.run_dir.root / "model.onnx", cfg.threads)
        base_path = ctx.stage_dir / "base.onnx"
        export_model(ctx.model_of("calibrate").eval(), ctx, base_path, "base")
        base_ort = OrtModel(base_path, cfg.threads)
        xs = torch.stack([ctx.splits.validation[i][0] for i in range(min(cfg.parity_samples,
                                                                          len(ctx.splits.validation)))])
        with torch.no_grad():
            ref = model.eval().cpu()(xs).numpy()
        parity = float(np.abs(compressed(xs.numpy()) - ref).max())
        acc = ort_accuracy(compressed, ctx)
        lat = measure_latency({"base": base_ort, "compressed": compressed}, ctx)
        base = ctx.stage_state("calibrate")["base"]
        gflops, params = count_macs(model, spec)
        comp = {**acc, "gflops": gflops, "params_m": params}
        summary: dict[str, Any] = {
            "name": ctx.config.name, "model": f"{spec.source}:{spec.name}",
            "base": {k: base[k] for k in ("top1", "top5", "gflops", "params_m")},
            "compressed": comp,
            "delta_pct": {"top1": round(comp["top1"] - base["top1"], 2), "gflops": _pct(gflops, base["gflops"]),
                          "params_m": _pct(params, base["params_m"])},
            "latency_ms": {"backend": compressed.backend, "batch": cfg.batch, "precision": "fp32",
                           "base": lat["base"]["median_ms"], "compressed": lat["compressed"]["median_ms"],
                           "speedup": lat["base"]["median_ms"] / lat["compressed"]["median_ms"],
                           "base_p90": lat["base"]["p90_ms"], "compressed_p90": lat["compressed"]["p90_ms"],
                           "runs": cfg.runs, "warmup": cfg.warmup},
            "parity": {"max_abs_diff": parity, "samples": len(xs)},
            "artifacts": {"onnx": "model.onnx", "tensorrt": None},
            "removed_blocks": ctx.manifest["stages"].get("layer_truncate", {}).get("metrics", {})
            .get("removed_blocks", []),
        }
        fails = check_gates(summary, ctx)
        summary["gates"] = {"passed": not fails, "failures": fails}
        path = ctx.run_dir.root / SUMMARY
        atomic_json(path, summary)
        metrics = {"top1": acc["top1"], "parity": parity, "speedup": summary["latency_ms"]["speedup"],
                   "gates_passed": not fails}
        return StageResult(metrics=metrics, files=[path, base_path])
