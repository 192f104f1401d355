"""torch -> ONNX: configurable opset, dynamic batch axis, named inputs/outputs, metadata, checked."""

from __future__ import annotations

import contextlib
import copy
import io
import itertools
import warnings
from pathlib import Path

import onnx
import torch
from torch import nn

from core.errors import UserInputError, first_line
from core.rundir import atomic_write
from export.config import ExportConfig


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
    """Export `model` to `path` atomically; the model is stamped with `metadata` and passes onnx.checker. The
    caller's model is exported in eval mode on the CPU and given back as it was (device and every module's mode):
    a model being pruned on a GPU stays there."""
    with _exportable(model) as exportable:
        return _export(exportable, example.to("cpu"), path, cfg, metadata)


@contextlib.contextmanager
def _exportable(model: nn.Module):
    """The model in eval mode on the CPU for the block; its devices and modes restored after it (a model spread
    over several devices is exported from a CPU copy instead)."""
    devices = {t.device for t in itertools.chain(model.parameters(), model.buffers())}
    if len(devices) > 1:
        yield copy.deepcopy(model).eval().to("cpu")
        return
    modes = {m: m.training for m in model.modules()}
    model.eval().to("cpu")
    try:
        yield model
    finally:
        if devices and (device := next(iter(devices))).type != "cpu":
            model.to(device)
        for m, training in modes.items():
            m.training = training


def _export(model: nn.Module, example: torch.Tensor, path: Path, cfg: ExportConfig,
            metadata: dict[str, str]) -> onnx.ModelProto:
    used = "dynamo" if cfg.exporter == "dynamo" else "torchscript"
    if cfg.exporter == "dynamo":
        try:
            proto = _dynamo(model, example, cfg)
        except Exception as exc:  # noqa: BLE001 - any exporter failure is the model's, named with the fix
            raise UserInputError(f"the dynamo (torch.export) ONNX exporter cannot export this model "
                                 f"({first_line(exc)}). Try export.exporter: torchscript (or auto)") from exc
    else:
        try:
            proto = _torchscript(model, example, cfg)
        except Exception as exc:  # noqa: BLE001 - TypeError, RuntimeError, OnnxExporterError...: all the model's
            if cfg.exporter != "auto":
                raise UserInputError(f"the torchscript ONNX exporter cannot export this model "
                                     f"({first_line(exc)}). Set export.exporter: dynamo (or auto)") from exc
            # e.g. fused attention kernels, adaptive pooling to a non-divisor size, blocks called with keyword
            # arguments: torch.export handles many of them
            try:
                proto, used = _dynamo(model, example, cfg), "dynamo"
            except Exception as second:  # noqa: BLE001
                raise UserInputError(
                    f"neither ONNX exporter can export this model: torchscript failed with {first_line(exc)}; "
                    f"dynamo (torch.export) failed with {first_line(second)}. The model's forward uses something "
                    f"neither can trace (data-dependent control flow, Python objects as outputs); make forward "
                    f"return one logits tensor computed with torch operations") from second
    metadata = {**metadata, "exporter": used}
    for key, value in metadata.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, str(value)
    proto.producer_name = "idap-compress"
    onnx.checker.check_model(proto, full_check=True)
    atomic_write(path, proto.SerializeToString())
    return proto
