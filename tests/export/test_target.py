"""Where a model is deployed and timed, decided the same way everywhere (stand-ins for CUDA and TensorRT): the
latency loop and validate time the same device, TensorRT outside 10.x is a reason and not a crash, ONNX Runtime
on CUDA runs without TF32, GPU per-layer latency comes from MACs, and INT8 engines come from the QDQ model."""

from __future__ import annotations

import sys
import types
from pathlib import Path

import pytest
import torch

from core.errors import UserInputError
from export import runtime, target, tensorrt
from pipeline.config import Config
from tests.conftest import tiny_config


def _cfg(**sections) -> Config:
    return Config.model_validate(tiny_config(**sections))


def _machine(cuda=True, ort_cuda=True, trt=False) -> target.Machine:
    return target.Machine(cuda=cuda, ort_cuda_problem=None if ort_cuda else "this ONNX Runtime is the CPU build",
                          tensorrt_problem=None if trt else "the tensorrt Python package is not installed",
                          cpu="Test CPU", gpu="Test GPU" if cuda else None)


@pytest.mark.parametrize("sections, machine, runtime_, timing", [
    ({"runtime": {"device": "auto"}}, _machine(), "onnxruntime-cuda", "onnxruntime-cuda"),
    ({"runtime": {"device": "auto"}}, _machine(cuda=False), "onnxruntime-cpu", "onnxruntime-cpu"),
    ({"runtime": {"device": "cpu"}}, _machine(), "onnxruntime-cpu", "onnxruntime-cpu"),
    # no ONNX Runtime CUDA provider: PyTorch on the GPU, in the loop and in validate (was: a CPU-timed loop)
    ({"runtime": {"device": "auto"}}, _machine(ort_cuda=False), "torch-cuda", "torch-cuda"),
    # an engine ships: the loop times the same GPU through ONNX Runtime, or PyTorch without it
    ({"runtime": {"device": "auto"}, "export": {"tensorrt": {"mode": "auto"}}}, _machine(trt=True), "tensorrt",
     "onnxruntime-cuda"),
    ({"runtime": {"device": "cpu"}, "export": {"tensorrt": {"mode": "auto"}}}, _machine(trt=True, ort_cuda=False),
     "tensorrt", "torch-cuda"),
    ({"runtime": {"device": "auto"}, "export": {"tensorrt": {"mode": "auto"}}}, _machine(trt=False), "onnxruntime-cuda",
     "onnxruntime-cuda"),
    ({"runtime": {"device": "auto"}, "export": {"quantize": "int8"}}, _machine(), "onnxruntime-cpu", "onnxruntime-cpu"),
])
def test_one_target_decides_where_the_loop_and_validate_time(sections, machine, runtime_, timing):
    t = target.resolve(_cfg(**sections), machine)
    assert (t.runtime, t.timing) == (runtime_, timing)
    gpu = runtime_ in target.GPU_RUNTIMES
    assert t.timing_device == ("cuda" if gpu else "cpu")  # the loop times the device validate times
    assert t.hardware == ("Test GPU" if gpu else "Test CPU") and t.why
    assert t.record()["provider_options"] == ({"use_tf32": "0"} if "onnxruntime-cuda" in (runtime_, timing) else {})


def test_what_the_target_cannot_run_is_refused_with_the_repair():
    with pytest.raises(UserInputError, match="no CUDA device is visible"):
        target.resolve(_cfg(runtime={"device": "cuda"}), _machine(cuda=False))
    with pytest.raises(UserInputError, match="onnxruntime-cuda.*CPU build"):
        target.resolve(_cfg(validate={"runtime": "onnxruntime-cuda"}), _machine(ort_cuda=False))
    with pytest.raises(UserInputError, match="torch-cuda.*no CUDA device"):
        target.resolve(_cfg(validate={"runtime": "torch-cuda"}), _machine(cuda=False))


