"""TensorRT 10: build a serialized engine from an ONNX file, and run one (buffers allocated once, CUDA timing).

`tensorrt` and CUDA are imported lazily: nothing here is needed on a CPU machine unless a TensorRT engine is asked
for. Only the name-based TensorRT 10 API is used (no bindings, no implicit batch, no `build_engine`).
"""

from __future__ import annotations

import functools
import importlib.util
import json
import platform
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from core.errors import UserInputError
from core.rundir import atomic_json, atomic_write, sha256

INSTALL_HINT = ("install the gpu extra on a machine with an NVIDIA GPU and driver: pip install "
                "'idap-compress[gpu]' (tensorrt 10.x and onnxruntime-gpu), then pip install --force-reinstall "
                "--no-deps onnxruntime-gpu==<its version> (in this tool's own repository: `make install-gpu`)")
SUPPORTED = (10, 11)  # TensorRT majors this code is written for: [10, 11)
VERSION_HINT = ("this tool builds engines with the TensorRT 10 API (BuilderFlag.FP16, weakly typed networks), which "
                "TensorRT 11 removed in favour of strongly typed networks; install a 10.x release: "
                "pip install 'tensorrt>=10.16,<11'")


def installed_version() -> str | None:
    """The importable tensorrt module's own version (trt.__version__: right whichever wheel brought it, `tensorrt`
    or `tensorrt-cu13`), or None when it is not installed; an install that cannot be imported raises."""
    if importlib.util.find_spec("tensorrt") is None:
        return None
    import tensorrt as trt

    return str(trt.__version__)


def unavailable_reason() -> str | None:
    """Why a TensorRT engine cannot be built or run here, or None when it can: not installed, not importable, a
    major version this code was not written for (TensorRT 11 is what a plain `pip install tensorrt` gives), or
    no CUDA device."""
    try:
        version = installed_version()
    except Exception as exc:  # noqa: BLE001 - a broken install (missing CUDA libraries): a reason, not a crash
        return f"the tensorrt package is installed but cannot be imported ({type(exc).__name__}: {exc})"
    if version is None:
        return "the tensorrt Python package is not installed"
    try:
        check_version(version)
    except UserInputError:
        return f"TensorRT {version} is installed, but {VERSION_HINT}"
    import torch

    if not torch.cuda.is_available():
        return "no CUDA device is visible (torch.cuda.is_available() is False)"
    return None


AUTO_HINT = "or set export.tensorrt.mode: auto (skip the engine where TensorRT is missing) or off"


def require(alternative: str = AUTO_HINT) -> Any:
    """The tensorrt module, or a clear error naming the gpu extra and `alternative`."""
    reason = unavailable_reason()
    if reason:
        raise UserInputError(f"TensorRT is required but {reason}; {INSTALL_HINT}; {alternative}")
    import tensorrt as trt

    check_version(trt.__version__)
    return trt


def check_version(version: str) -> None:
    """TensorRT outside [10, 11) is refused with the reason, before any of its API is touched."""
    try:
        major = int(str(version).split(".")[0])
    except ValueError:
        major = -1
    if not SUPPORTED[0] <= major < SUPPORTED[1]:
        raise UserInputError(f"TensorRT {version} is installed, but {VERSION_HINT}")


def engine_fingerprint() -> str:
    """What an engine depends on besides its ONNX file: the TensorRT version and the GPU model. Part of the
    export stage's config hash, so a cached run directory rebuilds its engine after an upgrade or on another GPU."""
    reason = unavailable_reason()
    if reason is not None:
        return f"unavailable: {reason}"
    import torch

    return f"tensorrt {installed_version()} on {torch.cuda.get_device_name()}"


@dataclass(frozen=True)
class EngineSpec:
    """What the builder is asked for."""

    precision: str = "fp32"  # fp32 | fp16 | int8 (from a QDQ model)
    workspace_gb: float = 4.0
    min_batch: int = 1
    opt_batch: int = 1
    max_batch: int = 32
    tf32: bool = False  # TF32 math in FP32 layers (runtime.tf32); off, FP32 means FP32


@functools.cache
def _logger(trt: Any) -> Any:
    """The process's one TensorRT logger: TensorRT keeps the first it is given and warns about later ones."""
    return trt.Logger(trt.Logger.WARNING)


