"""The latency model of latency-targeted pruning: what removing a channel saves, measured on the runtime.

The model is exported and run under ONNX Runtime's profiler (the runtime `validate` uses, its threads, batch 1),
so every node is timed in context: fused, in the layout the runtime chose. Node times are mapped back to the
conv/linear layers they compute (through the exported graph: a fused Conv+Add+Relu belongs to its Conv), and a
group's removal is charged the share of its layers' time that its units are: a producer with `out` channels
loses 1/out of its time per removed channel, a consumer with `in` inputs 1/in. Nodes no layer owns (pooling,
layout reorders) are a fixed cost. The end-to-end latency is measured after every step, so the step sizes
are corrected by what the model mispredicted (`Drift`), and each layer's unit cost by what its own removals were
measured to save (`LayerFit`).

Measurements are cached on disk, keyed by runtime, device, threads and the exported graph (without its weights'
values), so a second run on the same machine measures nothing it measured before.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from export.onnx_names import node_owners
from stages._pruning import per_unit
from stages._structure import module_macs

# Interleaved timing of a model against the base, as (blocks, seconds per block and model). A pruning step's
# check is short (on the demo's 0.2 ms model 1 s, against 1.9 s for FIRM_TIMING and 5 s for validate's default):
# the loop only needs to know where a step landed to within the step's size, and its spread sets the smallest
# step the loop will take. FIRM_TIMING times a step that appears to reach the target, and layer_truncate's
# decisions.
STEP_TIMING = (4, 0.05)
FIRM_TIMING = (6, 0.1)


# Bumped whenever what a cache entry means changes: an entry of another version is never read.
CACHE_VERSION = 2
# A measurement taken while other processes held the timing cores is taken again this many times before it is
# given up as contended (then returned with its caveat, and never cached).
CONTENDED_RETRIES = 2


def cache_dir() -> Path:
    """Where measurements are kept between runs: $COMPRESS_CACHE_DIR/latency, else ~/.cache/idap-compress/latency."""
    from core.cache import cache_root

    return cache_root() / "latency"


def contention(load, threads: int) -> str | None:
    """Why a measurement taken under `load` (a MachineLoad) cannot be trusted, or None when the machine was quiet."""
    from export.runtime import busy_warning

    return busy_warning(load.record(), threads)


@dataclass
class Profile:
    """One model's latency on a runtime: end to end (median ms) and per conv/linear layer (ms)."""

    total_ms: float
    layers: dict[str, float]
    other_ms: float
    cached: bool = False
    contended: str | None = None  # why the timing behind it cannot be trusted (a busy machine), or None

    def record(self) -> dict[str, Any]:
        return {"total_ms": self.total_ms, "layers": self.layers, "other_ms": self.other_ms}

    def scaled(self, total_ms: float) -> Profile:
        """The same split of the time at another end-to-end latency."""
        k = total_ms / self.total_ms
        return Profile(total_ms, {n: v * k for n, v in self.layers.items()}, self.other_ms * k, self.cached,
                       self.contended)


def _owner_of_event(name: str, owners: dict[str, str]) -> str | None:
    """The layer a profiler event belongs to. ONNX Runtime names a fused or rewritten node after the node it
    started from plus a suffix: "/attn/qkv/MatMul/MatMulAddFusion", "/conv/Conv_nchwc", "/Reshape_1_new_reshape"."""
    base = name.removesuffix("_kernel_time").rstrip("/")
    while base:
        for key in (base, base.removesuffix("_nchwc"), base.rsplit("_", 1)[0]):
            if key in owners:
                return owners[key]
        if "/" not in base.strip("/"):
            return None
        base = base.rsplit("/", 1)[0]
    return None


def graph_digest(onnx_bytes: bytes) -> str:
    """What latency depends on: the graph, its attributes and every tensor's shape and type, not the weights'
    values (a model timed before recovery fine-tuning is the same model after it). sha256 of the model with
    every initializer's values dropped."""
    import onnx

    proto = onnx.load_from_string(onnx_bytes)
    for init in proto.graph.initializer:
        for f in ("raw_data", "float_data", "int32_data", "int64_data", "double_data", "uint64_data"):
            init.ClearField(f)
    return hashlib.sha256(proto.SerializeToString(deterministic=True)).hexdigest()


