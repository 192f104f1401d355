"""torch -> ONNX: configurable opset, dynamic batch axis, named inputs/outputs, metadata, checked."""

from __future__ import annotations

import io
import warnings
from pathlib import Path

import onnx
import torch
from torch import nn

from pipeline.config import ExportConfig
from pipeline.rundir import atomic_write


def torch2onnx(model: nn.Module, example: torch.Tensor, path: Path, cfg: ExportConfig,
               metadata: dict[str, str]) -> onnx.ModelProto:
    """Export `model` to `path` atomically; the model is stamped with `metadata` and passes onnx.checker."""
    model = model.eval().to("cpu")
    example = example.to("cpu")
    names = {"input_names": [cfg.input_name], "output_names": [cfg.output_name]}
    buf = io.BytesIO()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        if cfg.exporter == "dynamo":
            shapes = ({0: torch.export.Dim("batch", min=1, max=4096)},) if cfg.dynamic_batch else None
            program = torch.onnx.export(model, (example,), dynamo=True, opset_version=cfg.opset,
                                        dynamic_shapes=shapes, verbose=False, **names)
            proto = program.model_proto
        else:
            axes = {cfg.input_name: {0: "batch"}, cfg.output_name: {0: "batch"}} if cfg.dynamic_batch else None
            torch.onnx.export(model, (example,), buf, dynamo=False, opset_version=cfg.opset, dynamic_axes=axes,
                              do_constant_folding=True, **names)
            proto = onnx.load_from_string(buf.getvalue())
    for key, value in metadata.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, str(value)
    proto.producer_name = "idap-compress"
    onnx.checker.check_model(proto, full_check=True)
    atomic_write(path, proto.SerializeToString())
    return proto
