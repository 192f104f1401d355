"""The GPU path with torch alone (marked gpu; `make gpu-check` and `make gpu-smoke` run them): a CUDA device and
torch built with CUDA, nothing else from the gpu extra. A model on the GPU stays where it is when it is exported
or timed, and a latency-targeted pipeline on CUDA times the same device in its loop and in validate."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from export.config import ExportConfig
from export.target import resolve
from export.torch2onnx import torch2onnx
from pipeline.config import Config
from tests.conftest import run_cli, tiny_config, write_config

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(),
                                                  reason="torch sees no CUDA device")]


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Conv2d(3, 16, 3, padding=1), torch.nn.BatchNorm2d(16), torch.nn.ReLU(),
                            torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(16, 4))
    return m.cuda().train()


def _unchanged(model: torch.nn.Module, before: dict[str, torch.Tensor]) -> bool:
    return model.training and all(p.is_cuda for p in model.parameters()) and all(
        torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_export_leaves_a_cuda_model_on_the_gpu_in_training_mode(tmp_path: Path):
    model = _model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    torch2onnx(model, torch.zeros(2, 3, 32, 32), tmp_path / "m.onnx", ExportConfig(), {})
    assert (tmp_path / "m.onnx").is_file() and _unchanged(model, before)
    model(torch.zeros(2, 3, 32, 32, device="cuda"))  # the next forward of the pruning loop


def test_the_latency_meter_times_on_the_gpu_without_moving_the_model(tmp_path: Path):
    from stages._latency import LatencyMeter

    cfg = Config.model_validate(tiny_config(
        model={"source": "timm", "name": "resnet18", "num_classes": 4, "in_chans": 3, "input_size": [32, 32]},
        runtime={"device": "cuda"}, validate={"runtime": "auto"}, export={"tensorrt": {"mode": "off"}}))
    target = resolve(cfg)
    assert target.timing_device == "cuda" and target.runtime in ("onnxruntime-cuda", "torch-cuda")
    model = _model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    meter = LatencyMeter(cfg, target, runs=5, warmup=2)
    profile, _ = meter.measure(model, save_as=tmp_path / "base.onnx", fresh=True)
    _, (speed, low, high) = meter.measure(model, tmp_path / "base.onnx", (2, 0.02), fresh=True)
    assert profile.total_ms > 0 and low <= speed <= high
    assert meter.device == torch.cuda.get_device_name()
    assert _unchanged(model, before)


def test_a_speedup_target_on_cuda_times_the_loop_and_validate_on_the_same_gpu(tmp_path: Path):
    cfg = write_config(tmp_path / "c.yaml", tiny_config(
        runtime={"progress": False, "device": "cuda"}, export={"tensorrt": {"mode": "off"}},
        filter_prune={"target_speedup": 1.3, "target_flops_reduction": None, "steps": 3},
        validate={"runtime": "auto", "warmup": 5, "runs": 20, "gates": {"max_parity_error": 1e-3}}))
    res = run_cli("pipeline", str(cfg), "--run-dir", str(tmp_path / "run"), timeout=900)
    assert res.returncode in (0, 3), res.stderr[-3000:]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    target = summary["target"]
    assert target["device"] == "cuda" and target["hardware"] == torch.cuda.get_device_name()
    assert target["runtime"] in ("onnxruntime-cuda", "torch-cuda")
    assert summary["latency_ms"]["backend"] == target["runtime"]
    assert summary["latency_ms"]["device"] == torch.cuda.get_device_name()
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
    assert manifest["stages"]["filter_prune"]["metrics"]["latency_runtime"] == target["timing"]
    assert summary["parity"]["max_abs_diff"] <= 1e-3
