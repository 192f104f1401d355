"""Stage `export`: the compressed model to ONNX (model.onnx at the run directory's top)."""

from __future__ import annotations

import onnx
import torch
from torch import nn

import pipeline
from export.torch2onnx import torch2onnx
from pipeline.models import count_macs
from pipeline.rundir import now
from pipeline.runner import STAGES, Context, StageResult


def export_model(model: nn.Module, ctx: Context, path, role: str) -> onnx.ModelProto:
    """Export one model of this run with its metadata stamped in."""
    spec, cfg = ctx.config.model, ctx.config.export
    gflops, params = count_macs(model, spec)
    meta = {"producer": f"idap-compress {pipeline.__version__}", "run": ctx.config.name, "role": role,
            "model": f"{spec.source}:{spec.name}", "input_size": f"{spec.in_chans}x{spec.input_size[0]}x"
            f"{spec.input_size[1]}", "num_classes": str(spec.num_classes), "gflops": f"{gflops:.6f}",
            "params_m": f"{params:.6f}", "created": now()}
    example = torch.zeros(2 if cfg.dynamic_batch else 1, spec.in_chans, *spec.input_size)
    return torch2onnx(model, example, path, cfg, meta)


@STAGES.register("export")
class Export:
    name = "export"
    description = "export the compressed model to ONNX (dynamic batch, metadata, onnx.checker)"

    def run(self, model: nn.Module | None, ctx: Context) -> StageResult:
        path = ctx.run_dir.root / "model.onnx"
        proto = export_model(model, ctx, path, "compressed")
        opset = next(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx"))
        exporter = {p.key: p.value for p in proto.metadata_props}.get("exporter")
        metrics = {"onnx": "model.onnx", "opset": opset, "exporter": exporter, "nodes": len(proto.graph.node),
                   "bytes": path.stat().st_size}
        return StageResult(metrics=metrics, files=[path])
