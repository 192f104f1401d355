"""Stage `validate`: score, check and time the deployed artifact on its runtime; write summary.json."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import Field
from torch import nn

from core.config import Section
from core.context import STAGES, SUMMARY, Context, StageResult
from core.errors import UserInputError
from core.models import count_macs
from core.records import FIGURES, ReportSection, RunRecords, Table, dynamics_row
from core.rundir import atomic_json, now, sha256
from export.config import INT8_RUNTIMES, GatesConfig
from export.runtime import TorchModel, int8_saturation, open_artifact
from export.target import resolve
from export.validation import accuracy, check_gates, clean_latency, compare, latency_record, speedup
from stages.export import ENGINE, INT8, export_onnx


class ValidateConfig(Section):
    """Accuracy, parity and latency of the deployed artifact on the runtime that ships it."""

    runtime: Literal["auto", "onnxruntime-cpu", "onnxruntime-cuda", "tensorrt", "torch-cuda"] = Field(
        "auto", description="auto: on the CPU ONNX Runtime; on CUDA the TensorRT engine when one is built, else "
        "ONNX Runtime's CUDA provider, else torch-cuda (PyTorch timed on the GPU with CUDA events, the ONNX file "
        "scored on ONNX Runtime's CPU provider). summary.json `target` says what it resolved to")

    warmup: int = Field(20, ge=0, description="untimed runs per model before timing")
    runs: int = Field(100, ge=1, description="timed runs per model, at least")
    block_seconds: float = Field(0.2, ge=0.0, description="each model's timing block lasts at least this long "
                                 "(sub-millisecond models get more runs)")
    blocks: int = Field(10, ge=1, description="the runs are timed in this many interleaved blocks; the speedup's "
                        "spread is taken across blocks")
    batch: int = Field(1, ge=1, description="latency batch")
    threads: int | None = Field(None, ge=1, description="ONNX Runtime intra-op threads (default: every core of "
                                "the process's CPU affinity)")
    parity_samples: int = Field(16, ge=1, description="validation images compared between PyTorch and the "
                                "artifact")
    gates: GatesConfig = Field(default_factory=GatesConfig)


def _pct(new: float, old: float) -> float:
    return round(100.0 * (new - old) / old, 2) if old else 0.0


def parity_batch(ctx: Context) -> torch.Tensor:
    """The fixed batch on which artifacts are compared with PyTorch: the first validation images."""
    n = min(ctx.config.validate_.parity_samples, len(ctx.splits.validation))
    return torch.stack([ctx.splits.validation[i][0] for i in range(n)])


@STAGES.register("validate")
class Validate:
    description = "accuracy, parity vs PyTorch and base vs compressed latency on the deployed runtime; summary.json"

    @staticmethod
    def dynamics(rec: RunRecords, before: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """The report's dynamics row: the deployed artifact as validated."""
        if rec.summary is None:
            return []
        c = rec.summary["compressed"]
        return [dynamics_row("validate", f"deployed ({rec.summary['latency_ms']['backend']})", c["params_m"],
                             c["gflops"], c["top1"], c["top5"], True)]

    @staticmethod
    def report(rec: RunRecords) -> list[ReportSection]:
        """The gates and how the latency was taken (the figures themselves head the report)."""
        s = rec.summary
        if s is None:
            return []
        g, lat = s["gates"], s["latency_ms"]
        text = [f"Gates {'passed' if g['passed'] else '**failed**'}."]
        text += [f"Failed: {f}" for f in g.get("failures", [])]
        text += [f"Not checked: {u}" for u in g.get("unchecked", [])]
        tables = []
        if rec.config is not None:
            tables.append(Table(["gate", "threshold"], [[k, "not set" if v is None else str(v)]
                                                        for k, v in rec.config.validate_.gates.model_dump().items()]))
        runs = lat["runs"]
        runs = " and ".join(f"{n} ({role})" for role, n in runs.items()) if isinstance(runs, dict) else str(runs)
        return [ReportSection("Gates", text, tables), ReportSection("Latency", [
            f"{runs} timed runs after {lat['warmup']} warm-up runs per model, in {lat.get('blocks', 1)} interleaved "
            f"blocks (base and compressed alternate block by block); the speedup's spread is the 10th-90th "
            f"percentile of the per-block speedups, and `min_speedup` gates on its low end. "
            f"{lat.get('threads') or '?'} threads on {lat.get('device') or 'an unrecorded device'}."], [],
            [(f"{FIGURES}/latency.png", "median latency, p10-p90 whiskers")])]

    def run(self, model: nn.Module | None, ctx: Context) -> StageResult:
        cfg, spec, root = ctx.config.validate_, ctx.config.model, ctx.run_dir.root
        exported = ctx.manifest["stages"].get("export", {}).get("metrics", {})
        engine = exported.get("tensorrt", {"status": "off"})
        target = ctx.target or resolve(ctx.config)  # the one the run resolved; the pruning loop timed on it too
        if target.runtime == "tensorrt" and engine.get("status") != "built":
            if cfg.runtime != "auto" or ctx.config.export.tensorrt.mode == "required":
                raise_no_engine(engine)
            target = target.without_engine(ctx.config.export.quantize == "int8")
            ctx.log.warning(f"no TensorRT engine was built ({engine.get('reason') or engine.get('status')}): "
                            f"validating on {target.runtime}")
        runtime = target.runtime
        # torch-cuda: the files are scored on ONNX Runtime's CPU provider, PyTorch is timed on the GPU
        scoring = "onnxruntime-cpu" if runtime == "torch-cuda" else runtime
        int8 = exported.get("int8") if ctx.config.export.quantize == "int8" else None
        if ctx.config.export.quantize == "int8":
            check_int8(runtime, int8, root)
        files = []
        base_onnx = ctx.stage_dir / "base.onnx"
        export_onnx(ctx.model_of("calibrate").eval(), ctx.config, base_onnx, "base")
        files.append(base_onnx)
        arts = artifacts(ctx, scoring, base_onnx, int8 is not None, files)
        tf32 = ctx.config.runtime.tf32
        rts = {role: open_artifact(path, scoring, cfg.threads, tf32) for role, path in arts.items()}
        compressed = rts["compressed"]
        timers = rts if runtime != "torch-cuda" else {
            "base": TorchModel(ctx.model_of("calibrate"), "cuda", tf32), "compressed": TorchModel(model, "cuda", tf32)}

        xs = parity_batch(ctx)
        with torch.no_grad():
            ref = model.eval().cpu()(xs).numpy()
        parity_record = compare(compressed(xs.numpy()), ref)
        parity = parity_record["max_abs_diff"]
        # every artifact scored the same way, on the same images
        scores = {role: accuracy(rt, ctx.loader("validation"), ctx.track, predictions=True)
                  for role, rt in rts.items()}
        acc, base_acc = scores["compressed"], scores["base"]
        lat, load = clean_latency(timers, (cfg.batch, spec.in_chans, *spec.input_size), cfg.warmup, cfg.runs,
                                  getattr(timers["compressed"], "threads", None), ctx.track, blocks=cfg.blocks,
                                  block_seconds=cfg.block_seconds, warn=ctx.log.warning)
        if load["contended"]:
            ctx.log.warning(f"CONTENDED: {load['contended']} (still after {load['attempts'] - 1} retries); the "
                            f"latency figures carry this caveat and no latency gate can pass on them")
        base = ctx.stage_state("calibrate")["base"]
        gflops, params = count_macs(model, spec)
        comp = {"top1": acc["top1"], "top5": acc["top5"], "gflops": gflops, "params_m": params,
                "bytes": arts["compressed"].stat().st_size}
        summary: dict[str, Any] = {
            "name": ctx.config.name, "model": f"{spec.source}:{spec.name}",
            "base": {"top1": base_acc["top1"], "top5": base_acc["top5"], "gflops": base["gflops"],
                     "params_m": base["params_m"], "bytes": arts["base"].stat().st_size,
                     "artifact": arts["base"].name},
            "compressed": comp,
            "delta_pct": {"top1": round(comp["top1"] - base["top1"], 2), "gflops": _pct(gflops, base["gflops"]),
                          "params_m": _pct(params, base["params_m"])},
            "accuracy_source": f"{', '.join(p.name for p in arts.values())} on {scoring}, {acc['samples']} "
                               f"validation images",
            "latency_ms": latency_record(lat, timers["compressed"], cfg.batch, cfg.warmup, load),
            "parity": {**parity_record, "samples": len(xs), "artifact": arts["compressed"].name},
            "artifacts": {"onnx": "model.onnx", "tensorrt": ENGINE if engine.get("status") == "built" else None,
                          "tensorrt_status": engine.get("status"), "tensorrt_reason": engine.get("reason"),
                          "int8": INT8 if int8 else None},
            "removed_blocks": ctx.manifest["stages"].get("layer_truncate", {}).get("metrics", {})
            .get("removed_blocks", []),
        }
        if int8:
            summary["quantized"] = quantized_record(scores, lat, arts["quantized"], rts["quantized"], int8)
            saturates = int8_saturation() if rts["quantized"].backend == "onnxruntime-cpu" else None
            if saturates:  # the figure is this CPU's, not the model's: say so beside it
                summary["quantized"]["caveat"] = saturates
                ctx.log.warning(f"INT8 accuracy: {saturates}")
            gate = cfg.gates.max_top1_drop_int8
            if gate is not None and summary["quantized"]["top1_drop"] > gate:
                summary["quantized"]["sensitivity"] = layer_sensitivity(ctx, int8, model)
        summary["targets"] = targets(ctx, base["gflops"], gflops, summary["latency_ms"])
        fails, unchecked = check_gates(summary, cfg.gates)
        summary["gates"] = {"passed": not fails, "failures": fails}
        if unchecked:
            summary["gates"]["unchecked"] = unchecked
        # where the artifact was deployed and timed: the target the run resolved once from the config and this
        # machine (the pruning loop timed on it too), with what validate opened
        summary["target"] = {**target.record(), "precision": compressed.precision,
                             "threads": getattr(timers["compressed"], "threads", None), "scored_on": scoring}
        # which run this summary describes: a re-run marks it superseded (current: false) before it changes anything
        summary["run"] = {"status": "complete", "current": True, "fingerprint": ctx.config_hash,
                          "finished": now(), "onnx_sha256": sha256(root / "model.onnx")
                          if (root / "model.onnx").is_file() else None}
        path = root / SUMMARY
        atomic_json(path, summary)
        for name, t in summary["targets"].items():
            if not t["met"]:
                ctx.log.warning(f"target {name} {t['requested']:g} was NOT met: achieved {t['achieved']:.3f} "
                                f"({t.get('short_because', {}).get('reason') or t['stop_reason']})")
        metrics = {"top1": acc["top1"], "parity": parity, "speedup": summary["latency_ms"]["speedup"],
                   "runtime": runtime, "gates_passed": not fails,
                   "targets_met": all(t["met"] for t in summary["targets"].values())}
        if int8:
            q = summary["quantized"]
            metrics.update(int8_top1=q["top1"], int8_speedup=q["speedup_vs_base"]["speedup"])
            ctx.log.info(f"INT8 {q['artifact']}: top-1 {q['top1']:.2f} (FP32 compressed {comp['top1']:.2f}, "
                         f"agreement {q['agreement']:.1f}%), {q['latency_ms']:.3g} ms, "
                         f"{q['speedup_vs_base']['speedup']:.2f}x vs base, "
                         f"{q['speedup_vs_compressed']['speedup']:.2f}x vs FP32 compressed")
        return StageResult(metrics=metrics, files=[path, *files])


