"""torch -> ONNX: configurable opset, dynamic batch axis, named inputs/outputs, metadata, checked."""

from __future__ import annotations

import contextlib
import io
import warnings
from pathlib import Path

import onnx
import torch
from torch import nn

from pipeline.config import ExportConfig
from pipeline.errors import UserInputError
from pipeline.rundir import atomic_write


def _names(cfg: ExportConfig) -> dict[str, list[str]]:
    return {"input_names": [cfg.input_name], "output_names": [cfg.output_name]}


def _torchscript(model: nn.Module, example: torch.Tensor, cfg: ExportConfig) -> onnx.ModelProto:
    axes = {cfg.input_name: {0: "batch"}, cfg.output_name: {0: "batch"}} if cfg.dynamic_batch else None
    buf = io.BytesIO()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (example,), buf, dynamo=False, opset_version=cfg.opset, dynamic_axes=axes,
                          do_constant_folding=True, **_names(cfg))
    return onnx.load_from_string(buf.getvalue())


def _dynamo(model: nn.Module, example: torch.Tensor, cfg: ExportConfig) -> onnx.ModelProto:
    shapes = ({0: torch.export.Dim("batch", min=1, max=4096)},) if cfg.dynamic_batch else None
    # The torch.export-based exporter implements opset 18 and newer; older requests are converted down,
    # which does not always succeed, so it is asked for 18 at least.
    with warnings.catch_warnings(), torch.no_grad(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        program = torch.onnx.export(model, (example,), dynamo=True, opset_version=max(cfg.opset, 18),
                                    dynamic_shapes=shapes, verbose=False, **_names(cfg))
    return program.model_proto


def torch2onnx(model: nn.Module, example: torch.Tensor, path: Path, cfg: ExportConfig,
               metadata: dict[str, str]) -> onnx.ModelProto:
    """Export `model` to `path` atomically; the model is stamped with `metadata` and passes onnx.checker."""
    model = model.eval().to("cpu")
    example = example.to("cpu")
    used = "dynamo" if cfg.exporter == "dynamo" else "torchscript"
    if cfg.exporter == "dynamo":
        proto = _dynamo(model, example, cfg)
    else:
        try:
            proto = _torchscript(model, example, cfg)
        except (torch.onnx.errors.OnnxExporterError, RuntimeError) as exc:
            if cfg.exporter != "auto":
                raise UserInputError(f"the torchscript ONNX exporter cannot export this model ({exc}). "
                                     f"Set export.exporter: dynamo (or auto)") from exc
            # e.g. fused attention kernels or adaptive pooling to a non-divisor size: torch.export handles them
            proto, used = _dynamo(model, example, cfg), "dynamo"
    metadata = {**metadata, "exporter": used}
    for key, value in metadata.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, str(value)
    proto.producer_name = "idap-compress"
    onnx.checker.check_model(proto, full_check=True)
    atomic_write(path, proto.SerializeToString())
    return proto
