"""torch -> ONNX export: dynamic batch, names, metadata, checker, parity through ONNX Runtime."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
import torch_pruning as tp

from core.config import ModelConfig
from core.models import build_model
from export.config import ExportConfig
from export.runtime import OrtModel, latency_stats
from export.torch2onnx import torch2onnx


@pytest.fixture(scope="module")
def pruned() -> torch.nn.Module:
    torch.manual_seed(0)
    model = build_model(ModelConfig(source="timm", name="resnet18", num_classes=4, in_chans=1)).eval()
    dg = tp.DependencyGraph().build_dependency(model, example_inputs=torch.zeros(1, 1, 32, 32))
    dg.get_pruning_group(model.layer2[0].conv1, tp.prune_conv_out_channels, idxs=list(range(24))).prune()
    return model


@pytest.mark.parametrize("exporter", ["torchscript", "dynamo"])
def test_export_is_valid_with_dynamic_batch_and_metadata(pruned, tmp_path: Path, exporter: str):
    cfg = ExportConfig(opset=18, exporter=exporter, input_name="pixels", output_name="scores")
    path = tmp_path / "m.onnx"
    torch2onnx(pruned, torch.zeros(2, 1, 32, 32), path, cfg, {"run": "t", "gflops": "0.1"})
    proto = onnx.load(path)
    onnx.checker.check_model(proto, full_check=True)
    assert {p.key: p.value for p in proto.metadata_props}["run"] == "t"
    assert [i.name for i in proto.graph.input] == ["pixels"]
    assert any(o.version == 18 for o in proto.opset_import if o.domain in ("", "ai.onnx"))
    ort_model = OrtModel(path)
    for batch in (1, 5):
        x = torch.randn(batch, 1, 32, 32)
        with torch.no_grad():
            ref = pruned(x).numpy()
        out = ort_model(x.numpy())
        assert out.shape == (batch, 4)
        assert np.abs(out - ref).max() < 1e-4


def test_static_batch_export(pruned, tmp_path: Path):
    path = tmp_path / "m.onnx"
    torch2onnx(pruned, torch.zeros(1, 1, 32, 32), path, ExportConfig(dynamic_batch=False), {})
    dim = onnx.load(path).graph.input[0].type.tensor_type.shape.dim[0]
    assert dim.dim_value == 1


def test_latency_stats():
    s = latency_stats([1.0, 2.0, 3.0, 4.0, 100.0])
    assert s["median_ms"] == 3.0 and s["p90_ms"] == pytest.approx(61.6) and s["runs"] == 5
