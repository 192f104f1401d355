"""Runtimes that score and time a deployed artifact: ONNX Runtime (CPU or CUDA provider) and TensorRT engines."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from core.errors import UserInputError

RUNTIMES = ("onnxruntime-cpu", "onnxruntime-cuda", "tensorrt")  # what runs an exported file
# torch-cuda times the PyTorch model itself on the GPU (TorchModel): the GPU latency where neither TensorRT nor
# ONNX Runtime's CUDA provider is installed; it runs no file, so artifacts are scored on onnxruntime-cpu


class Runtime(Protocol):
    backend: str
    precision: str

    def __call__(self, x: np.ndarray) -> np.ndarray: ...

    def time_once(self, x: np.ndarray) -> float: ...


def ort_providers(provider: str, tf32: bool = False) -> list[Any]:
    """The execution providers of a session on `provider` ("cpu" or "cuda"). On CUDA, TF32 is off unless asked for:
    ONNX Runtime enables it by default, which on Ampere and newer (A100, H100, H200) moves FP32 logits by about
    1e-3, fails the FP32 parity gate and disagrees with TensorRT's FP32 engines, which clear it."""
    if provider == "cuda":
        return [("CUDAExecutionProvider", {"use_tf32": "1" if tf32 else "0"})]
    return ["CPUExecutionProvider"]


class OrtModel:
    """An ONNX model in ONNX Runtime on the CPU or CUDA execution provider (FP32 as exported, or the INT8 QDQ
    model)."""

    def __init__(self, path: Path, threads: int | None = None, provider: str = "cpu", tf32: bool = False,
                 spinning: bool = True) -> None:
        """`spinning=False` parks the intra-op threads after every run instead of letting them spin (ONNX
        Runtime's default): slower on a sub-millisecond model, but several sessions timed in turn in one process
        no longer take each other's cores (see benchmarks/matched_speed.py)."""
        import onnxruntime as ort

        name = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}[provider]
        if provider == "cuda" and _precision_of(path) == "int8":
            raise UserInputError(f"{Path(path).name} is an INT8 model, and ONNX Runtime's CUDA provider has no INT8 "
                                 f"convolutions (it would dequantize and time FP32 work); run it on "
                                 f"onnxruntime-cpu, or build a TensorRT engine from it (export.tensorrt.precision: "
                                 f"int8)")
        problem = cuda_provider_problem() if provider == "cuda" else None
        if problem:
            raise UserInputError(f"cannot run {Path(path).name} on onnxruntime-cuda: {problem}; or set "
                                 f"validate.runtime: onnxruntime-cpu")
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        # Pinned, so that the same artifact is timed with the same threads in the pipeline and in `validate`.
        self.threads = threads or default_threads()
        opts.intra_op_num_threads = self.threads
        if not spinning:
            opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.backend = f"onnxruntime-{provider}"
        self.device = cpu_name() if provider == "cpu" else _gpu_name()
        try:
            self.session = ort.InferenceSession(str(path), opts, providers=ort_providers(provider, tf32))
        except Exception as exc:  # noqa: BLE001 - ONNX Runtime raises its own types for every kind of bad file
            first = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__
            raise UserInputError(f"{path} is not an ONNX model ONNX Runtime can load ({first}); pass the model.onnx "
                                 f"of a run, or re-export it with `compress export RUN_DIR`") from None
        used = self.session.get_providers()
        if not used or used[0] != name:
            # ONNX Runtime logs a failed CUDA provider and runs on the CPU: timings would be the CPU's
            fix = cuda_provider_problem() or "fix the CUDA set-up"
            raise UserInputError(f"ONNX Runtime could not use {name} for {Path(path).name} and fell back to "
                                 f"{', '.join(used) or 'nothing'} (its log above says why: usually CUDA or cuDNN "
                                 f"libraries of another major version); {fix}, or set validate.runtime: "
                                 f"onnxruntime-cpu")
        inp = self.session.get_inputs()[0]
        self.input_name = inp.name
        self.input_shape = tuple(inp.shape[1:])
        self.metadata = dict(self.session.get_modelmeta().custom_metadata_map)
        self.precision = self.metadata.get("precision", "fp32")  # model.int8.onnx says int8

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return self.session.run(None, {self.input_name: np.ascontiguousarray(x, dtype=np.float32)})[0]

    def time_once(self, x: np.ndarray) -> float:
        """Wall time of one inference in milliseconds (outputs are on the host when run() returns)."""
        feed = {self.input_name: np.ascontiguousarray(x, dtype=np.float32)}
        t0 = time.perf_counter()
        self.session.run(None, feed)
        return (time.perf_counter() - t0) * 1e3