def build_engine(onnx_path: Path, engine_path: Path, spec: EngineSpec) -> dict[str, Any]:
    """Parse `onnx_path`, build a serialized TensorRT plan, write it and its `.engine.json` sidecar atomically.

    The `.engine` file is the plan exactly as TensorRT serialized it (nothing prepended), so `trtexec
    --loadEngine` and any TensorRT runtime read it. Returns the sidecar's content.
    """
    trt = require()
    import torch

    logger = _logger(trt)
    builder = trt.Builder(logger)
    # TensorRT 10: explicit batch is the only mode. An INT8 engine is built from a QDQ model (explicit
    # quantization) as a strongly typed network: the Q/DQ nodes say what runs in INT8, the rest runs in the
    # model's FP32, and no precision flag may be set
    int8 = spec.precision == "int8"
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED) if int8 else 0)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = [f"node {parser.get_error(i).node()}: {parser.get_error(i).desc()} ({parser.get_error(i).code()})"
                  for i in range(parser.num_errors)]
        raise UserInputError(f"TensorRT's ONNX parser rejected {onnx_path}:\n  - " + "\n  - ".join(errors) +
                             "\nTry another export.opset or export.exporter, or check the operators against the "
                             "TensorRT ONNX support matrix")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(spec.workspace_gb * (1 << 30)))
    if int8 and not _has_qdq(network):
        raise UserInputError(f"export.tensorrt.precision int8 needs a QDQ model, and {onnx_path.name} has no "
                             f"QuantizeLinear/DequantizeLinear nodes; build it from the model.int8.onnx that "
                             f"export.quantize: int8 writes")
    if spec.precision == "fp16":
        config.set_flag(trt.BuilderFlag.FP16)
    if not spec.tf32:  # FP32 means FP32 (also the FP32 layers of an INT8 QDQ engine): TensorRT would otherwise
        config.clear_flag(trt.BuilderFlag.TF32)  # use TF32 tensor cores on Ampere and newer
    profile = builder.create_optimization_profile()
    inputs, outputs, dynamic = [], [], False
    for i in range(network.num_inputs):
        t = network.get_input(i)
        shape = tuple(t.shape)
        if shape[0] == -1:
            rest = shape[1:]
            profile.set_shape(t.name, (spec.min_batch, *rest), (spec.opt_batch, *rest), (spec.max_batch, *rest))
            dynamic = True
        inputs.append({"name": t.name, "shape": list(shape), "dtype": str(t.dtype)})
    for i in range(network.num_outputs):
        t = network.get_output(i)
        outputs.append({"name": t.name, "shape": list(t.shape), "dtype": str(t.dtype)})
    # a static-batch network takes no profile (an empty one is an error in TensorRT 10); a dynamic one must take it
    if dynamic and config.add_optimization_profile(profile) < 0:
        raise UserInputError(f"TensorRT refused the optimization profile batches {spec.min_batch}/{spec.opt_batch}/"
                             f"{spec.max_batch} for {onnx_path.name}; set export.tensorrt.min_batch <= opt_batch <= "
                             f"max_batch")
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise RuntimeError(f"TensorRT could not build an engine from {onnx_path} (the reason is in the TensorRT log "
                           f"above); out-of-memory builds pass with a larger export.tensorrt.workspace_gb or a "
                           f"smaller export.tensorrt.max_batch")
    atomic_write(engine_path, bytes(memoryview(plan)))
    sidecar = {
        "engine": engine_path.name, "inputs": inputs, "outputs": outputs, "precision": spec.precision,
        "profile": {"min_batch": spec.min_batch, "opt_batch": spec.opt_batch, "max_batch": spec.max_batch},
        "workspace_gb": spec.workspace_gb, "tensorrt": trt.__version__, "cuda": torch.version.cuda,
        "gpu": torch.cuda.get_device_name(), "host": platform.node(), "source_onnx": onnx_path.name,
        "source_onnx_sha256": sha256(onnx_path), "engine_sha256": sha256(engine_path),
    }
    atomic_json(sidecar_of(engine_path), sidecar)
    return sidecar


def _has_qdq(network: Any) -> bool:
    import tensorrt as trt

    kinds = (trt.LayerType.QUANTIZE, trt.LayerType.DEQUANTIZE)
    return any(network.get_layer(i).type in kinds for i in range(network.num_layers))


def sidecar_of(engine_path: Path) -> Path:
    return engine_path.with_name(engine_path.name + ".json")