class LatencyMeter:
    """Times models the way `validate` will: exported to ONNX, on the runtime, threads and batch of the config."""

    def __init__(self, config, target=None, runs: int = 30, warmup: int = 5) -> None:
        from export.target import resolve

        self.config = config
        self.target = target or resolve(config)  # the device validate times on, `auto` resolved
        spec = config.model
        self.shape = (self.target.batch, spec.in_chans, *spec.input_size)
        self.runs, self.warmup = runs, warmup
        # CPU: the timing threads validate uses; a GPU runtime: ONNX Runtime's session threads feeding it
        self.threads = self.target.threads if self.target.timing == "onnxruntime-cpu" else (
            config.validate_.threads or 1)
        self.provider = self.target.timing_device  # cpu | cuda
        self.torch_timing = self.target.timing.startswith("torch-")
        self.device = self.target.hardware
        self._modules: dict[Path, nn.Module] = {}  # torch timing: the model each exported file came from
        self.seconds = 0.0
        self.hits = self.misses = 0
        self.confirmations = 0  # timings repeated at FIRM_TIMING because the short one appeared to reach a target
        self.contended = 0  # measurements that stayed contended after CONTENDED_RETRIES (used with a caveat)
        self.retaken = 0  # measurements taken again because the machine was busy
        self._base: tuple[Path, Any, str] | None = None  # (file, open session, digest) of the base model

    @property
    def runtime(self) -> str:
        return self.target.timing

    def _open(self, path: Path):
        """A runtime for an exported file: ONNX Runtime on the target's device, or (torch timing) the PyTorch
        model it was exported from, on the GPU."""
        from export.runtime import OrtModel, TorchModel

        if self.torch_timing:
            return TorchModel(self._modules[path], self.provider, self.target.tf32)
        return OrtModel(path, self.threads, self.provider, self.target.tf32)

    def _key(self, graph: str, what: str, against: str = "") -> Path:
        """Where a measurement of `graph` (a graph_digest, or a name for a fixed micro-benchmark) is cached."""
        h = hashlib.sha256(graph.encode())
        h.update(f"v{CACHE_VERSION}|{what}|{against}|{self.runtime}|{self.device}|{self.threads}|{self.shape}|"
                 f"{self.runs}".encode())
        return cache_dir() / f"{h.hexdigest()[:40]}.json"

    def _open_base(self, base: Path):
        """The base model's session, opened once per file and kept: every step is timed against it."""
        if self._base is None or self._base[0] != base:
            self._base = (base, self._open(base), graph_digest(base.read_bytes()))
        return self._base

    def export(self, model: nn.Module, path: Path) -> None:
        """Export as the run's artifact is exported (a dynamic batch axis when export.dynamic_batch is set: it
        changes the kernels ONNX Runtime picks), so that what is timed here is what `validate` times."""
        from export.torch2onnx import torch2onnx

        dynamic = self.config.export.dynamic_batch
        example = torch.zeros(2 if dynamic else self.shape[0], *self.shape[1:])
        torch2onnx(model, example, path, self.config.export, {})  # the model keeps its device and mode
        if self.torch_timing:
            self._modules = {p: m for p, m in self._modules.items() if p.exists() and p != path}
            self._modules[path] = copy.deepcopy(model)  # the caller goes on pruning its model in place

    def _cached(self, key: Path, compute, fresh: bool = False) -> dict[str, Any]:
        """A measurement from the cache, or taken now (`fresh`: always taken now). One taken while others held the
        timing cores is taken again (CONTENDED_RETRIES); if it never comes out clean it is returned with
        "contended" set and is not cached. Cached entries carry CACHE_VERSION and were all taken clean."""
        from export.runtime import MachineLoad

        if not fresh and key.is_file():
            try:
                entry = json.loads(key.read_text())
            except (OSError, ValueError):
                entry = None
            if isinstance(entry, dict) and entry.get("version") == CACHE_VERSION and entry.get("contended") is None \
                    and isinstance(entry.get("value"), dict):
                self.hits += 1
                return {**entry["value"], "contended": None}
        self.misses += 1
        for attempt in range(CONTENDED_RETRIES + 1):
            with MachineLoad() as load:
                value = compute()
            busy = contention(load, self.threads)
            if busy is None:
                break
            if attempt < CONTENDED_RETRIES:
                self.retaken += 1
        if busy is not None:
            self.contended += 1
            return {**value, "contended": busy}
        key.parent.mkdir(parents=True, exist_ok=True)
        tmp_key = key.with_name(f".{key.name}.{os.getpid()}.tmp")
        tmp_key.write_text(json.dumps({"version": CACHE_VERSION, "contended": None, "machine": load.record(),
                                       "value": value}))
        os.replace(tmp_key, key)
        return {**value, "contended": None}

    def measure(self, model: nn.Module, base: Path | None = None, timing: tuple[int, float] = FIRM_TIMING,
                confirm: Callable[[float, float], bool] | None = None, save_as: Path | None = None,
                fresh: bool = False) -> tuple[Profile, tuple[float, float, float]]:
        """The model's profile and, against the base model's ONNX file, its speedup (median, low, high across
        `timing`'s interleaved blocks); one export for both, each from the cache when measured here before. When
        `confirm` says yes to the speedup (median and low end), the same file is timed again at FIRM_TIMING and that
        figure returned.
        `save_as` keeps a copy of the exported file (the base model, timed against in later calls); `fresh` times it
        now even when the cache has it (a figure that must not stand on an earlier reading).
        The profile's `contended` says why its figures cannot be trusted when the machine stayed busy.
        With a base, the profile's end-to-end latency is the compressed model's median from the same interleaved
        timing (no second timing of the same model)."""
        t0 = time.perf_counter()
        try:
            with tempfile.TemporaryDirectory() as tmp:
                path = Path(tmp) / "m.onnx"
                self.export(model, path)
                data = path.read_bytes()
                if save_as is not None:
                    save_as.write_bytes(data)
                    if self.torch_timing:
                        self._modules[save_as] = self._modules[path]
                graph = graph_digest(data)  # once per export: parsing a large model's bytes is not free
                speed, total, busy = (1.0, 1.0, 1.0), None, None
                if base is not None:
                    got = self._timed(base, path, graph, timing, fresh)
                    if confirm is not None and timing != FIRM_TIMING and confirm(got["speedup"], got["speedup_low"]):
                        self.confirmations += 1
                        got = self._timed(base, path, graph, FIRM_TIMING, fresh)
                    speed = (got["speedup"], got["speedup_low"], got["speedup_high"])
                    total, busy = got["compressed_ms"], got["contended"]
                macs = module_macs(model, torch.zeros(1, *self.shape[1:], device=_device_of(model))) \
                    if self.provider == "cuda" or self.torch_timing else None
                prof = self._cached(self._key(graph, "profile"),
                                    lambda: self._profile(path, {n for n, _ in model.named_modules()},
                                                          total, macs).record())
                profile = Profile(prof["total_ms"], prof["layers"], prof["other_ms"],
                                  contended=busy or prof["contended"])
                if total is not None and profile.total_ms > 0 and abs(profile.total_ms - total) > 1e-12:
                    profile = profile.scaled(total)  # a profile cached by another timing: the split, at this total
                return profile, speed
        finally:
            self.seconds += time.perf_counter() - t0

    def _timed(self, base: Path, path: Path, graph: str, timing: tuple[int, float], fresh: bool = False,
               ) -> dict[str, Any]:
        blocks, block_seconds = timing
        return self._cached(self._key(graph, f"speedup|{blocks}|{block_seconds}", self._open_base(base)[2]),
                            lambda: self._speedup(base, path, blocks, block_seconds), fresh)

    def _speedup(self, base: Path, path: Path, blocks: int, block_seconds: float) -> dict[str, float]:
        from export.validation import latency, speedup

        models = {"base": self._open_base(base)[1], "compressed": self._open(path)}
        # the base's session is warm from earlier steps; a new session's first runs are slow (its memory arena and
        # thread pool are still being set up), which read as a step saving nothing: warm it as long as a block
        x = np.zeros(self.shape, np.float32)
        start = time.perf_counter()
        while time.perf_counter() - start < block_seconds:
            models["compressed"].time_once(x)
        lat = latency(models, self.shape, warmup=3, runs=2 * blocks, blocks=blocks, block_seconds=block_seconds)
        return {**speedup(lat), "compressed_ms": lat["compressed"]["median_ms"]}

    @staticmethod
    def _split_by_macs(total_ms: float, macs: dict[str, float], modules: set[str]) -> Profile:
        """Per-layer latency on a GPU: the measured total charged to the conv/linear layers by their share of the
        MACs. ONNX Runtime's profiler times kernel launches there, not kernels (asynchronous CUDA), so its node
        times cannot be used; the corrections (Drift, LayerFit) learn from the measured totals as on the CPU."""
        total_macs = macs.get("<total>") or sum(v for k, v in macs.items() if k in modules and k) or 0.0
        leaves = {k: v for k, v in macs.items() if k in modules and k and v > 0 and
                  not any(o != k and o.startswith(k + ".") and macs.get(o, 0) > 0 for o in macs)}
        if total_macs <= 0 or not leaves:
            return Profile(total_ms, {}, total_ms)
        layers = {k: total_ms * v / total_macs for k, v in leaves.items()}
        return Profile(total_ms, layers, max(total_ms - sum(layers.values()), 0.0))

    def _profile(self, path: Path, modules: set[str], total_ms: float | None = None,
                 macs: dict[str, float] | None = None) -> Profile:
        """Wall time from a plain session (median of the runs; `total_ms` when the caller timed it already); on the
        CPU the per-node split from a profiled session (each node's median over the same number of runs, the
        warm-up runs dropped), scaled to the wall time; on a GPU the split by MACs (`_split_by_macs`)."""
        import onnxruntime as ort

        x = np.random.default_rng(0).standard_normal(self.shape).astype(np.float32)
        if total_ms is None:
            plain = self._open(path)
            times = [plain.time_once(x) for _ in range(self.warmup + self.runs)][self.warmup:]
            total_ms = float(np.median(times))
            del plain
        if self.provider == "cuda" or self.torch_timing:
            return self._split_by_macs(total_ms, macs or {}, modules)
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.intra_op_num_threads = self.threads
        opts.enable_profiling = True
        opts.profile_file_prefix = str(path.parent / "profile")
        profiled = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        feed = {profiled.get_inputs()[0].name: x}
        for _ in range(self.warmup + self.runs):
            profiled.run(None, feed)
        events = json.loads(Path(profiled.end_profiling()).read_text())
        durations: dict[str, list[float]] = {}
        for e in events:
            if e.get("cat") == "Node" and e.get("name", "").endswith("_kernel_time"):
                durations.setdefault(e["name"], []).append(e["dur"] / 1e3)
        owners = node_owners(path, modules)
        per_layer: dict[str, float] = {}
        other = 0.0
        for name, ds in durations.items():
            ms = float(np.median(ds[-self.runs:]))
            module = _owner_of_event(name, owners)
            if module is None:
                other += ms
            else:
                per_layer[module] = per_layer.get(module, 0.0) + ms
        # node times add up to less than the wall time (dispatch, copies): scaled to the measured median
        profiled_sum = sum(per_layer.values()) + other
        scale = total_ms / profiled_sum if profiled_sum > 0 else 1.0
        return Profile(total_ms, {k: v * scale for k, v in per_layer.items()}, other * scale)


