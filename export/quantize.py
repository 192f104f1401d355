"""INT8 after pruning: post-training static quantization of an exported FP32 model into one QDQ ONNX file.

ONNX Runtime's quantization tools write the model in QDQ form (QuantizeLinear / DequantizeLinear around each
quantized operator): INT8 weights per output channel, INT8 activations with ranges calibrated on images,
symmetric (zero point 0) and biases left in FP32 - what TensorRT's explicit quantization requires, so the same
file is what ONNX Runtime's CPU INT8 kernels run and what TensorRT builds an INT8 engine from.

Calibration runs once per model (`calibrate`); its ranges are kept in a file, so quantizing again with other
layers excluded, or one layer at a time to find the layers that cost accuracy (`sensitivity`), does not run the
calibration images again.
"""

from __future__ import annotations

import json
import logging
import tempfile
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from core.errors import UserInputError, did_you_mean
from core.rundir import atomic_write
from export.onnx_names import node_owners

METHODS = ("minmax", "entropy", "percentile")
INT8_ONNX = "model.int8.onnx"
LAYER_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")  # the operators whose INT8 kernels save the time
# quantized besides them: what keeps the tensors between layers in INT8 (residual adds, activations, pooling,
# concatenation) and data movement; normalisation, softmax and the like stay in FP32
QUANTIZED_OPS = (*LAYER_OPS, "Add", "Relu", "Clip", "MaxPool", "AveragePool", "GlobalAveragePool", "Concat",
                 "Flatten", "Reshape", "Transpose", "Squeeze", "Unsqueeze", "Split", "Resize")