def check_int8(runtime: str, int8: dict[str, Any] | None, root: Path) -> None:
    """The INT8 model exists and the runtime runs it in INT8."""
    if runtime not in INT8_RUNTIMES:
        raise UserInputError(f"export.quantize: int8 cannot be validated on {runtime}: ONNX Runtime's CUDA provider "
                             f"has no INT8 convolutions (it would dequantize and time FP32 work); set "
                             f"validate.runtime to one of {', '.join(INT8_RUNTIMES)}, or export.quantize: null")
    if not int8 or not (root / INT8).is_file():
        raise UserInputError(f"export.quantize is int8 but {root / INT8} is missing (the export stage ran without "
                             f"it, or the file was removed); re-run the pipeline --from export")


def artifacts(ctx: Context, runtime: str, base_onnx: Path, quantized: bool, files: list[Path]) -> dict[str, Path]:
    """base, compressed (the float model) and quantized (INT8) artifacts in the runtime's form. On TensorRT the
    shipped engine serves the role its precision fits, and each other role gets an engine built here: base and
    the float model at the engine's float precision (FP32 when the shipped engine is INT8), INT8 from the QDQ
    model."""
    root = ctx.run_dir.root
    if runtime != "tensorrt":
        out = {"base": base_onnx, "compressed": root / "model.onnx"}
        if quantized:
            out["quantized"] = root / INT8
        return out
    from export.tensorrt import build_engine, sidecar_of
    from stages.export import engine_spec

    shipped_int8 = ctx.config.export.tensorrt.precision == "int8"
    floating = "fp32" if shipped_int8 else ctx.config.export.tensorrt.precision
    todo = {"base": (base_onnx, floating)}
    if shipped_int8:
        todo["compressed"] = (root / "model.onnx", floating)
    elif quantized:
        todo["quantized"] = (root / INT8, "int8")
    out = {"compressed": root / ENGINE} if not shipped_int8 else {"quantized": root / ENGINE}
    for role, (source, precision) in todo.items():
        path = ctx.stage_dir / f"{role}.engine"
        build_engine(source, path, engine_spec(ctx.config, precision))
        files += [path, sidecar_of(path)]
        out[role] = path
    return {role: out[role] for role in ("base", "compressed", "quantized") if role in out}


