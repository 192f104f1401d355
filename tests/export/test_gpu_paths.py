"""The GPU path's control flow, run here with stand-ins for TensorRT and ONNX Runtime's CUDA provider.

The real APIs are exercised by the tests marked `gpu` (tests/gpu/, `make gpu-check` on a CUDA machine); these
check every decision the code takes around them on any machine: versions, fallbacks, profiles, sidecars.
"""

from __future__ import annotations

import hashlib
import json
import sys
import types
from pathlib import Path

import numpy as np
import pytest

from core.errors import UserInputError
from export import runtime, tensorrt
from export.config import GatesConfig
from export.validation import check_gates
from pipeline.config import load_config
from tests.conftest import tiny_config, write_config


def _fake_trt(version: str) -> types.ModuleType:
    trt = types.ModuleType("tensorrt")
    trt.__version__ = version

    class Logger:
        WARNING = 2
        made = 0

        def __init__(self, level):
            Logger.made += 1

    trt.Logger = Logger
    trt.BuilderFlag = types.SimpleNamespace()  # TensorRT 11 has no FP16 flag: touching it would raise
    return trt


@pytest.fixture
def trt_here(monkeypatch):
    """Pretend TensorRT and a GPU are present; the test installs the stand-in module it wants."""
    monkeypatch.setattr(tensorrt, "unavailable_reason", lambda: None)

    def install(version: str) -> types.ModuleType:
        fake = _fake_trt(version)
        monkeypatch.setitem(sys.modules, "tensorrt", fake)
        return fake

    return install


def test_tensorrt_11_is_refused_with_the_reason_before_any_api_call(trt_here, tmp_path: Path):
    trt_here("11.2.0")
    with pytest.raises(UserInputError, match=r"TensorRT 11.2.0 is installed.*TensorRT 10 API.*<11"):
        tensorrt.build_engine(tmp_path / "m.onnx", tmp_path / "m.engine", tensorrt.EngineSpec(precision="fp16"))
    trt_here("9.3.0")
    with pytest.raises(UserInputError, match="TensorRT 9.3.0 is installed"):
        tensorrt.require()


def test_tensorrt_11_through_the_cli_exits_2(trt_here, tmp_path: Path, capsys):
    from pipeline.cli import run

    trt_here("11.0.1")
    cfg = write_config(tmp_path / "c.yaml", tiny_config())
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "manifest.json").write_text('{"stages": {}}')
    assert run(["export", str(tmp_path / "run"), "--format", "tensorrt", "--config", str(cfg)]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "TensorRT 11.0.1 is installed" in err and "Traceback" not in err and "AttributeError" not in err


def test_the_gpu_extra_excludes_tensorrt_11():
    import tomllib

    from packaging.requirements import Requirement

    from tests.conftest import REPO

    extra = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]["gpu"]
    spec = next(Requirement(r).specifier for r in extra if r.startswith("tensorrt"))
    assert not spec.contains("11.0.0") and spec.contains("10.16.1") and not spec.contains("9.3.0")


def test_one_tensorrt_logger_per_process(trt_here):
    fake = trt_here("10.16.1")
    assert tensorrt._logger(fake) is tensorrt._logger(fake)
    assert fake.Logger.made == 1


class _Session:
    def __init__(self, path, opts, providers):
        self.providers = providers

    def get_providers(self):
        return ["CPUExecutionProvider"]  # what ONNX Runtime reports after a CUDA provider failed to load


def test_cuda_runtime_refuses_a_session_that_fell_back_to_the_cpu(monkeypatch, tmp_path: Path):
    import onnxruntime as ort

    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    monkeypatch.setattr(ort, "InferenceSession", _Session)
    with pytest.raises(UserInputError, match="fell back to CPUExecutionProvider"):
        runtime.OrtModel(tmp_path / "m.onnx", provider="cuda")