class TorchModel:
    """A copy of a PyTorch model on a device, fed numpy like the other runtimes: on CUDA (`torch-cuda`) timed with
    CUDA events around the forward, the input already on the GPU, as TensorRT's time_once; on the CPU with wall
    time (tests run the GPU path's control flow that way). The caller's model is never moved or switched to
    eval."""

    precision = "fp32"

    def __init__(self, module: Any, device: str = "cuda", tf32: bool = False) -> None:
        import copy

        import torch

        if device == "cuda" and not torch.cuda.is_available():
            raise UserInputError("torch-cuda times the model on the GPU, but no CUDA device is visible; set "
                                 "validate.runtime: onnxruntime-cpu (or auto)")
        self.torch, self.tf32 = torch, tf32
        self.dev = torch.device(device)
        self.module = copy.deepcopy(module).eval().to(self.dev)
        self.backend = f"torch-{device}"
        self.device = torch.cuda.get_device_name(self.dev) if device == "cuda" else cpu_name()
        self.threads = 1 if device == "cuda" else torch.get_num_threads()

    def _run(self, t: Any) -> Any:
        torch = self.torch
        # FP32 means FP32, as in the ORT CUDA sessions and TensorRT FP32 engines: cuDNN would use TF32 by default
        before = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
        torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = self.tf32
        try:
            with torch.inference_mode():
                return self.module(t)
        finally:
            torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = before

    def _input(self, x: np.ndarray) -> Any:
        return self.torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)).to(self.dev)

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return self._run(self._input(x)).float().cpu().numpy()

    def time_once(self, x: np.ndarray) -> float:
        """Milliseconds of one forward: device time between CUDA events on CUDA, wall time on the CPU."""
        torch, t = self.torch, self._input(x)
        if self.dev.type != "cuda":
            t0 = time.perf_counter()
            self._run(t)
            return (time.perf_counter() - t0) * 1e3
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        self._run(t)
        end.record()
        end.synchronize()
        return float(start.elapsed_time(end))


def _precision_of(path: Path) -> str:
    """The precision an ONNX file's metadata declares (fp32 when it declares none or cannot be read)."""
    import onnx

    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception:  # noqa: BLE001 - an unreadable file is reported by the session that loads it next
        return "fp32"
    return {p.key: p.value for p in proto.metadata_props}.get("precision", "fp32")


