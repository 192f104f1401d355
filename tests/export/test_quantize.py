"""INT8 post-training quantization: one QDQ model for ONNX Runtime and TensorRT, the layers that cost accuracy."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from core.errors import UserInputError
from export.config import ExportConfig
from export.quantize import INT8_ONNX, int8_model, layers_of, own_parameters, sensitivity
from export.runtime import OrtModel
from export.torch2onnx import torch2onnx
from tests.fixtures.outlier import Outlier


def _export(model: torch.nn.Module, path: Path, shape=(1, 16, 16)) -> Path:
    torch2onnx(model.eval(), torch.zeros(2, *shape), path, ExportConfig(), {"role": "compressed"})
    return path


def _batches(n: int = 4, shape=(1, 16, 16), seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.standard_normal((16, *shape)).astype(np.float32) for _ in range(n)]


def _error(a: Path, b: Path, batches: list[np.ndarray]) -> float:
    """Relative logit error of `b` against `a` in exact QDQ arithmetic: ONNX Runtime with its graph optimisations
    off runs each quantize/dequantize pair as written, where its fused INT8 kernels would add the CPU's own
    error (on x86 without VNNI they saturate: 4.2% for 0.4% here), which is not the quantization's."""
    import onnxruntime as ort

    def outputs(path: Path) -> np.ndarray:
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        opts.intra_op_num_threads = 1
        session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        name = session.get_inputs()[0].name
        return np.concatenate([session.run(None, {name: x})[0] for x in batches])

    ref = outputs(a)
    return float(np.linalg.norm(outputs(b) - ref) / np.linalg.norm(ref))


def test_int8_accuracy_on_a_cpu_without_vnni_carries_its_caveat():
    from export.runtime import int8_saturation

    assert "no VNNI" in int8_saturation({"avx2", "fma"})
    assert int8_saturation({"avx2", "avx512_vnni"}) is None and int8_saturation({"avx_vnni"}) is None


@pytest.fixture
def outlier(tmp_path: Path) -> tuple[torch.nn.Module, Path]:
    torch.manual_seed(0)
    model = Outlier()
    return model, _export(model, tmp_path / "fp32.onnx")


