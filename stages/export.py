"""Stage `export`: the compressed model to ONNX (model.onnx) and, when asked and possible, a TensorRT engine."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import onnx
import torch
from torch import nn

from core._version import __version__
from core.context import STAGES, Context, StageResult
from core.models import count_macs
from core.rundir import now
from export.torch2onnx import torch2onnx

if TYPE_CHECKING:  # the composed schema sits above the stages; only its type is named here
    from pipeline.config import Config

ENGINE = "model.engine"
INT8 = "model.int8.onnx"


def export_onnx(model: nn.Module, config: Config, path: Path, role: str) -> onnx.ModelProto:
    """Export one model of a run with its metadata stamped in."""
    spec, cfg = config.model, config.export
    gflops, params = count_macs(model, spec)
    meta = {"producer": f"idap-compress {__version__}", "run": config.name, "role": role,
            "model": f"{spec.source}:{spec.name}", "input_size": f"{spec.in_chans}x{spec.input_size[0]}x"
            f"{spec.input_size[1]}", "num_classes": str(spec.num_classes), "gflops": f"{gflops:.6f}",
            "params_m": f"{params:.6f}", "created": now()}
    example = torch.zeros(2 if cfg.dynamic_batch else 1, spec.in_chans, *spec.input_size)
    return torch2onnx(model, example, path, cfg, meta)


def engine_spec(config: Config, precision: str | None = None):
    """The engine build asked for by the config (`precision` overrides it: validate's FP32 reference engines)."""
    from export.tensorrt import EngineSpec

    t = config.export.tensorrt
    return EngineSpec(precision or t.precision, t.workspace_gb, t.min_batch, t.opt_batch, t.max_batch,
                      config.runtime.tf32)


def calibration_batches(ctx: Context) -> Iterator[np.ndarray]:
    """The first export.calibration_samples images of the calibration split, in calibrate.batch_size batches."""
    left = ctx.config.export.calibration_samples
    for x, _ in ctx.loader("calibration"):
        if left <= 0:
            return
        yield x[:left].numpy()
        left -= len(x)


def export_int8(model: nn.Module, fp32: Path, ctx: Context) -> dict[str, Any]:
    """model.int8.onnx from the exported FP32 model (export.quantize: int8); the calibration ranges and the
    prepared model stay in the stage folder, where validate finds them to rank the layers that cost accuracy."""
    from export.quantize import int8_model

    cfg = ctx.config.export
    work = ctx.stage_dir / "int8"
    record = int8_model(fp32, ctx.run_dir.root / INT8, ctx.track(calibration_batches(ctx), "INT8 calibration"),
                        cfg.calibration, cfg.calibration_percentile, cfg.quantize_exclude,
                        {n for n, _ in model.named_modules()}, work)
    ctx.log.info(f"INT8: {INT8} written ({record['quantized_layers']} layers quantized, "
                 f"{len(record['excluded_layers'])} kept in FP32, {cfg.calibration} calibration on "
                 f"{record['calibration']['samples']} images, {record['seconds']:.1f} s)")
    return {**record, "onnx": INT8, "workdir": ctx.run_dir.rel(work)}


def export_engine(onnx_path: Path, engine_path: Path, config: Config) -> dict[str, Any]:
    """Build the engine if TensorRT is usable; `required` makes its absence an error, `auto` a recorded skip.

    Returns {"status": "built"|"skipped"|"off", ...} for the stage metrics and summary.json.
    """
    from export import tensorrt

    mode = config.export.tensorrt.mode
    reason = tensorrt.unavailable_reason() if mode != "off" else "export.tensorrt.mode is off"
    if reason is not None:
        if mode == "required":
            tensorrt.require()  # raises the error with the install hint
        for stale in (engine_path, tensorrt.sidecar_of(engine_path)):  # never leave an older engine to be shipped
            stale.unlink(missing_ok=True)
        if mode == "off":
            return {"status": "off"}
        return {"status": "skipped", "reason": f"export.tensorrt.mode is auto and {reason}"}
    side = tensorrt.build_engine(onnx_path, engine_path, engine_spec(config))
    return {"status": "built", "engine": engine_path.name, "precision": side["precision"],
            "tensorrt": side["tensorrt"], "gpu": side["gpu"], "bytes": engine_path.stat().st_size}


@STAGES.register("export")
class Export:
    description = "export ONNX (dynamic batch, metadata, onnx.checker) and a TensorRT engine when configured"

    def run(self, model: nn.Module | None, ctx: Context) -> StageResult:
        path = ctx.run_dir.root / "model.onnx"
        proto = export_onnx(model, ctx.config, path, "compressed")
        opset = next(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx"))
        exporter = {p.key: p.value for p in proto.metadata_props}.get("exporter")
        files = [path]
        int8 = None
        if ctx.config.export.quantize == "int8":
            int8 = export_int8(model, path, ctx)
            files.append(ctx.run_dir.root / INT8)
        else:
            (ctx.run_dir.root / INT8).unlink(missing_ok=True)  # never leave an older INT8 model to be shipped
        # export.tensorrt.precision int8: the engine is built from the QDQ model (explicit quantization)
        source = ctx.run_dir.root / INT8 if ctx.config.export.tensorrt.precision == "int8" else path
        engine = export_engine(source, ctx.run_dir.root / ENGINE, ctx.config)
        if engine["status"] == "built":
            from export.tensorrt import sidecar_of

            files += [ctx.run_dir.root / ENGINE, sidecar_of(ctx.run_dir.root / ENGINE)]
        elif engine["status"] == "skipped":
            ctx.log.warning(f"TensorRT engine skipped: {engine['reason']}")
        metrics = {"onnx": "model.onnx", "opset": opset, "exporter": exporter, "nodes": len(proto.graph.node),
                   "bytes": path.stat().st_size, "tensorrt": engine}
        if int8:
            metrics["int8"] = int8
        return StageResult(metrics=metrics, files=files)
