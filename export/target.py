"""The deployment target: where a run's artifact is scored and timed, resolved once from the config and the machine.

Every part that exports, times or validates reads this one object (the latency loop of filter_prune and
layer_truncate, the validate stage, `compress validate`), so the loop cannot meet a speedup target on one device
while validate times another. summary.json records it as `target`.

How `auto` resolves:
- runtime.device auto: CUDA when torch sees a GPU, else the CPU.
- validate.runtime auto: the TensorRT engine when the export stage will build one (export.tensorrt.mode required,
  or auto on a machine where TensorRT 10 can build); else on the CPU, ONNX Runtime on the CPU; on CUDA, ONNX
  Runtime's CUDA provider when installed, else PyTorch on the GPU (`torch-cuda`: the ONNX file is then scored
  on ONNX Runtime's CPU provider, and latency is PyTorch's, timed with CUDA events). An INT8 model without
  TensorRT runs on the CPU provider (ONNX Runtime's CUDA provider has no INT8 convolutions).
- The latency loop times with ONNX Runtime on the runtime's device: the engine's GPU through ONNX Runtime's CUDA
  provider where installed, else PyTorch with CUDA events (building an engine per pruning step would take
  minutes).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Any

from core.errors import UserInputError
from export.runtime import default_threads

GPU_RUNTIMES = ("onnxruntime-cuda", "tensorrt", "torch-cuda")


@dataclass(frozen=True)
class Machine:
    """What the resolution depends on besides the config; the real machine by default, stand-ins in tests."""

    cuda: bool
    ort_cuda_problem: str | None  # why ONNX Runtime cannot run on CUDA here, None when it can
    tensorrt_problem: str | None  # why TensorRT 10 cannot build engines here, None when it can
    cpu: str
    gpu: str | None

    @classmethod
    def here(cls) -> Machine:
        import torch

        from export.runtime import cpu_name, cuda_provider_problem
        from export.tensorrt import unavailable_reason

        cuda = torch.cuda.is_available()
        return cls(cuda=cuda, ort_cuda_problem=cuda_provider_problem(),
                   tensorrt_problem=unavailable_reason(),
                   cpu=cpu_name(), gpu=torch.cuda.get_device_name() if cuda else None)


@dataclass(frozen=True)
class Target:
    """Where the run trains (`device`), where its artifact is scored and timed (`runtime` on `hardware`), and
    how the latency loop times on the same hardware (`timing`)."""

    device: str  # cpu | cuda: where the stages run
    runtime: str  # what validate scores and times on (validate.runtime, auto resolved)
    timing: str  # what the pruning loop times with: onnxruntime-cpu, onnxruntime-cuda or torch-cuda
    precision: str  # of the shipped artifact: fp32, fp16 (TensorRT) or int8
    batch: int
    threads: int  # CPU threads that run (CPU runtimes) or feed (GPU runtimes) the model while timing
    tf32: bool  # TF32 math on GPU FP32 runtimes (off unless runtime.tf32 asks: FP32 parity needs it off)
    hardware: str | None  # the CPU or GPU model the runtime runs on
    why: str  # how the runtime was chosen, in words

    @property
    def timing_device(self) -> str:
        return "cpu" if self.timing == "onnxruntime-cpu" else "cuda"

    def without_engine(self, int8: bool) -> Target:
        """The target when the engine the export stage was to build is not there (mode auto, build skipped): the
        same GPU through ONNX Runtime's CUDA provider or PyTorch (an INT8 model: ONNX Runtime on the CPU)."""
        if self.runtime != "tensorrt":
            return self
        runtime = "onnxruntime-cpu" if int8 else self.timing
        return replace(self, runtime=runtime, precision="int8" if int8 else "fp32",
                       why=f"{self.why}, but no engine was built, so {runtime}")

    def record(self) -> dict[str, Any]:
        out = asdict(self)
        out["provider_options"] = {"use_tf32": "1" if self.tf32 else "0"} if "onnxruntime-cuda" in (
            self.runtime, self.timing) else {}
        return out