def _installed(dist: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return None


def cuda_provider_problem() -> str | None:
    """Why ONNX Runtime cannot run on CUDA here, with the repair; None when it can."""
    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.get_available_providers():
        return None
    cpu, gpu = _installed("onnxruntime"), _installed("onnxruntime-gpu")
    if gpu and cpu:
        # Both wheels install into the same onnxruntime/ folder; uninstalling either deletes the shared files.
        return (f"onnxruntime {cpu} (CPU) and onnxruntime-gpu {gpu} are both installed and share one folder, and "
                f"the CPU wheel's files are the ones in place. Repair without uninstalling anything (an "
                f"uninstall deletes the shared files): pip install --force-reinstall --no-deps "
                f"onnxruntime-gpu=={gpu} (what `make install-gpu` does)")
    if gpu:
        return (f"onnxruntime-gpu {gpu} is installed but its CUDA provider is not available (CUDA or cuDNN libraries "
                f"missing or of another major version, or no GPU visible); see ONNX Runtime's CUDA requirements")
    return ("this ONNX Runtime is the CPU build (no CUDAExecutionProvider); on a CUDA machine run "
            "`make install-gpu` (the gpu extra: onnxruntime-gpu and TensorRT)")


def _gpu_name() -> str | None:
    import torch

    return torch.cuda.get_device_name() if torch.cuda.is_available() else None


def open_artifact(path: Path, runtime: str, threads: int | None = None, tf32: bool = False) -> Runtime:
    """Load an .onnx or .engine file in the named runtime, or explain why it cannot be."""
    path = Path(path)
    if not path.is_file():
        raise UserInputError(f"artifact {str(path)!r} does not exist")
    suffix = path.suffix.lower()
    if suffix not in (".onnx", ".engine", ".plan"):
        raise UserInputError(f"{path.name}: unknown artifact type {suffix!r}; expected .onnx (ONNX Runtime) or "
                             f".engine (TensorRT)")
    if suffix == ".onnx" and runtime == "tensorrt":
        raise UserInputError(f"{path.name} is ONNX; the tensorrt runtime runs .engine files (build one with "
                             f"`compress export RUN_DIR --format tensorrt`) - or choose onnxruntime-cpu/-cuda")
    if suffix != ".onnx" and runtime != "tensorrt":
        raise UserInputError(f"{path.name} is a TensorRT engine; it runs only in the tensorrt runtime")
    if runtime == "tensorrt":
        from export.tensorrt import TrtModel

        return TrtModel(path)
    if runtime == "torch-cuda":
        raise UserInputError(f"torch-cuda times a PyTorch model, not a file; run {path.name} on onnxruntime-cuda "
                             f"or onnxruntime-cpu")
    if runtime not in RUNTIMES:
        raise UserInputError(f"unknown runtime {runtime!r}; choose one of {', '.join(RUNTIMES)}")
    return OrtModel(path, threads, runtime.removeprefix("onnxruntime-"), tf32)


def latency_stats(samples_ms: list[float]) -> dict[str, float]:
    """Median, p10, p90 and mean of timed runs."""
    a = np.asarray(samples_ms)
    return {"median_ms": float(np.median(a)), "p10_ms": float(np.percentile(a, 10)),
            "p90_ms": float(np.percentile(a, 90)), "mean_ms": float(a.mean()), "runs": int(a.size)}


def _cpu_jiffies() -> tuple[float, float, float] | None:
    """(busy, steal, total) CPU seconds of the whole machine so far (psutil: Linux, macOS, Windows; steal only
    in Linux VMs); None where it cannot tell."""
    import psutil

    try:
        t = psutil.cpu_times()
    except (OSError, RuntimeError):
        return None
    parts = t._asdict()
    for counted_in_user in ("guest", "guest_nice"):  # Linux counts guest time in user and nice already
        parts.pop(counted_in_user, None)
    total = sum(parts.values())
    steal = parts.get("steal", 0.0)
    return total - parts.get("idle", 0.0) - parts.get("iowait", 0.0) - steal, steal, total


class MachineLoad:
    """What the rest of the machine did while this process timed models: how many cores other processes kept busy
    on average, and (in a VM) the share of CPU time the hypervisor gave to other guests (steal). A latency figure
    taken while others competed for the cores the timing threads use moves on the next run, and the speedup's
    spread cannot show it: it is measured within the run. Use as `with MachineLoad() as load: ...`."""

    def __enter__(self) -> MachineLoad:
        self._start = (_cpu_jiffies(), time.process_time(), time.perf_counter())
        self._end = self._start
        return self

    def __exit__(self, *exc: object) -> None:
        self._end = (_cpu_jiffies(), time.process_time(), time.perf_counter())

    def record(self) -> dict[str, float | None]:
        (j0, own0, t0), (j1, own1, t1) = self._start, self._end
        if j0 is None or j1 is None or j1[2] <= j0[2] or t1 <= t0:
            return {"other_cores": None, "steal_share": None, "cores": os.cpu_count()}
        others = max((j1[0] - j0[0]) - (own1 - own0), 0.0)
        return {"other_cores": round(others / (t1 - t0), 3), "steal_share": round((j1[1] - j0[1]) / (j1[2] - j0[2]), 4),
                "cores": os.cpu_count(), "seconds": round(t1 - t0, 2)}

    def warning(self, threads: int | None) -> str | None:
        return busy_warning(self.record(), threads)


def busy_warning(load: dict[str, Any] | None, threads: int | None) -> str | None:
    """A sentence for the log and the report when, by a MachineLoad record (summary.json `latency_ms.machine`),
    others competed for the cores `threads` timing threads need (more than a tenth of a core per thread beyond
    the cores left free, or 5% steal); else None."""
    if not load or load.get("other_cores") is None:
        return None
    cores = load.get("cores") or 1
    threads = threads or cores  # a GPU runtime: the CPU threads that feed it
    free = max(cores - threads, 0)
    busy = [f"other processes kept {load['other_cores']:.2f} of the {cores} cores busy"
            if load["other_cores"] > free + 0.1 * threads else "",
            f"the hypervisor gave {load['steal_share']:.0%} of the CPU time to other guests (steal)"
            if (load.get("steal_share") or 0) > 0.05 else ""]
    busy = [b for b in busy if b]
    if not busy:
        return None
    return (f"while timing with {threads} threads, {' and '.join(busy)}: the latency figures may move on the "
            f"next run by more than their spread; time on an idle machine for figures to gate on")


def default_threads() -> int:
    """Intra-op threads for timing on CPU: every core this process may run on (its affinity mask)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def cpu_name() -> str:
    """The CPU model, as /proc/cpuinfo names it (or the platform's processor string)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine()


def int8_saturation(flags: set[str] | None = None) -> str | None:
    """Why ONNX Runtime's INT8 kernels on this CPU may lose accuracy that the INT8 model itself does not, or None.
    An x86 CPU without VNNI (AVX512-VNNI, AVX-VNNI or AMX) multiplies 8-bit values with pairwise 16-bit sums that
    saturate: a QDQ model scored there can come out worse than the same file on a VNNI CPU or TensorRT (a layer
    kept in FP32 measured 4.2% logit error there for 0.4% in exact INT8 arithmetic). None off x86 or where the
    flags cannot be read. `flags`: the CPU's feature flags (read from /proc/cpuinfo when None)."""
    import platform

    if flags is None:
        if platform.machine().lower() not in ("x86_64", "amd64"):
            return None
        try:
            flags = set(next(line.split(":", 1)[1].split() for line in Path("/proc/cpuinfo").read_text()
                             .splitlines() if line.startswith("flags")))
        except (OSError, StopIteration):
            return None
    if {"avx512_vnni", "avx_vnni", "amx_int8"} & flags:
        return None
    return (f"this CPU ({cpu_name()}) has no VNNI instructions: ONNX Runtime's INT8 kernels here add up 8-bit "
            f"products in saturating 16-bit sums, so the INT8 accuracy measured on it can be lower than the same "
            f"model gives on a CPU with VNNI or on TensorRT; score the INT8 artifact where it deploys")
