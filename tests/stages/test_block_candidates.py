"""Block candidates found from the model itself on the torchvision families; removal shrinks the ONNX graph."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import onnx
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from core.config import ModelConfig
from core.models import build_model, rebuild, structure_of
from export.config import ExportConfig
from export.runtime import OrtModel
from export.torch2onnx import torch2onnx
from stages._blocks import find_candidates, measure_blocks, replace_with_identity
from stages._flows import calibration_pass

# VGG-style conv runs are covered by timm's VGG19-BN in tests/integration/test_architectures.py
ARCHS = {"resnet50": 32, "mobilenet_v3_large": 32, "efficientnet_b0": 32, "convnext_tiny": 32,
         "vit_b_16": 32}


def calib_ctx(size: int) -> SimpleNamespace:
    ds = TensorDataset(torch.randn(8, 3, size, size, generator=torch.Generator().manual_seed(0)),
                       torch.zeros(8, dtype=torch.long))
    return SimpleNamespace(device=torch.device("cpu"), config=SimpleNamespace(calibrate=SimpleNamespace(batch_size=4)),
                           loader=lambda split, batch_size=4, **k: DataLoader(ds, batch_size=batch_size),
                           track=lambda items, desc, total=None: items)


def candidates(model: torch.nn.Module, size: int):
    rows, units = measure_blocks(model)
    calibration_pass(model, calib_ctx(size), [rows, units])
    return find_candidates(model, rows.result(), units.result(), 0.005)


@pytest.mark.parametrize("name", list(ARCHS))
def test_torchvision_family_truncates_and_exports(name: str, tmp_path: Path):
    size = ARCHS[name]
    spec = ModelConfig(source="torchvision", name=name, num_classes=10, input_size=(size, size))
    torch.manual_seed(0)
    model = build_model(spec).eval()
    blocks, why = candidates(model, size)
    assert blocks, f"{name}: no candidates ({why})"
    example = torch.zeros(2, 3, size, size)
    before = torch2onnx(model, example, tmp_path / "a.onnx", ExportConfig(), {})
    best = min(blocks, key=lambda b: (b.divergence, b.name))
    replace_with_identity(model, best.modules)
    after = torch2onnx(model, example, tmp_path / "b.onnx", ExportConfig(), {})
    assert len(after.graph.node) < len(before.graph.node), f"{best.name} left ops in the graph"
    onnx.checker.check_model(after, full_check=True)
    x = torch.randn(3, 3, size, size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = model(x).numpy()
    assert np.abs(OrtModel(tmp_path / "b.onnx")(x.numpy()) - ref).max() <= 1e-4
    # the truncation is recorded as data and rebuilds the same model
    again = rebuild(spec, structure_of(model, spec), model.state_dict()).eval()
    with torch.no_grad():
        assert torch.equal(again(x), model(x))


@pytest.mark.parametrize("name", ["densenet121", "googlenet"])
def test_models_without_safe_blocks_say_why(name: str):
    spec = ModelConfig(source="torchvision", name=name, num_classes=10, input_size=(32, 32))
    blocks, why = candidates(build_model(spec).eval(), 32)
    assert blocks == []
    assert any("several tensors" in r or "not residual" in r for r in why), why