def quantized_record(scores: dict[str, dict[str, Any]], lat: dict[str, dict[str, Any]], path: Path, rt,
                     int8: dict[str, Any]) -> dict[str, Any]:
    """summary.json's `quantized`: the INT8 artifact's accuracy (and its top-1 agreement with the FP32 compressed
    model: INT8 parity is judged by decisions, not logits), latency and speedups, and how it was quantized."""
    q, c = scores["quantized"], scores["compressed"]
    return {"artifact": path.name, "precision": rt.precision, "runtime": rt.backend, "top1": q["top1"],
            "top5": q["top5"], "top1_drop": round(c["top1"] - q["top1"], 4),
            "agreement": round(100.0 * float((q["predictions"] == c["predictions"]).mean()), 4),
            "latency_ms": lat["quantized"]["median_ms"], "latency_p10": lat["quantized"]["p10_ms"],
            "latency_p90": lat["quantized"]["p90_ms"], "speedup_vs_base": speedup(lat, "base", "quantized"),
            "speedup_vs_compressed": speedup(lat, "compressed", "quantized"), "bytes": path.stat().st_size,
            "calibration": int8["calibration"], "quantized_layers": int8["quantized_layers"],
            "excluded_layers": int8["excluded_layers"]}


def layer_sensitivity(ctx: Context, int8: dict[str, Any], model: nn.Module, top: int = 5) -> list[dict[str, Any]]:
    """The layers whose quantization costs most (each quantized alone on calibration images, ONNX Runtime CPU)."""
    from export.quantize import layers_of, sensitivity
    from stages.export import calibration_batches

    work = ctx.run_dir.root / int8["workdir"]
    prepared, ranges = work / "prepared.onnx", work / "ranges.json"
    if not prepared.is_file() or not ranges.is_file():
        raise UserInputError(f"the INT8 calibration files in {work} are missing; re-run the pipeline --from export")
    layers = layers_of(prepared, {n for n, _ in model.named_modules()})
    excluded = set(int8["excluded_nodes"])
    layers = {k: v for k, v in layers.items() if not set(v) & excluded}
    batches = []
    for x in calibration_batches(ctx):
        batches.append(x)
        if sum(len(b) for b in batches) >= SENSITIVITY_SAMPLES:
            break
    ctx.log.info(f"INT8 top-1 drop exceeds validate.gates.max_top1_drop_int8: quantizing each of {len(layers)} "
                 f"layers alone to find the ones that cost most")
    rows = sensitivity(prepared, ranges, int8["calibration"]["method"], layers, batches, top,
                       ctx.config.validate_.threads)
    for r in rows:
        ctx.log.info(f"INT8 sensitivity: {r['layer']}: top-1 agreement {100 * r['agreement']:.1f}%, logit error "
                     f"{r['logit_error']:.3f}")
    return rows