class TrtModel:
    """A deserialized engine on the current CUDA device.

    Device buffers are allocated once, for the profile's largest batch; a call with a smaller batch uses the
    leading slice. Timing brackets one `execute_async_v3` with CUDA events on the engine's stream.
    """

    backend = "tensorrt"

    def __init__(self, path: Path) -> None:
        trt = require("or score the ONNX model instead (runtime onnxruntime-cpu)")
        import torch

        self.torch = torch
        self.path = Path(path)
        plan = self.path.read_bytes()
        self.sidecar = read_sidecar(self.path, plan)
        runtime = trt.Runtime(_logger(trt))
        self.engine = runtime.deserialize_cuda_engine(plan)
        if self.engine is None:
            raise UserInputError(f"{self.path} is not a TensorRT engine this TensorRT ({trt.__version__}) and GPU "
                                 f"can load; engines are tied to the TensorRT version and GPU that built them: "
                                 f"rebuild it with `compress export RUN_DIR --format tensorrt`")
        self.context = self.engine.create_execution_context()
        self.stream = torch.cuda.Stream()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.inputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.outputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        if len(self.inputs) != 1:
            raise UserInputError(f"{self.path} has {len(self.inputs)} inputs; only single-input classifiers are "
                                 f"supported")
        self.input_name = self.inputs[0]
        shape = tuple(self.engine.get_tensor_shape(self.input_name))
        if shape[0] == -1:
            min_shape, _, max_shape = self.engine.get_tensor_profile_shape(self.input_name, 0)
            self.min_batch, self.max_batch = int(min_shape[0]), int(max_shape[0])
        else:
            self.min_batch = self.max_batch = int(shape[0])
        self.input_shape = shape[1:]
        self.precision = self.sidecar.get("precision", "unknown")
        # what summary.json's latency_ms records: the GPU timed, and the one host thread that feeds it (so that the
        # busy-machine check counts one timing core, not all of them)
        self.device = torch.cuda.get_device_name()
        self.threads = 1
        dev = torch.device("cuda")
        self.buffers: dict[str, Any] = {}
        self._set_shape(self.max_batch)
        for n in names:
            dtype = _torch_dtype(torch, trt.nptype(self.engine.get_tensor_dtype(n)))
            self.buffers[n] = torch.empty(tuple(self.context.get_tensor_shape(n)), dtype=dtype, device=dev)
        self._batch = -1

    def _set_shape(self, batch: int) -> None:
        if not self.min_batch <= batch <= self.max_batch or \
                not self.context.set_input_shape(self.input_name, (batch, *self.input_shape)):
            raise UserInputError(f"batch {batch} is outside the optimization profile of {self.path.name} (batches "
                                 f"{self.min_batch} to {self.max_batch}); set validate.batch within it, or rebuild "
                                 f"the engine with export.tensorrt.min_batch/max_batch around it")

    def _bind(self, batch: int) -> None:
        if batch == self._batch:
            return
        self._set_shape(batch)
        for n, buf in self.buffers.items():
            self.context.set_tensor_address(n, buf[:batch].data_ptr())
        self._batch = batch

    def _run(self, x: np.ndarray) -> None:
        torch = self.torch
        self._bind(len(x))
        with torch.cuda.stream(self.stream):
            self.buffers[self.input_name][: len(x)].copy_(torch.from_numpy(np.ascontiguousarray(x)), non_blocking=False)
        if not self.context.execute_async_v3(self.stream.cuda_stream):
            raise RuntimeError(f"TensorRT execution of {self.path} failed")

    def __call__(self, x: np.ndarray) -> np.ndarray:
        outs = []
        for i in range(0, len(x), self.max_batch):
            chunk = x[i: i + self.max_batch].astype(np.float32)
            n = len(chunk)
            if n < self.min_batch:  # a short last chunk is padded up to the profile's smallest batch
                chunk = np.concatenate([chunk, np.repeat(chunk[-1:], self.min_batch - n, axis=0)])
            self._run(chunk)
            self.stream.synchronize()
            outs.append(self.buffers[self.outputs[0]][:n].float().cpu().numpy())
        return np.concatenate(outs)

    def time_once(self, x: np.ndarray) -> float:
        """Device time of one inference in milliseconds (input copied beforehand, not timed)."""
        torch = self.torch
        self._bind(len(x))
        with torch.cuda.stream(self.stream):
            self.buffers[self.input_name][: len(x)].copy_(torch.from_numpy(np.ascontiguousarray(x,
                                                                                              dtype=np.float32)))
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record(self.stream)
        if not self.context.execute_async_v3(self.stream.cuda_stream):
            raise RuntimeError(f"TensorRT execution of {self.path} failed")
        end.record(self.stream)
        end.synchronize()
        return float(start.elapsed_time(end))


def read_sidecar(path: Path, plan: bytes) -> dict[str, Any]:
    """The engine's sidecar, checked against the engine's bytes: an engine and a sidecar from two different
    builds (an interrupted rebuild, a copied file) are refused; an engine without a sidecar loads as is."""
    side = sidecar_of(path)
    if not side.is_file():
        return {}
    try:
        data = json.loads(side.read_text())
    except json.JSONDecodeError as exc:
        raise UserInputError(f"{side} is not valid JSON ({exc}); rebuild the engine with `compress export RUN_DIR "
                             f"--format tensorrt`") from None
    import hashlib

    want = data.get("engine_sha256")
    if want and want != hashlib.sha256(plan).hexdigest():
        raise UserInputError(f"{path.name} does not match its sidecar {side.name} (the engine's sha256 differs: the "
                             f"two come from different builds, e.g. an interrupted rebuild); rebuild the engine with "
                             f"`compress export RUN_DIR --format tensorrt` or re-run the pipeline --from export")
    return data


def _torch_dtype(torch: Any, np_dtype: Any) -> Any:
    return {np.float32: torch.float32, np.float16: torch.float16, np.int32: torch.int32, np.int64: torch.int64,
            np.int8: torch.int8, np.bool_: torch.bool}[np.dtype(np_dtype).type]