@contextmanager
def _quiet() -> Iterator[None]:
    """ONNX Runtime's quantization tools log through the root logger (pre-processing advice, per-node notes)."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        yield
    finally:
        root.setLevel(level)


def _method(name: str):
    from onnxruntime.quantization import CalibrationMethod

    if name not in METHODS:
        raise UserInputError(f"unknown calibration method {name!r}; export.calibration is one of "
                             f"{', '.join(METHODS)}")
    return {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
            "percentile": CalibrationMethod.Percentile}[name]


def prepare(fp32: Path, out: Path) -> str:
    """The model as quantization wants it: shapes inferred and graph optimized (ONNX Runtime's pre-processing),
    falling back to ONNX shape inference alone where symbolic inference fails. Returns what was done."""
    from onnxruntime.quantization.shape_inference import quant_pre_process

    with _quiet():
        for how, kwargs in (("pre-processed", {}), ("pre-processed without symbolic shapes",
                                                     {"skip_symbolic_shape": True})):
            try:
                quant_pre_process(str(fp32), str(out), **kwargs)
                return how
            except Exception:  # noqa: BLE001, S112 - the next, plainer way is tried; the last one must work
                continue
    onnx.save(onnx.shape_inference.infer_shapes(onnx.load(str(fp32))), str(out))
    return "shape inference only"


class _Reader:
    """ONNX Runtime's CalibrationDataReader over image batches (numpy, NCHW float32)."""

    def __init__(self, name: str, batches: list[np.ndarray]) -> None:
        self.name, self.batches = name, iter(batches)

    def get_next(self) -> dict[str, np.ndarray] | None:
        x = next(self.batches, None)
        return None if x is None else {self.name: np.ascontiguousarray(x, dtype=np.float32)}


def calibrate(model: Path, batches: Iterable[np.ndarray], method: str, percentile: float, ranges: Path,
              ) -> dict[str, Any]:
    """Activation ranges of `model` over the batches, written to `ranges` (ONNX Runtime's calibration cache).
    Batches are fed one at a time, so histograms (entropy, percentile) grow without keeping every activation."""
    from onnxruntime.quantization.calibrate import create_calibrator, save_tensors_data

    calib_method = _method(method)
    name = onnx.load(str(model), load_external_data=False).graph.input[0].name
    t0, samples = time.perf_counter(), 0
    extra: dict[str, Any] = {"symmetric": True}
    if method == "percentile":
        extra["percentile"] = percentile
    with tempfile.TemporaryDirectory() as tmp, _quiet():
        calibrator = create_calibrator(model, None, augmented_model_path=str(Path(tmp) / "augmented.onnx"),
                                       calibrate_method=calib_method, providers=["CPUExecutionProvider"],
                                       extra_options=extra)
        for x in batches:
            calibrator.collect_data(_Reader(name, [x]))
            samples += len(x)
        if samples == 0:
            raise UserInputError("the calibration split gave no images to calibrate the INT8 ranges on")
        save_tensors_data(calibrator.compute_data(), ranges)
        del calibrator
    return {"method": method, "samples": samples, "seconds": round(time.perf_counter() - t0, 2),
            **({"percentile": percentile} if method == "percentile" else {})}


def quantize(model: Path, ranges: Path, method: str, out: Path, exclude: list[str] = (),
             only: list[str] | None = None) -> None:
    """Write the QDQ INT8 model of `model` to `out` (not atomically: callers write to a temporary file)."""
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static

    options = {"ActivationSymmetric": True, "WeightSymmetric": True,
               # TensorRT dequantizes INT8 inputs only (an INT32 bias it cannot parse); FP32 biases suit both
               "QuantizeBias": False,
               # one Q/DQ pair per consumer: ONNX Runtime fuses a pair into its consumer's INT8 kernel only when
               # the pair is that consumer's alone
               "DedicatedQDQPair": True}
    with _quiet():
        quantize_static(str(model), str(out), None, quant_format=QuantFormat.QDQ, per_channel=True,
                        reduce_range=False, activation_type=QuantType.QInt8, weight_type=QuantType.QInt8,
                        op_types_to_quantize=list(QUANTIZED_OPS), nodes_to_exclude=list(exclude),
                        nodes_to_quantize=list(only or []), calibrate_method=_method(method),
                        calibration_cache_path=str(ranges), extra_options=options)


def layers_of(model: Path, modules: set[str]) -> dict[str, list[str]]:
    """Quantizable layer -> its ONNX nodes: each conv/linear module and the nodes it was exported (and
    pre-processed) into; nodes no module owns are their own layer, named as the node."""
    graph = onnx.load(str(model), load_external_data=False).graph
    owners = node_owners(model, modules) if modules else {}
    out: dict[str, list[str]] = {}
    for node in graph.node:
        if node.op_type in LAYER_OPS:
            out.setdefault(owners.get(node.name, node.name), []).append(node.name)
    return out


def resolve_exclude(names: list[str], layers: dict[str, list[str]], graph_nodes: set[str]) -> list[str]:
    """export.quantize_exclude (module names or ONNX node names) -> ONNX node names; unknown names are an
    error that lists what can be excluded."""
    nodes: list[str] = []
    for name in names:
        if name in layers:
            nodes += layers[name]
        elif name in graph_nodes:
            nodes.append(name)
        else:
            raise UserInputError(f"export.quantize_exclude names {name!r}, which is neither a quantized layer nor an "
                                 f"ONNX node of the model.{did_you_mean(name, list(layers))} Quantized layers: "
                                 f"{', '.join(list(layers)[:12])}{' ...' if len(layers) > 12 else ''}")
    return nodes


def own_parameters(proto: onnx.ModelProto) -> int:
    """Give every QuantizeLinear / DequantizeLinear node its own scale and zero-point initializers.

    The quantizer shares them between the pairs of one tensor. ONNX Runtime's x86 CPU kernels are unsigned
    (U8S8): it rewrites each signed pair to unsigned by changing its zero point, and leaves a pair whose zero
    point another node also reads as it is - and a convolution fed by such a pair runs in FP32 after a
    dequantization (measured on ResNet-50: 20 of 53 convolutions, 1.1x instead of 2.5x faster than FP32).
    Same values, so the model computes the same; returns how many initializers were copied."""
    graph = proto.graph
    inits = {i.name: i for i in graph.initializer}
    seen: set[str] = set()
    copies = []
    for node in graph.node:
        if node.op_type not in ("QuantizeLinear", "DequantizeLinear"):
            continue
        for k in range(1, len(node.input)):
            name = node.input[k]
            if name not in inits:
                continue
            if name not in seen:
                seen.add(name)
                continue
            t = onnx.TensorProto()
            t.CopyFrom(inits[name])
            t.name = f"{name}/{node.name}"
            node.input[k] = t.name
            copies.append(t)
    graph.initializer.extend(copies)
    return len(copies)


def stamp(quantized: Path, out: Path, metadata: dict[str, str]) -> onnx.ModelProto:
    """Copy `quantized` to `out` atomically with its quantization parameters made per node (`own_parameters`)
    and the metadata stamped in, after onnx.checker."""
    proto = onnx.load(str(quantized))
    own_parameters(proto)
    del proto.metadata_props[:]
    for key, value in metadata.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, str(value)
    proto.producer_name = "idap-compress"
    onnx.checker.check_model(proto)
    atomic_write(out, proto.SerializeToString())
    return proto


def int8_model(fp32: Path, out: Path, batches: Iterable[np.ndarray], method: str, percentile: float,
               exclude: list[str], modules: set[str], workdir: Path) -> dict[str, Any]:
    """The whole step: pre-process, calibrate (ranges kept in `workdir` for sensitivity), quantize without the
    excluded layers, stamp the FP32 model's metadata plus the quantization's, write `out` atomically.
    Returns the record for the stage metrics and summary.json."""
    workdir.mkdir(parents=True, exist_ok=True)
    pre, ranges = workdir / "prepared.onnx", workdir / "ranges.json"
    t0 = time.perf_counter()
    how = prepare(fp32, pre)
    layers = layers_of(pre, modules)
    graph_nodes = {n.name for n in onnx.load(str(pre), load_external_data=False).graph.node}
    excluded = resolve_exclude(exclude, layers, graph_nodes)
    calib = calibrate(pre, batches, method, percentile, ranges)
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        raw = Path(tmp) / "q.onnx"
        quantize(pre, ranges, method, raw, excluded)
        meta = {p.key: p.value for p in onnx.load(str(fp32), load_external_data=False).metadata_props}
        record = {"precision": "int8", "format": "QDQ", "weights": "int8 symmetric per channel",
                  "activations": "int8 symmetric per tensor", "calibration": calib, "preparation": how,
                  "excluded_layers": list(exclude), "excluded_nodes": excluded,
                  "quantized_layers": len([k for k, v in layers.items() if not set(v) & set(excluded)]),
                  "onnxruntime": _ort_version()}
        meta.update(role="compressed-int8", precision="int8", quantization=json.dumps(record))
        proto = stamp(raw, out, meta)
    record.update(seconds=round(time.perf_counter() - t0, 2), bytes=out.stat().st_size,
                  qdq_nodes=sum(n.op_type in ("QuantizeLinear", "DequantizeLinear") for n in proto.graph.node))
    return record


def sensitivity(prepared: Path, ranges: Path, method: str, layers: dict[str, list[str]],
                batches: list[np.ndarray], top: int = 5, threads: int | None = None) -> list[dict[str, Any]]:
    """The layers whose quantization costs most: each layer quantized alone (the rest in FP32), its logits
    compared with the FP32 model's on the batches: top-1 agreement and the relative logit error. Worst first."""
    from export.runtime import OrtModel

    ref_rt = OrtModel(prepared, threads)
    ref = np.concatenate([ref_rt(x) for x in batches])
    top1 = ref.argmax(1)
    scale = float(np.linalg.norm(ref)) or 1.0
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for i, (layer, nodes) in enumerate(layers.items()):
            path = Path(tmp) / f"l{i}.onnx"
            quantize(prepared, ranges, method, path, only=nodes)
            rt = OrtModel(path, threads)
            out = np.concatenate([rt(x) for x in batches])
            rows.append({"layer": layer, "nodes": nodes, "agreement": float((out.argmax(1) == top1).mean()),
                         "logit_error": float(np.linalg.norm(out - ref)) / scale})
            path.unlink()
    rows.sort(key=lambda r: (r["agreement"], -r["logit_error"]))
    return rows[:top]


def _ort_version() -> str:
    import onnxruntime

    return onnxruntime.__version__