SENSITIVITY_SAMPLES = 128


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
        met = bool(achieved >= fp.target_speedup * (1.0 - fp.speedup_tolerance))
        out["speedup"] = {"requested": fp.target_speedup, "achieved": round(achieved, 4), "met": met,
                          "low": round(latency["speedup_low"], 4), "high": round(latency["speedup_high"], 4),
                          "tolerance": fp.speedup_tolerance, "stop_reason": stop,
                          "runtime": latency["backend"], "batch": latency["batch"],
                          "contended": latency.get("contended")}
        if not met:
            state = ctx.stage_state("filter_prune") if "filter_prune" in ctx.manifest["stages"] else {}
            out["speedup"]["short_because"] = shortfall(stop, state, fp, latency)
        return out
    achieved = 1.0 - gflops / base_gflops if base_gflops else 0.0
    # the stage's own rule: MACs within flops_tolerance of the target count as reaching it
    met = gflops <= base_gflops * (1.0 - fp.target_flops_reduction) * (1.0 + fp.flops_tolerance)
    out["flops_reduction"] = {"requested": fp.target_flops_reduction, "achieved": round(achieved, 4),
                              "met": bool(met), "tolerance": fp.flops_tolerance, "stop_reason": stop}
    return out


def shortfall(stop: str, state: dict[str, Any], fp: Any, latency: dict[str, Any]) -> dict[str, Any]:
    """Why a speedup target was not met, in words, with what of the base latency width pruning cannot remove
    (from filter_prune's profiles): the time outside conv/linear layers that pruning did not shrink (pooling,
    reshapes, per-op dispatch: the smaller of the base's and the last step's), the time of groups held whole,
    and what the per-layer cap leaves of every prunable layer. `ceiling` is the speedup if all of that stayed and
    everything else went: a target above it needs truncation or another runtime, not more steps.

    The ceiling is an upper bound, so that "at most" is true: a layer at its cap keeps (1-r) of its outputs and
    at most (1-r) of its inputs, so at most (1-r)^2 of its work, and its time falls no further than its work
    (fixed per-kernel costs only slow the fall). Charged (1-r) instead, a short-recovery demo run was told its
    10.97x target was beyond "at most about 8.84x" while validate measured 10.40x and a MACs-targeted run of the
    same model 16x. Element-wise ops over pruned tensors shrink with width too, hence the last profile's share.
    A ceiling below the speed validate measured is contradicted by the run itself and is not claimed."""
    lat = state.get("latency") or {}
    base, layers = lat.get("base_ms"), lat.get("layers_before") or {}
    held = {layer for h in state.get("held_whole", []) for layer in h.get("layers", [])}
    out: dict[str, Any] = {}
    if base:
        fixed = lat.get("other_ms_before", 0.0)
        if lat.get("other_ms_after") is not None:
            fixed = min(fixed, lat["other_ms_after"])
        held_ms = sum(ms for layer, ms in layers.items() if layer in held)
        keep = 1.0 - fp.max_layer_pruning_ratio
        capped = sum(ms for layer, ms in layers.items() if layer not in held) * keep * keep
        floor = fixed + held_ms + capped
        out = {"fixed_ms": round(fixed, 4), "fixed_share": round(fixed / base, 4), "held_ms": round(held_ms, 4),
               "capped_ms": round(capped, 4), "ceiling": round(base / floor, 3) if floor > 0 else None}
    ceiling = out.get("ceiling")
    if "rolled back" in stop:
        why = "the accuracy budget: the next step lost more top-1 than filter_prune.max_accuracy_drop allows"
    elif "minimum width" in stop:
        why = "the per-layer caps: every prunable layer is at filter_prune.max_layer_pruning_ratio"
    elif stop.startswith("took all"):
        why = "the step limit: filter_prune.steps ran out before the target"
    elif stop.startswith("reached"):
        why = (f"validate measured {latency['speedup']:.2f}x where the pruning loop measured the target "
               f"(the loop's timing was shorter; see the spread)")
    else:
        why = stop
    if ceiling is not None and latency["speedup"] <= ceiling < fp.target_speedup:
        why += (f"; and the target is beyond what width pruning can reach on this runtime: "
                f"{out['fixed_share']:.0%} of the base latency is outside conv/linear layers and did not shrink "
                f"with width, so at most about "
                f"{ceiling:.2f}x with every layer at its cap (add layer truncation, a larger input or batch, or "
                f"another runtime)")
    return {"reason": why, **out}


def raise_no_engine(engine: dict[str, Any]) -> None:
    why = engine.get("reason") or f"export.tensorrt.mode produced {engine.get('status')!r}"
    raise UserInputError(f"validate.runtime is 'tensorrt' but the export stage built no engine ({why}); set "
                         f"export.tensorrt.mode: required on a machine with the gpu extra, or validate.runtime: auto")