def _device_of(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


@dataclass
class Drift:
    """Measured / predicted savings so far: the correction applied to the next step's budget. The ratio starts
    from one pseudo-step at 1 (the latency model taken at its word), so that one step's reading cannot swing the
    next budget tenfold: a first step that saves nothing (its widths fell off the runtime's preferred multiple,
    measured on the demo) would otherwise make the second step ten times too large, and be undone."""

    history: list[dict[str, float]] = field(default_factory=list)

    @property
    def factor(self) -> float:
        """The measured savings, signed and summed, over their predictions. Each kept timed step's saving is
        measured from the last kept timed reading, so their sum is the base's latency minus the last reading: one
        reading's noise, however many steps. Summed after clipping each step's saving at zero (as it was),
        alternating noise counted every fast reading's gain and none of the slow one's loss: on the
        short-recovery demo (readings 4.34x, 2.87x, 3.69x, 2.91x, 4.33x in successive steps) that read twice the
        savings the steps made, halved every budget, and the loop ran out of its 20 steps at 5.5x for 13.6x.
        An attempt undone and retaken counts too: what it saved was measured, and on full-size models it is the
        latency model's real misprediction (left out, ConvNeXt-Small's 2x run overshot four times and stopped
        at 2.79x in the loop)."""
        rows = [h for h in self.history if h["predicted_ms"] > 0]
        if not rows:
            return 1.0
        predicted = sum(h["predicted_ms"] for h in rows)
        prior = predicted / len(rows)
        measured = max(sum(h["measured_raw_ms"] for h in rows), 0.0)
        return float(min(max((measured + prior) / (predicted + prior), 0.1), 10.0))

    def add(self, predicted: float, measured: float, step: int) -> None:
        """A step's predicted and measured saving. Removing units does not make a model slower by more than timing
        noise, so a model read slower than the base counts as having saved nothing (`factor`): on a
        sub-millisecond model a first step read as 0.91x once drove the factor to its floor of 0.1, a tenfold next
        budget. `measured_ms` is the step's own saving clipped at zero, for the record."""
        saved = max(measured, 0.0)
        self.history.append({"step": step, "predicted_ms": predicted, "measured_ms": saved, "measured_raw_ms": measured,
                             "error": (saved - predicted) / predicted if predicted else 0.0})


def unit_costs(profile: Profile, members: dict[str, tuple[int, int]], scale: dict[str, float] | None = None,
               ) -> float:
    """Milliseconds one unit of a group saves: in each member layer its share of the layer's time (`per_unit`),
    corrected by what that layer's removals were measured to save so far (`scale`, from LayerFit; 1 when not
    given)."""
    return sum(ms * (scale or {}).get(layer, 1.0) for layer, ms in per_unit(profile.layers, members).items())


# LayerFit's prior: a layer not yet measured counts as if a saving of this share of its time had been predicted
# and measured at the ratio of all layers measured so far
FIT_PRIOR = 0.1


@dataclass
class LayerFit:
    """What removing units actually saves in each layer, per millisecond the latency model predicted for it.

    The model charges a unit its share of the layer's time (time proportional to width on both sides). Kernels
    have a fixed part, and a layer that loses inputs and outputs in the same step saves (1-a)(1-b), not a+b: on
    ResNet-50 at 224 the layers' time shrank 1.3x less than their MACs (median), and the whole step saved 0.65 of
    the prediction. A single correction of the step's budget (Drift) fixes how much is cut, not where: the
    knapsack kept cutting the layers whose time shrinks least, and spent MACs for little time. After every step
    each pruned layer's measured saving (its time in the profiles before and after) is set against its
    prediction; the ratio, shrunk towards all layers' ratio for layers measured little or not at all, corrects
    its units' cost in the next step."""

    predicted: dict[str, float] = field(default_factory=dict)
    measured: dict[str, float] = field(default_factory=dict)

    def add(self, before: Profile, after: Profile, predicted: dict[str, float]) -> None:
        for layer, ms in predicted.items():
            if ms > 0 and layer in before.layers:
                self.predicted[layer] = self.predicted.get(layer, 0.0) + ms
                self.measured[layer] = self.measured.get(layer, 0.0) + before.layers[layer] - after.layers.get(layer,
                                                                                                            0.0)

    def overall(self) -> float:
        predicted = sum(self.predicted.values())
        return min(max(sum(self.measured.values()) / predicted, 0.1), 2.0) if predicted > 0 else 1.0

    def factors(self, profile: Profile) -> dict[str, float]:
        g = self.overall()
        out = {}
        for layer, ms in profile.layers.items():
            prior = FIT_PRIOR * ms
            if prior + self.predicted.get(layer, 0.0) > 0:
                ratio = (self.measured.get(layer, 0.0) + prior * g) / (self.predicted.get(layer, 0.0) + prior)
                out[layer] = min(max(ratio, 0.1), 2.0)
        return out


def best_alignment(meter: LatencyMeter, size: int = 28) -> int:
    """The channel multiple the runtime rewards, measured: a 3x3 conv stack is timed at widths 96..128 in steps
    of 4; an alignment is rewarded when widths off its multiples run slower than the next multiple up (more
    channels, yet faster). The largest rewarded of 32, 16, 8 is taken (8 when none is). Cached per runtime."""
    from export.runtime import OrtModel, TorchModel
    from export.torch2onnx import torch2onnx

    widths = list(range(96, 129, 4))

    def measure() -> dict[str, float]:
        out = {}
        with tempfile.TemporaryDirectory() as tmp:
            for w in widths:
                net = nn.Sequential(nn.Conv2d(w, w, 3, padding=1), nn.ReLU(), nn.Conv2d(w, w, 3, padding=1)).eval()
                path = Path(tmp) / f"c{w}.onnx"
                cfg = meter.config.export.model_copy(update={"dynamic_batch": False})
                torch2onnx(net, torch.zeros(1, w, size, size), path, cfg, {})
                rt = TorchModel(net, meter.provider, meter.target.tf32) if meter.torch_timing else \
                    OrtModel(path, meter.threads, meter.provider, meter.target.tf32)
                x = np.zeros((1, w, size, size), np.float32)
                for _ in range(5):
                    rt.time_once(x)
                out[str(w)] = float(np.median([rt.time_once(x) for _ in range(40)]))
        return out

    t0 = time.perf_counter()
    times = meter._cached(meter._key("alignment", "alignment"), measure)
    meter.seconds += time.perf_counter() - t0
    for a in (32, 16, 8):
        ratios = [times[str(w)] / times[str(-(-w // a) * a)] for w in widths if w % a and -(-w // a) * a <= 128]
        if ratios and float(np.median(ratios)) > 1.03:
            return a
    return 8
