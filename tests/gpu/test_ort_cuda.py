"""ONNX Runtime on CUDA (marked gpu; `make gpu-check` runs them): the provider in use is CUDA's, and it agrees
with PyTorch. They need onnxruntime-gpu (`make install-gpu`) and an NVIDIA GPU."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from core.config import ModelConfig
from core.models import build_model
from export.config import ExportConfig
from export.runtime import OrtModel, cuda_provider_problem
from export.torch2onnx import torch2onnx
from tests.conftest import run_cli, tiny_config, write_config


def _reason() -> str | None:
    if not torch.cuda.is_available():
        return "no CUDA device is visible"
    return cuda_provider_problem()


pytestmark = [pytest.mark.gpu, pytest.mark.skipif(_reason() is not None,
                                                  reason=f"ONNX Runtime CUDA needs a GPU and onnxruntime-gpu "
                                                         f"({_reason()})")]


def test_cuda_provider_is_the_one_in_use_and_matches_pytorch(tmp_path: Path):
    spec = ModelConfig(source="timm", name="resnet18", num_classes=10, in_chans=3, input_size=(64, 64))
    torch.manual_seed(0)
    model = build_model(spec).eval()
    path = tmp_path / "m.onnx"
    torch2onnx(model, torch.zeros(2, 3, 64, 64), path, ExportConfig(), {})
    rt = OrtModel(path, provider="cuda")
    assert rt.session.get_providers()[0] == "CUDAExecutionProvider" and rt.backend == "onnxruntime-cuda"
    x = torch.randn(8, 3, 64, 64)
    with torch.no_grad():
        ref = model(x).numpy()
    assert np.abs(rt(x.numpy()) - ref).max() / np.abs(ref).max() <= 1e-3
    assert rt.time_once(x[:1].numpy()) > 0


def test_pipeline_validates_on_onnxruntime_cuda(tmp_path: Path):
    cfg = tiny_config(export={"tensorrt": {"mode": "off"}},
                      validate={"runtime": "onnxruntime-cuda", "warmup": 5, "runs": 20,
                                "gates": {"max_parity_error": 1e-3}},
                      runtime={"progress": False, "device": "cuda"})
    run = tmp_path / "run"
    done = run_cli("pipeline", str(write_config(tmp_path / "c.yaml", cfg)), "--run-dir", str(run))
    assert done.returncode == 0, done.stderr[-3000:]
    s = json.loads((run / "summary.json").read_text())
    assert s["latency_ms"]["backend"] == "onnxruntime-cuda" and s["latency_ms"]["device"]