def test_the_int8_model_is_symmetric_qdq_that_tensorrt_parses(tmp_path: Path):
    """Signed INT8 with zero points 0 (TensorRT's only scheme), INT8 weights per output channel, FP32 biases (no
    INT32 bias TensorRT cannot dequantize), metadata stamped, and every Q/DQ node with its own parameters."""
    torch.manual_seed(0)
    model = Outlier(scale=1.0)
    fp32 = _export(model, tmp_path / "fp32.onnx")
    rec = int8_model(fp32, tmp_path / INT8_ONNX, _batches(), "minmax", 99.999, [],
                     {n for n, _ in model.named_modules()}, tmp_path / "work")
    proto = onnx.load(str(tmp_path / INT8_ONNX))
    inits = {i.name: onnx.numpy_helper.to_array(i) for i in proto.graph.initializer}
    qdq = [n for n in proto.graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")]
    assert qdq and rec["qdq_nodes"] == len(qdq) and rec["quantized_layers"] == 4
    for n in qdq:
        zp = inits[n.input[2]]
        assert zp.dtype == np.int8 and not zp.any(), f"{n.name}: zero point must be signed INT8 0"
    weights = {n.input[1] for n in proto.graph.node if n.op_type == "Conv"}
    dq_of = {n.output[0]: n for n in qdq if n.op_type == "DequantizeLinear"}
    for w in weights:
        dq = dq_of[w]
        assert inits[dq.input[0]].dtype == np.int8 and inits[dq.input[1]].size > 1, "INT8 weights per channel"
    biases = [n.input[2] for n in proto.graph.node if n.op_type == "Conv" and len(n.input) > 2]
    assert biases and all(b in inits and inits[b].dtype == np.float32 for b in biases)
    users = [i for n in qdq for i in n.input[1:]]
    assert len(users) == len(set(users)), "each Q/DQ node reads its own scale and zero point"
    meta = {p.key: p.value for p in proto.metadata_props}
    assert meta["precision"] == "int8" and meta["role"] == "compressed-int8"
    assert OrtModel(tmp_path / INT8_ONNX).precision == "int8"
    assert _error(fp32, tmp_path / INT8_ONNX, _batches(2, seed=1)) < 0.05


def test_own_parameters_gives_each_qdq_node_its_initializers():
    from onnx import TensorProto, helper

    s = helper.make_tensor("s", TensorProto.FLOAT, [], [0.1])
    z = helper.make_tensor("z", TensorProto.INT8, [], [0])
    nodes = [helper.make_node("QuantizeLinear", ["x", "s", "z"], ["q"], name="q"),
             helper.make_node("DequantizeLinear", ["q", "s", "z"], ["d1"], name="d1"),
             helper.make_node("DequantizeLinear", ["q", "s", "z"], ["d2"], name="d2")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
                              [helper.make_tensor_value_info(o, TensorProto.FLOAT, [2]) for o in ("d1", "d2")],
                              [s, z])
    proto = helper.make_model(graph)
    assert own_parameters(proto) == 4
    onnx.checker.check_model(proto)
    assert len({i for n in proto.graph.node for i in n.input[1:]}) == 6


def test_sensitivity_finds_the_outlier_layer_and_excluding_it_restores_the_model(outlier, tmp_path: Path):
    model, fp32 = outlier
    modules = {n for n, _ in model.named_modules()}
    batches, check = _batches(), _batches(2, seed=1)
    int8_model(fp32, tmp_path / "all.onnx", batches, "minmax", 99.999, [], modules, tmp_path / "work")
    work = tmp_path / "work"
    layers = layers_of(work / "prepared.onnx", modules)
    assert set(layers) == {"conv1", "conv2", "conv3", "fc"}
    rows = sensitivity(work / "prepared.onnx", work / "ranges.json", "minmax", layers, batches, top=4, threads=1)
    assert rows[0]["layer"] == "conv2", rows
    assert rows[0]["logit_error"] > 3 * max(r["logit_error"] for r in rows[1:])
    rec = int8_model(fp32, tmp_path / "kept.onnx", batches, "minmax", 99.999, ["conv2"], modules,
                     tmp_path / "work2")
    assert rec["excluded_nodes"] and rec["quantized_layers"] == 3
    before, after = _error(fp32, tmp_path / "all.onnx", check), _error(fp32, tmp_path / "kept.onnx", check)
    assert after < 0.02 and before > 10 * after, (before, after)


@pytest.mark.parametrize("method", ["entropy", "percentile"])
def test_histogram_calibrations_work_batch_by_batch(outlier, tmp_path: Path, method: str):
    model, fp32 = outlier
    rec = int8_model(fp32, tmp_path / "q.onnx", iter(_batches(3)), method, 99.99, ["conv2"],
                     {n for n, _ in model.named_modules()}, tmp_path / "work")
    assert rec["calibration"]["method"] == method and rec["calibration"]["samples"] == 48
    assert _error(fp32, tmp_path / "q.onnx", _batches(2, seed=1)) < 0.1


def test_unknown_exclusions_and_methods_are_user_errors(outlier, tmp_path: Path):
    model, fp32 = outlier
    modules = {n for n, _ in model.named_modules()}
    with pytest.raises(UserInputError, match=r"'conv9'.*conv1"):
        int8_model(fp32, tmp_path / "q.onnx", _batches(1), "minmax", 99.9, ["conv9"], modules, tmp_path / "w")
    with pytest.raises(UserInputError, match="minmax, entropy, percentile"):
        int8_model(fp32, tmp_path / "q.onnx", _batches(1), "kl", 99.9, [], modules, tmp_path / "w")
    assert not (tmp_path / "q.onnx").exists()