@pytest.mark.parametrize("installed, needle", [
    ({"onnxruntime": "1.32.0", "onnxruntime-gpu": "1.31.1"},
     "pip install --force-reinstall --no-deps onnxruntime-gpu==1.31.1"),
    ({"onnxruntime-gpu": "1.31.1"}, "CUDA provider is not available"),
    ({"onnxruntime": "1.32.0"}, "make install-gpu"),
])
def test_missing_cuda_provider_names_the_repair_and_never_an_uninstall(monkeypatch, installed, needle):
    import onnxruntime as ort

    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CPUExecutionProvider"])
    monkeypatch.setattr(runtime, "_installed", lambda dist: installed.get(dist))
    problem = runtime.cuda_provider_problem()
    assert needle in problem and "pip uninstall" not in problem


def test_an_engine_whose_sidecar_comes_from_another_build_is_refused(tmp_path: Path):
    engine = tmp_path / "model.engine"
    engine.write_bytes(b"plan bytes of build 2")
    side = tensorrt.sidecar_of(engine)
    side.write_text(json.dumps({"precision": "fp16", "engine_sha256": hashlib.sha256(b"build 1").hexdigest()}))
    with pytest.raises(UserInputError, match="does not match its sidecar"):
        tensorrt.read_sidecar(engine, engine.read_bytes())
    side.write_text(json.dumps({"precision": "fp16", "engine_sha256": hashlib.sha256(engine.read_bytes())
                                .hexdigest()}))
    assert tensorrt.read_sidecar(engine, engine.read_bytes())["precision"] == "fp16"
    side.unlink()
    assert tensorrt.read_sidecar(engine, engine.read_bytes()) == {}


class _Context:
    def __init__(self, accepts: bool):
        self.accepts, self.shapes = accepts, []

    def set_input_shape(self, name, shape):
        self.shapes.append(shape)
        return self.accepts


def _engine_stub(min_batch: int, max_batch: int, accepts: bool = True) -> tensorrt.TrtModel:
    model = tensorrt.TrtModel.__new__(tensorrt.TrtModel)
    model.path, model.input_name, model.input_shape = Path("m.engine"), "input", (1, 8, 8)
    model.min_batch, model.max_batch, model.context = min_batch, max_batch, _Context(accepts)
    return model


def test_an_out_of_profile_batch_is_a_config_error(tmp_path: Path):
    with pytest.raises(UserInputError, match="batch 64 is outside the optimization profile"):
        _engine_stub(1, 32)._set_shape(64)
    with pytest.raises(UserInputError, match="outside the optimization profile"):
        _engine_stub(1, 32, accepts=False)._set_shape(8)  # TensorRT said no: its return value is checked
    cfg = write_config(tmp_path / "c.yaml", tiny_config(validate={"batch": 64}))
    with pytest.raises(UserInputError, match="validate.batch 64 is outside the engine's optimization profile"):
        load_config(cfg)
    load_config(cfg, ["export.tensorrt.max_batch=64"])
    load_config(cfg, ["export.tensorrt.mode=off"])


def test_a_short_last_chunk_is_padded_up_to_the_profiles_smallest_batch():
    import torch

    model = _engine_stub(4, 8)
    seen = []

    def run(chunk):
        seen.append(len(chunk))
        model.buffers = {"logits": torch.from_numpy(chunk.reshape(len(chunk), -1)[:, :3].copy())}

    model._run, model.outputs = run, ["logits"]
    model.stream = types.SimpleNamespace(synchronize=lambda: None)
    x = np.arange(10 * 64, dtype=np.float32).reshape(10, 1, 8, 8)
    out = model(x)
    assert seen == [8, 4] and out.shape == (10, 3)
    np.testing.assert_array_equal(out, x.reshape(10, -1)[:, :3])


def test_fp16_parity_is_judged_relative_to_the_logits():
    summary = {"base": None, "compressed": {"top1": 1.0},
               "latency_ms": {"precision": "fp16", "compressed": 1.0, "speedup": None, "backend": "tensorrt",
                              "batch": 1},
               "parity": {"max_abs_diff": 0.3, "max_rel_diff": 0.02, "meaningful": True}}
    assert check_gates(summary, GatesConfig(max_parity_error_fp16=5e-2))[0] == []  # 0.3 on logits of 15
    summary["parity"]["max_rel_diff"] = 0.08
    fails, _ = check_gates(summary, GatesConfig(max_parity_error_fp16=5e-2))
    assert len(fails) == 1 and "max_rel_diff" in fails[0]


