"""Stage `validate`: score, check and time the deployed artifact on its runtime; write summary.json."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from export.runtime import open_artifact, resolve_runtime
from export.validation import accuracy, check_gates, compare, latency, latency_record
from pipeline.context import STAGES, SUMMARY, Context, StageResult
from pipeline.models import count_macs
from pipeline.rundir import atomic_json
from stages.export import ENGINE, export_onnx


def _pct(new: float, old: float) -> float:
    return round(100.0 * (new - old) / old, 2) if old else 0.0


def parity_batch(ctx: Context) -> torch.Tensor:
    """The fixed batch on which artifacts are compared with PyTorch: the first validation images."""
    n = min(ctx.config.validate_.parity_samples, len(ctx.splits.validation))
    return torch.stack([ctx.splits.validation[i][0] for i in range(n)])


@STAGES.register("validate")
class Validate:
    name = "validate"
    description = "accuracy, parity vs PyTorch and base vs compressed latency on the deployed runtime; summary.json"

    def run(self, model: nn.Module | None, ctx: Context) -> StageResult:
        cfg, spec, root = ctx.config.validate_, ctx.config.model, ctx.run_dir.root
        engine = ctx.manifest["stages"].get("export", {}).get("metrics", {}).get("tensorrt", {"status": "off"})
        runtime = resolve_runtime(cfg.runtime, engine.get("status") == "built", ctx.device.type)
        if runtime == "tensorrt" and engine.get("status") != "built":
            raise_no_engine(engine)
        files = []
        base_onnx = ctx.stage_dir / "base.onnx"
        export_onnx(ctx.model_of("calibrate").eval(), ctx.config, base_onnx, "base")
        files.append(base_onnx)
        if runtime == "tensorrt":
            from export.tensorrt import build_engine, sidecar_of
            from stages.export import engine_spec

            base_art, comp_art = ctx.stage_dir / "base.engine", root / ENGINE
            build_engine(base_onnx, base_art, engine_spec(ctx.config))
            files += [base_art, sidecar_of(base_art)]
        else:
            base_art, comp_art = base_onnx, root / "model.onnx"
        compressed = open_artifact(comp_art, runtime, cfg.threads)
        base_rt = open_artifact(base_art, runtime, cfg.threads)

        xs = parity_batch(ctx)
        with torch.no_grad():
            ref = model.eval().cpu()(xs).numpy()
        parity_record = compare(compressed(xs.numpy()), ref)
        parity = parity_record["max_abs_diff"]
        acc = accuracy(compressed, ctx.loader("validation"), ctx.track)
        base_acc = accuracy(base_rt, ctx.loader("validation"), ctx.track)  # both measured the same way
        lat = latency({"base": base_rt, "compressed": compressed}, (cfg.batch, spec.in_chans, *spec.input_size),
                      cfg.warmup, cfg.runs, ctx.track, blocks=cfg.blocks, block_seconds=cfg.block_seconds)
        base = ctx.stage_state("calibrate")["base"]
        gflops, params = count_macs(model, spec)
        comp = {"top1": acc["top1"], "top5": acc["top5"], "gflops": gflops, "params_m": params}
        summary: dict[str, Any] = {
            "name": ctx.config.name, "model": f"{spec.source}:{spec.name}",
            "base": {"top1": base_acc["top1"], "top5": base_acc["top5"], "gflops": base["gflops"],
                     "params_m": base["params_m"]},
            "compressed": comp,
            "delta_pct": {"top1": round(comp["top1"] - base["top1"], 2), "gflops": _pct(gflops, base["gflops"]),
                          "params_m": _pct(params, base["params_m"])},
            "accuracy_source": f"{base_art.name} and {comp_art.name} on {runtime}, {acc['samples']} validation "
                               f"images",
            "latency_ms": latency_record(lat, compressed, cfg.batch, cfg.warmup),
            "parity": {**parity_record, "samples": len(xs), "artifact": comp_art.name},
            "artifacts": {"onnx": "model.onnx", "tensorrt": ENGINE if engine.get("status") == "built" else None,
                          "tensorrt_status": engine.get("status"), "tensorrt_reason": engine.get("reason")},
            "removed_blocks": ctx.manifest["stages"].get("layer_truncate", {}).get("metrics", {})
            .get("removed_blocks", []),
        }
        summary["targets"] = targets(ctx, base["gflops"], gflops, summary["latency_ms"])
        fails, unchecked = check_gates(summary, cfg.gates)
        summary["gates"] = {"passed": not fails, "failures": fails}
        if unchecked:
            summary["gates"]["unchecked"] = unchecked
        path = root / SUMMARY
        atomic_json(path, summary)
        for name, t in summary["targets"].items():
            if not t["met"]:
                ctx.log.warning(f"target {name} {t['requested']:g} was NOT met: achieved {t['achieved']:.3f} "
                                f"({t['stop_reason']})")
        metrics = {"top1": acc["top1"], "parity": parity, "speedup": summary["latency_ms"]["speedup"],
                   "runtime": runtime, "gates_passed": not fails,
                   "targets_met": all(t["met"] for t in summary["targets"].values())}
        return StageResult(metrics=metrics, files=[path, *files])


def targets(ctx: Context, base_gflops: float, gflops: float, latency: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Each requested target: requested, achieved (as validated here), met, and why filter_prune stopped."""
    fp = ctx.config.filter_prune
    out: dict[str, dict[str, Any]] = {}
    if not fp.enabled:
        return out
    stop = ctx.manifest["stages"].get("filter_prune", {}).get("metrics", {}).get("stop_reason", "not recorded")
    if fp.target_speedup is not None:
        achieved = latency["speedup"]
        # met within the tolerance the stage stops at; the spread across timing blocks says how firm it is
        out["speedup"] = {"requested": fp.target_speedup, "achieved": round(achieved, 4),
                          "met": bool(achieved >= fp.target_speedup * (1.0 - fp.speedup_tolerance)),
                          "low": round(latency["speedup_low"], 4), "high": round(latency["speedup_high"], 4),
                          "tolerance": fp.speedup_tolerance, "stop_reason": stop,
                          "runtime": latency["backend"], "batch": latency["batch"]}
        return out
    achieved = 1.0 - gflops / base_gflops if base_gflops else 0.0
    # the stage's own rule: MACs within flops_tolerance of the target count as reaching it
    met = gflops <= base_gflops * (1.0 - fp.target_flops_reduction) * (1.0 + fp.flops_tolerance)
    out["flops_reduction"] = {"requested": fp.target_flops_reduction, "achieved": round(achieved, 4),
                              "met": bool(met), "tolerance": fp.flops_tolerance, "stop_reason": stop}
    return out


def raise_no_engine(engine: dict[str, Any]) -> None:
    from pipeline.errors import UserInputError

    why = engine.get("reason") or f"export.tensorrt.mode produced {engine.get('status')!r}"
    raise UserInputError(f"validate.runtime is 'tensorrt' but the export stage built no engine ({why}); set "
                         f"export.tensorrt.mode: required on a machine with the gpu extra, or validate.runtime: auto")