def resolve(config: Any, machine: Machine | None = None) -> Target:
    """The config's deployment target on this machine (or on `machine`, a stand-in); UserInputError with the
    repair when what the config asks for cannot run here."""
    m = machine or Machine.here()
    want, v, trt = config.runtime.device, config.validate_, config.export.tensorrt
    if want == "cuda" and not m.cuda:
        raise UserInputError("runtime.device is 'cuda' but no CUDA device is visible; set runtime.device: cpu or "
                             "auto")
    device = "cuda" if want == "cuda" or (want == "auto" and m.cuda) else "cpu"
    int8 = config.export.quantize == "int8"
    runtime, why = v.runtime, f"validate.runtime: {v.runtime}"
    if runtime == "auto":
        runtime, why = _auto(device, trt.mode, int8, m)
    _check_runnable(runtime, m)
    if runtime == "onnxruntime-cpu":
        timing = "onnxruntime-cpu"
    elif runtime == "torch-cuda" or m.ort_cuda_problem:
        timing = "torch-cuda"
    else:
        timing = "onnxruntime-cuda"
    if runtime == "tensorrt":
        precision = trt.precision
    else:
        precision = "int8" if int8 else "fp32"
    threads = (v.threads or default_threads()) if runtime == "onnxruntime-cpu" else 1
    return Target(device=device, runtime=runtime, timing=timing, precision=precision, batch=v.batch,
                  threads=threads, tf32=bool(config.runtime.tf32), hardware=m.gpu if runtime in GPU_RUNTIMES
                  else m.cpu, why=why)


def _auto(device: str, trt_mode: str, int8: bool, m: Machine) -> tuple[str, str]:
    # the export stage builds an engine whenever TensorRT can (whatever runtime.device says), and it is what ships
    if trt_mode == "required":
        return "tensorrt", "export.tensorrt.mode is required"
    if trt_mode == "auto" and m.tensorrt_problem is None:
        return "tensorrt", "export.tensorrt.mode is auto and TensorRT 10 can build engines here"
    if device == "cpu":
        return "onnxruntime-cpu", "runtime.device is cpu"
    no_trt = "export.tensorrt.mode is off" if trt_mode == "off" else f"no TensorRT engine ({m.tensorrt_problem})"
    if int8:
        return "onnxruntime-cpu", f"{no_trt}, and ONNX Runtime's CUDA provider has no INT8 convolutions"
    if m.ort_cuda_problem is None:
        return "onnxruntime-cuda", f"{no_trt}; ONNX Runtime's CUDA provider is installed"
    return "torch-cuda", (f"{no_trt} and no ONNX Runtime CUDA provider: latency is PyTorch's on the GPU (CUDA "
                          f"events); the ONNX file is scored on ONNX Runtime's CPU provider")


def _check_runnable(runtime: str, m: Machine) -> None:
    if runtime == "onnxruntime-cuda" and m.ort_cuda_problem:
        raise UserInputError(f"validate.runtime is 'onnxruntime-cuda' but {m.ort_cuda_problem}; or set "
                             f"validate.runtime: auto")
    if runtime in ("onnxruntime-cuda", "torch-cuda") and not m.cuda:
        raise UserInputError(f"validate.runtime is {runtime!r} but no CUDA device is visible; set validate.runtime: "
                             f"onnxruntime-cpu (or auto)")


def describe(config: Any) -> dict[str, Any]:
    """The resolved target's record, or {"error": why} when it cannot be resolved (for fingerprints and plans,
    which must not fail where preflight reports the problem)."""
    try:
        return resolve(config).record()
    except UserInputError as exc:
        return {"error": str(exc)}


def problems(config: Any) -> list[str]:
    """What preflight reports: why the target cannot be resolved here (none when it can)."""
    try:
        resolve(config)
    except UserInputError as exc:
        return [str(exc)]
    return []