def test_the_engine_is_rebuilt_when_tensorrt_or_the_gpu_changes(monkeypatch):
    from pipeline.config import Config
    from pipeline.plan import stage_hashes
    from stages import PIPELINE

    cfg = Config.model_validate(tiny_config())
    export = PIPELINE.index("export")
    hashes = {}
    for fp in ("tensorrt 10.16.1 on NVIDIA L4", "tensorrt 10.17.0 on NVIDIA L4", "tensorrt 10.16.1 on NVIDIA A10G"):
        monkeypatch.setattr(tensorrt, "engine_fingerprint", lambda fp=fp: fp)
        hashes[fp] = stage_hashes(cfg, PIPELINE)
    values = list(hashes.values())
    assert len({h[export] for h in values}) == 3, "each version or GPU gives the export stage another hash"
    assert len({h[export - 1] for h in values}) == 1, "stages before export are not affected"


def _recording_trt(layer_types: list[str], batch: int = -1) -> types.ModuleType:
    """A TensorRT 10 stand-in that records what the builder is asked for; the network holds `layer_types` and
    takes a batch of `batch` (-1: dynamic)."""
    trt = _fake_trt("10.16.1")
    calls: dict[str, list] = {"network_flags": [], "set_flag": [], "clear_flag": [], "profiles": []}
    trt.calls = calls
    trt.NetworkDefinitionCreationFlag = types.SimpleNamespace(STRONGLY_TYPED=5)
    trt.BuilderFlag = types.SimpleNamespace(FP16="FP16", TF32="TF32", INT8="INT8")
    trt.LayerType = types.SimpleNamespace(QUANTIZE="Q", DEQUANTIZE="DQ", CONVOLUTION="CONV")
    trt.MemoryPoolType = types.SimpleNamespace(WORKSPACE="ws")

    class Tensor:
        name, shape, dtype = "input", (batch, 1, 8, 8), "float32"

    class Network:
        num_layers, num_inputs, num_outputs = len(layer_types), 1, 1

        def get_layer(self, i):
            return types.SimpleNamespace(type=getattr(trt.LayerType, layer_types[i]))

        def get_input(self, i):
            return Tensor()

        def get_output(self, i):
            return Tensor()

    class Config:
        def set_memory_pool_limit(self, *a):
            pass

        def set_flag(self, f):
            calls["set_flag"].append(f)

        def clear_flag(self, f):
            calls["clear_flag"].append(f)

        def add_optimization_profile(self, p):
            calls["profiles"].append(p)
            return 0  # TensorRT returns the profile's index, -1 when it refuses it

    class Profile:
        def set_shape(self, *a):
            pass

    class Builder:
        def __init__(self, logger):
            pass

        def create_network(self, flags):
            calls["network_flags"].append(flags)
            return Network()

        def create_builder_config(self):
            return Config()

        def create_optimization_profile(self):
            return Profile()

        def build_serialized_network(self, network, config):
            return b"plan"

    class OnnxParser:
        num_errors = 0

        def __init__(self, network, logger):
            pass

        def parse_from_file(self, path):
            return True

    trt.Builder, trt.OnnxParser = Builder, OnnxParser
    return trt


