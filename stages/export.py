"""Stage `export`: the compressed model to ONNX (model.onnx) and, when asked and possible, a TensorRT engine."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import onnx
import torch
from torch import nn

from export.torch2onnx import torch2onnx
from pipeline._version import __version__
from pipeline.config import Config
from pipeline.context import STAGES, Context, StageResult
from pipeline.models import count_macs
from pipeline.rundir import now

ENGINE = "model.engine"


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


def engine_spec(config: Config):
    from export.tensorrt import EngineSpec

    t = config.export.tensorrt
    return EngineSpec(t.precision, t.workspace_gb, t.min_batch, t.opt_batch, t.max_batch)


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
    name = "export"
    description = "export ONNX (dynamic batch, metadata, onnx.checker) and a TensorRT engine when configured"

    def run(self, model: nn.Module | None, ctx: Context) -> StageResult:
        path = ctx.run_dir.root / "model.onnx"
        proto = export_onnx(model, ctx.config, path, "compressed")
        opset = next(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx"))
        exporter = {p.key: p.value for p in proto.metadata_props}.get("exporter")
        files = [path]
        engine = export_engine(path, ctx.run_dir.root / ENGINE, ctx.config)
        if engine["status"] == "built":
            from export.tensorrt import sidecar_of

            files += [ctx.run_dir.root / ENGINE, sidecar_of(ctx.run_dir.root / ENGINE)]
        elif engine["status"] == "skipped":
            ctx.log.warning(f"TensorRT engine skipped: {engine['reason']}")
        metrics = {"onnx": "model.onnx", "opset": opset, "exporter": exporter, "nodes": len(proto.graph.node),
                   "bytes": path.stat().st_size, "tensorrt": engine}
        return StageResult(metrics=metrics, files=files)
