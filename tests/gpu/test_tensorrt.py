"""TensorRT engines on a CUDA machine (marked gpu; `make gpu-check` runs them, the default suite skips them).

They need the gpu extra (`pip install -e '.[gpu]'`) and an NVIDIA GPU; nothing here may be edited to run them.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from core.config import ModelConfig
from core.models import build_model
from core.rundir import sha256
from export import tensorrt
from export.config import ExportConfig
from export.runtime import open_artifact
from export.torch2onnx import torch2onnx
from tests.conftest import resnet50_config, run_cli, tiny_config, write_config

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(tensorrt.unavailable_reason() is not None,
                                 reason=f"TensorRT engines need the gpu extra and a CUDA device "
                                        f"({tensorrt.unavailable_reason()})")]

DEMO = ModelConfig(source="timm", name="resnet18", num_classes=10, in_chans=1, input_size=(32, 32))
RESNET50 = ModelConfig(source="torchvision", name="resnet50", num_classes=1000, in_chans=3, input_size=(224, 224))
TOLERANCE = {"fp32": 1e-3, "fp16": 5e-2}  # max |engine - PyTorch| relative to max |PyTorch logit|


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
@pytest.mark.parametrize("spec", [DEMO, RESNET50], ids=["demo", "resnet50"])
def test_engine_builds_and_matches_pytorch(tmp_path: Path, spec: ModelConfig, precision: str):
    torch.manual_seed(0)
    model = build_model(spec).eval()
    onnx_path, engine_path = tmp_path / "m.onnx", tmp_path / "m.engine"
    torch2onnx(model, torch.zeros(2, spec.in_chans, *spec.input_size), onnx_path, ExportConfig(), {})
    side = tensorrt.build_engine(onnx_path, engine_path, tensorrt.EngineSpec(precision=precision, max_batch=8))
    assert side["precision"] == precision and side["source_onnx_sha256"] == sha256(onnx_path)
    assert side["profile"] == {"min_batch": 1, "opt_batch": 1, "max_batch": 8}
    assert json.loads(tensorrt.sidecar_of(engine_path).read_text()) == side
    assert side["inputs"][0]["shape"][1:] == [spec.in_chans, *spec.input_size]
    engine = open_artifact(engine_path, "tensorrt")
    assert engine.precision == precision and engine.max_batch == 8
    x = torch.randn(11, spec.in_chans, *spec.input_size)  # 11 > max batch: run in chunks of 8 and 3
    with torch.no_grad():
        ref = model(x).numpy()
    out = engine(x.numpy())
    assert out.shape == ref.shape
    assert np.abs(out - ref).max() / np.abs(ref).max() <= TOLERANCE[precision]
    assert engine.time_once(x[:1].numpy()) > 0


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_pipeline_validates_and_times_base_vs_compressed_engines(tmp_path: Path, precision: str):
    cfg = tiny_config(
        export={"tensorrt": {"mode": "required", "precision": precision, "max_batch": 64}},
        validate={"runtime": "tensorrt", "warmup": 10, "runs": 50,
                  "gates": {"max_parity_error": 1e-3, "max_parity_error_fp16": 5e-2}},
        runtime={"progress": False, "device": "cuda"})
    run = tmp_path / "run"
    done = run_cli("pipeline", str(write_config(tmp_path / "c.yaml", cfg)), "--run-dir", str(run))
    assert done.returncode == 0, done.stderr[-3000:]
    s = json.loads((run / "summary.json").read_text())
    assert s["artifacts"]["tensorrt"] == "model.engine" and s["artifacts"]["tensorrt_status"] == "built"
    assert s["latency_ms"]["backend"] == "tensorrt" and s["latency_ms"]["precision"] == precision
    assert s["latency_ms"]["base"] > 0 and s["latency_ms"]["compressed"] > 0
    # the GPU timed, and one feeding thread (not every core) for the busy-machine check
    assert s["latency_ms"]["device"] == torch.cuda.get_device_name() and s["latency_ms"]["threads"] == 1
    assert s["target"]["runtime"] == "tensorrt" and s["target"]["timing"] in ("onnxruntime-cuda", "torch-cuda")
    assert (run / "07_validate" / "base.engine").is_file()
    side = json.loads((run / "model.engine.json").read_text())
    assert side["source_onnx_sha256"] == sha256(run / "model.onnx")
    # the standalone verbs on the engine
    done = run_cli("validate", str(run / "model.engine"), "--config", str(tmp_path / "c.yaml"),
                   "--base", str(run / "07_validate" / "base.engine"))
    assert done.returncode == 0, done.stderr[-3000:]
    done = run_cli("export", str(run), "--format", "tensorrt")
    assert done.returncode == 0, done.stderr[-3000:]
    assert (run / "exports" / f"model.{precision}.engine").is_file()


def test_resnet50_pipeline_builds_an_engine(tmp_path: Path):
    cfg = resnet50_config(
        export={"tensorrt": {"mode": "required"}},
        validate={"runtime": "tensorrt", "warmup": 10, "runs": 50, "gates": {"max_parity_error": 1e-3}},
        runtime={"progress": False, "device": "cuda"})
    run = tmp_path / "run"
    done = run_cli("pipeline", str(write_config(tmp_path / "r50.yaml", cfg)), "--run-dir", str(run))
    assert done.returncode == 0, done.stderr[-3000:]
    s = json.loads((run / "summary.json").read_text())
    assert s["latency_ms"]["backend"] == "tensorrt" and s["gates"]["passed"]


def test_int8_engine_from_the_qdq_model_agrees_with_onnx_runtime(tmp_path: Path):
    """Explicit quantization: the engine built from model.int8.onnx decides as ONNX Runtime's INT8 kernels do."""
    from export.quantize import int8_model

    torch.manual_seed(0)
    model = build_model(DEMO).eval()
    fp32 = tmp_path / "m.onnx"
    torch2onnx(model, torch.zeros(2, DEMO.in_chans, *DEMO.input_size), fp32, ExportConfig(), {})
    rng = np.random.default_rng(0)
    batches = [rng.standard_normal((16, DEMO.in_chans, *DEMO.input_size)).astype(np.float32) for _ in range(4)]
    int8_model(fp32, tmp_path / "q.onnx", batches, "minmax", 99.999, [], {n for n, _ in model.named_modules()},
               tmp_path / "work")
    side = tensorrt.build_engine(tmp_path / "q.onnx", tmp_path / "q.engine",
                                 tensorrt.EngineSpec(precision="int8", max_batch=16))
    assert side["precision"] == "int8"
    engine, ort_int8 = open_artifact(tmp_path / "q.engine", "tensorrt"), open_artifact(tmp_path / "q.onnx",
                                                                                       "onnxruntime-cpu")
    x = rng.standard_normal((16, DEMO.in_chans, *DEMO.input_size)).astype(np.float32)
    a, b = engine(x), ort_int8(x)
    assert engine.precision == "int8"
    assert np.abs(a - b).max() / np.abs(b).max() < 0.1


def test_pipeline_with_an_int8_engine_validates_three_engines(tmp_path: Path):
    cfg = tiny_config(
        export={"quantize": "int8", "tensorrt": {"mode": "required", "precision": "int8", "max_batch": 64}},
        validate={"runtime": "tensorrt", "warmup": 10, "runs": 50, "gates": {"max_parity_error": 1e-3}},
        runtime={"progress": False, "device": "cuda"})
    run = tmp_path / "run"
    done = run_cli("pipeline", str(write_config(tmp_path / "c.yaml", cfg)), "--run-dir", str(run))
    assert done.returncode == 0, done.stderr[-3000:]
    s = json.loads((run / "summary.json").read_text())
    assert s["quantized"]["artifact"] == "model.engine" and s["quantized"]["precision"] == "int8"
    assert s["latency_ms"]["precision"] == "fp32" and s["parity"]["artifact"] == "compressed.engine"
    assert json.loads((run / "model.engine.json").read_text())["source_onnx"] == "model.int8.onnx"
