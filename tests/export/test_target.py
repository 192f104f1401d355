"""Where a model is deployed and timed, decided the same way everywhere (stand-ins for CUDA and TensorRT): the
latency loop and validate time the same device, TensorRT outside 10.x is a reason and not a crash, ONNX Runtime
on CUDA runs without TF32, GPU per-layer latency comes from MACs, and INT8 engines come from the QDQ model."""

from __future__ import annotations

import sys
import types
from pathlib import Path

import pytest
import torch

from export import runtime, tensorrt
from pipeline.config import Config
from pipeline.errors import UserInputError
from tests.conftest import tiny_config


@pytest.fixture
def cuda_here(monkeypatch):
    """A machine with a CUDA device and ONNX Runtime's CUDA provider (stand-ins)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(runtime, "cuda_provider_problem", lambda: None)
    import onnxruntime as ort

    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])


def _cfg(**sections) -> Config:
    return Config.model_validate(tiny_config(**sections))


def test_device_auto_on_a_cuda_machine_times_the_loop_where_validate_times(cuda_here):
    cfg = _cfg(runtime={"device": "auto"}, filter_prune={"target_speedup": 2.0, "target_flops_reduction": None})
    from pipeline.runner import resolve_device

    loop = runtime.timing_provider(cfg)
    validated = runtime.resolve_runtime(cfg.validate_.runtime, False, resolve_device(cfg).type)
    assert loop == "cuda" and validated == "onnxruntime-cuda"
    assert runtime.timing_provider(_cfg(runtime={"device": "cpu"})) == "cpu"


def test_a_speedup_target_on_cuda_without_the_cuda_provider_is_refused_before_any_work(monkeypatch, tmp_path):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(runtime, "cuda_provider_problem", lambda: "this ONNX Runtime is the CPU build")
    cfg = _cfg(runtime={"device": "auto"}, filter_prune={"target_speedup": 2.0, "target_flops_reduction": None})
    with pytest.raises(UserInputError, match="times each step on the device validate uses.*CPU build"):
        runtime.timing_provider(cfg)
    from pipeline.preflight import runtime_problems

    assert any("CPU build" in p for p in runtime_problems(cfg))


def test_onnxruntime_on_cuda_runs_without_tf32():
    assert runtime.ort_providers("cuda") == [("CUDAExecutionProvider", {"use_tf32": "0"})]
    assert runtime.ort_providers("cuda", tf32=True)[0][1]["use_tf32"] == "1"
    assert runtime.ort_providers("cpu") == ["CPUExecutionProvider"]


def test_per_layer_latency_on_a_gpu_is_the_measured_total_split_by_macs():
    from stages._latency import LatencyMeter

    macs = {"<total>": 100.0, "": 100.0, "a": 60.0, "b": 30.0, "b.inner": 30.0, "pool": 0.0}
    prof = LatencyMeter._split_by_macs(2.0, macs, {"", "a", "b", "b.inner", "pool"})
    assert prof.layers == pytest.approx({"a": 1.2, "b.inner": 0.6})
    assert prof.other_ms == pytest.approx(0.2) and prof.total_ms == 2.0


@pytest.mark.parametrize("version", ["11.0.0", "9.3.0"])
def test_tensorrt_outside_10_is_a_reason_so_auto_skips_and_required_is_refused(monkeypatch, version):
    monkeypatch.setattr(tensorrt, "installed_version", lambda: version)
    reason = tensorrt.unavailable_reason()
    assert reason is not None and f"TensorRT {version} is installed" in reason
    from pipeline.preflight import runtime_problems

    assert runtime_problems(_cfg(export={"tensorrt": {"mode": "auto"}})) == []
    problems = runtime_problems(_cfg(export={"tensorrt": {"mode": "required"}}))
    assert problems and f"TensorRT {version} is installed" in problems[0]


def test_the_engine_fingerprint_reads_the_module_version(monkeypatch):
    fake = types.ModuleType("tensorrt")
    fake.__version__ = "10.16.1"
    monkeypatch.setitem(sys.modules, "tensorrt", fake)
    monkeypatch.setattr(tensorrt.importlib.util, "find_spec", lambda name: object())
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "NVIDIA H200")
    assert tensorrt.engine_fingerprint() == "tensorrt 10.16.1 on NVIDIA H200"


def test_an_int8_engine_is_built_from_the_runs_qdq_model(monkeypatch, tmp_path: Path, capsys):
    """`compress export --format tensorrt` with precision int8 builds from model.int8.onnx, or says how to get it."""
    from pipeline.cli import run
    from tests.conftest import write_config

    built = []
    monkeypatch.setattr(tensorrt, "require", lambda *a: None)
    monkeypatch.setattr(tensorrt, "build_engine", lambda onnx, engine, spec: built.append((onnx.name, spec)))
    cfg = write_config(tmp_path / "c.yaml", tiny_config(export={"tensorrt": {"precision": "int8"},
                                                                 "quantize": "int8"}))
    fresh = tmp_path / "fresh"
    assert run(["pipeline", str(cfg), "--run-dir", str(fresh), "--until", "calibrate"]) == 0
    capsys.readouterr()
    assert run(["export", str(fresh), "--format", "tensorrt", "--config", str(cfg)]) == 2
    assert "builds the engine from the run's model.int8.onnx" in " ".join(capsys.readouterr().err.split())
    assert built == []


def test_gpu_check_installs_the_gpu_extra_first():
    from tests.conftest import REPO

    text = (REPO / "Makefile").read_text()
    assert "gpu-check: install-gpu" in text