@pytest.mark.parametrize("precision, layers, strongly_typed, flags", [
    ("int8", ["DEQUANTIZE", "CONVOLUTION", "QUANTIZE"], True, []),
    ("fp16", ["CONVOLUTION"], False, ["FP16"]),
    ("fp32", ["CONVOLUTION"], False, []),
])
def test_an_int8_engine_is_a_strongly_typed_build_of_the_qdq_model(trt_here, monkeypatch, tmp_path: Path,
                                                                     precision, layers, strongly_typed, flags):
    """Explicit quantization in TensorRT 10: the Q/DQ nodes decide what runs in INT8, the network is strongly
    typed and no precision flag is set; FP16 and FP32 builds are weakly typed as before."""
    import torch

    fake = _recording_trt(layers)
    monkeypatch.setitem(sys.modules, "tensorrt", fake)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "stand-in GPU")
    (tmp_path / "m.onnx").write_bytes(b"onnx")
    side = tensorrt.build_engine(tmp_path / "m.onnx", tmp_path / "m.engine", tensorrt.EngineSpec(precision=precision))
    assert fake.calls["network_flags"] == [1 << 5 if strongly_typed else 0]
    assert fake.calls["set_flag"] == flags and side["precision"] == precision
    assert (tmp_path / "m.engine").read_bytes() == b"plan"
    assert len(fake.calls["profiles"]) == 1, "a dynamic batch takes its optimization profile"
    assert fake.calls["clear_flag"] == ["TF32"], "FP32 work without TF32, the FP32 layers of INT8 engines too"
    asked = _recording_trt(layers)
    monkeypatch.setitem(sys.modules, "tensorrt", asked)
    tensorrt.build_engine(tmp_path / "m.onnx", tmp_path / "t.engine", tensorrt.EngineSpec(precision=precision,
                                                                                         tf32=True))
    assert asked.calls["clear_flag"] == [], "runtime.tf32: true keeps TensorRT's default"


def test_a_static_batch_network_gets_no_profile_and_a_refused_profile_is_an_error(trt_here, monkeypatch, tmp_path):
    import torch

    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "stand-in GPU")
    (tmp_path / "m.onnx").write_bytes(b"onnx")
    static = _recording_trt(["CONVOLUTION"], batch=1)
    monkeypatch.setitem(sys.modules, "tensorrt", static)
    tensorrt.build_engine(tmp_path / "m.onnx", tmp_path / "m.engine", tensorrt.EngineSpec())
    assert static.calls["profiles"] == [], "an empty profile is an error in TensorRT 10"
    refused = _recording_trt(["CONVOLUTION"])
    refused.Builder(None).create_builder_config().__class__.add_optimization_profile = lambda self, p: -1
    monkeypatch.setitem(sys.modules, "tensorrt", refused)
    with pytest.raises(UserInputError, match="TensorRT refused the optimization profile"):
        tensorrt.build_engine(tmp_path / "m.onnx", tmp_path / "n.engine", tensorrt.EngineSpec())


def test_an_int8_engine_from_a_model_without_qdq_is_refused(trt_here, monkeypatch, tmp_path: Path):
    monkeypatch.setitem(sys.modules, "tensorrt", _recording_trt(["CONVOLUTION"]))
    (tmp_path / "m.onnx").write_bytes(b"onnx")
    with pytest.raises(UserInputError, match="needs a QDQ model.*export.quantize: int8"):
        tensorrt.build_engine(tmp_path / "m.onnx", tmp_path / "m.engine", tensorrt.EngineSpec(precision="int8"))
    assert not (tmp_path / "m.engine").exists()


@pytest.mark.parametrize("precision, built, shipped_role", [
    ("int8", {"base": ("base.onnx", "fp32"), "compressed": ("model.onnx", "fp32")}, "quantized"),
    ("fp16", {"base": ("base.onnx", "fp16"), "quantized": ("model.int8.onnx", "int8")}, "compressed"),
])
def test_validate_on_tensorrt_builds_each_role_the_shipped_engine_does_not_fill(monkeypatch, tmp_path: Path,
                                                                                precision, built, shipped_role):
    from pipeline.config import Config
    from stages import validate

    cfg = Config.model_validate(tiny_config(export={"quantize": "int8", "tensorrt": {"precision": precision}}))
    builds = {}

    def build(source, path, spec):
        builds[path.stem] = (source.name, spec.precision)
        path.write_bytes(b"plan")

    monkeypatch.setattr(tensorrt, "build_engine", build)
    ctx = types.SimpleNamespace(config=cfg, run_dir=types.SimpleNamespace(root=tmp_path), stage_dir=tmp_path / "v")
    ctx.stage_dir.mkdir()
    files: list[Path] = []
    arts = validate.artifacts(ctx, "tensorrt", tmp_path / "v" / "base.onnx", True, files)
    assert builds == built
    assert arts[shipped_role] == tmp_path / "model.engine"
    assert set(arts) == {"base", "compressed", "quantized"}