def test_a_speedup_target_on_cuda_without_the_cuda_provider_times_pytorch_on_the_gpu(monkeypatch):
    monkeypatch.setattr(target.Machine, "here", classmethod(lambda cls: _machine(ort_cuda=False)))
    cfg = _cfg(runtime={"device": "auto"}, filter_prune={"target_speedup": 2.0, "target_flops_reduction": None})
    from pipeline.preflight import runtime_problems

    assert runtime_problems(cfg) == []
    assert target.resolve(cfg).timing == "torch-cuda"


def test_tf32_is_asked_for_explicitly_and_reaches_every_gpu_runtime():
    t = target.resolve(_cfg(runtime={"device": "auto", "tf32": True}), _machine())
    assert t.tf32 and t.record()["provider_options"] == {"use_tf32": "1"}
    from stages.export import engine_spec

    assert engine_spec(_cfg(runtime={"tf32": True})).tf32 and not engine_spec(_cfg()).tf32


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


def _torch_on_cpu(monkeypatch):
    """TorchModel as on CUDA (backend torch-cuda), run on the CPU: the control flow of the GPU path, here."""
    import stages.validate

    class OnCpu(runtime.TorchModel):
        def __init__(self, module, device="cuda", tf32=False):
            super().__init__(module, "cpu", tf32)
            self.backend = f"torch-{device}"

    monkeypatch.setattr(runtime, "TorchModel", OnCpu)
    monkeypatch.setattr(stages.validate, "TorchModel", OnCpu)
    monkeypatch.setattr(target.Machine, "here", classmethod(lambda cls: _machine(ort_cuda=False)))


def test_timing_never_moves_or_changes_the_callers_model(monkeypatch, tmp_path: Path):
    """The latency meter (ONNX Runtime and PyTorch timing) exports and times copies: the model object keeps its
    device, mode and parameters."""
    from stages._latency import LatencyMeter

    _torch_on_cpu(monkeypatch)
    cfg = _cfg(runtime={"device": "cpu"}, validate={"runtime": "torch-cuda", "threads": 1})
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 8, 3), torch.nn.BatchNorm2d(8), torch.nn.Flatten(),
                                torch.nn.LazyLinear(4))
    model(torch.zeros(1, 1, 32, 32))
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    for t in (target.resolve(cfg), target.resolve(_cfg(runtime={"device": "cpu"}), _machine())):
        meter = LatencyMeter(cfg, t, runs=3, warmup=1)
        assert meter.runtime == t.timing
        base = tmp_path / f"{t.timing}.onnx"
        profile, _ = meter.measure(model, save_as=base, fresh=True)
        assert profile.total_ms > 0
        _, (speed, low, high) = meter.measure(model, base, (2, 0.01), fresh=True)
        assert low <= speed <= high
        assert model.training and next(model.parameters()).device.type == "cpu"
        assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_a_pipeline_on_pytorch_gpu_timing_times_the_loop_and_validate_alike(monkeypatch, tmp_path: Path):
    """No TensorRT and no ONNX Runtime CUDA provider (stand-ins, PyTorch run on the CPU): the speedup loop and
    validate both time torch-cuda, the ONNX file is scored on ONNX Runtime's CPU provider, and summary.json
    records the resolved target."""
    import json

    from tests.conftest import run_here, write_config

    _torch_on_cpu(monkeypatch)
    cfg = write_config(tmp_path / "c.yaml", tiny_config(
        validate={"runtime": "torch-cuda", "threads": 1}, runtime={"device": "cpu", "threads": 1},
        filter_prune={"target_speedup": 1.3, "target_flops_reduction": None, "steps": 2},
        layer_truncate={"enabled": False}, finetune={"enabled": False}))
    res = run_here("pipeline", str(cfg), "--run-dir", str(tmp_path / "run"))
    assert res.returncode in (0, 3), res.stderr[-2000:]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["target"]["runtime"] == "torch-cuda" and summary["target"]["timing"] == "torch-cuda"
    assert summary["target"]["scored_on"] == "onnxruntime-cpu"
    assert summary["latency_ms"]["backend"] == "torch-cuda"
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
    assert manifest["stages"]["filter_prune"]["metrics"]["latency_runtime"] == "torch-cuda"
    assert "deployment target: torch-cuda" in (tmp_path / "run" / "log.txt").read_text()
