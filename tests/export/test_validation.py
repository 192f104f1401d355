"""Gates, runtime selection and the errors of runtimes this machine may not have (no GPU needed)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from core.errors import UserInputError
from export import tensorrt
from export.config import ExportConfig, GatesConfig
from export.runtime import OrtModel, open_artifact
from export.torch2onnx import torch2onnx
from export.validation import accuracy, check_gates, latency


def summary(top1_base=90.0, top1=89.0, speedup=2.0, latency_ms=1.0, parity=1e-6, precision="fp32"):
    return {"base": {"top1": top1_base}, "compressed": {"top1": top1},
            "latency_ms": {"backend": "onnxruntime-cpu", "batch": 1, "precision": precision,
                           "compressed": latency_ms, "speedup": speedup},
            "parity": {"max_abs_diff": parity}}


GATES = {  # gate: (value that passes, value that fails) against summary()
    "max_top1_drop": (1.5, 0.5),
    "min_speedup": (1.5, 2.5),
    "max_latency_ms": (2.0, 0.5),
    "max_parity_error": (1e-5, 1e-7),
}


@pytest.mark.parametrize("gate", list(GATES))
def test_each_gate_passes_and_fails(gate: str):
    ok, bad = GATES[gate]
    assert check_gates(summary(), GatesConfig(**{gate: ok})) == ([], [])
    fails, _ = check_gates(summary(), GatesConfig(**{gate: bad}))
    assert len(fails) == 1 and gate in fails[0], fails


def test_all_gates_fail_together_and_are_each_spelled_out():
    fails, _ = check_gates(summary(), GatesConfig(**{g: v[1] for g, v in GATES.items()}))
    assert len(fails) == 4
    assert "top-1 dropped 1.00 points (base 90.00 -> 89.00) > max_top1_drop 0.5" in fails


def test_fp16_artifacts_use_their_own_parity_limit():
    s = summary(parity=1e-2, precision="fp16")
    s["parity"]["max_rel_diff"] = 1e-2
    assert check_gates(s, GatesConfig(max_parity_error=1e-4, max_parity_error_fp16=5e-2)) == ([], [])
    fails, _ = check_gates(s, GatesConfig(max_parity_error_fp16=1e-3))
    assert "max_parity_error_fp16" in fails[0]


def test_gates_without_their_figure_are_reported_unchecked_not_passed():
    s = {**summary(), "base": None, "parity": None}
    s["latency_ms"]["speedup"] = None
    fails, unchecked = check_gates(s, GatesConfig(max_top1_drop=1.0, min_speedup=1.0, max_parity_error=1e-4))
    assert fails == [] and len(unchecked) == 3


@pytest.fixture(scope="module")
def onnx_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("rt") / "m.onnx"
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.Flatten(), torch.nn.LazyLinear(3))
    model(torch.zeros(1, 1, 8, 8))
    torch2onnx(model, torch.zeros(2, 1, 8, 8), path, ExportConfig(), {"role": "test"})
    return path


def test_onnxruntime_cpu_scores_and_times(onnx_file: Path):
    rt = open_artifact(onnx_file, "onnxruntime-cpu", threads=1)
    assert isinstance(rt, OrtModel) and rt.backend == "onnxruntime-cpu" and rt.input_shape == (1, 8, 8)
    x = torch.randn(10, 1, 8, 8)
    y = torch.from_numpy(rt(x.numpy()).argmax(1))
    acc = accuracy(rt, [(x[:6], y[:6]), (x[6:], (y[6:] + 1) % 3)])
    assert acc["top1"] == pytest.approx(60.0) and acc["samples"] == 10
    lat = latency({"a": rt}, (1, 1, 8, 8), warmup=1, runs=5)["a"]
    assert lat["runs"] == 5 and 0 < lat["median_ms"] <= lat["p90_ms"]


def test_a_session_whose_threads_park_after_each_run_gives_the_same_outputs(onnx_file: Path):
    """The benchmarks time several sessions in turn with parked intra-op threads; the session says so in its
    options and computes what a default one does."""
    spinning, parked = OrtModel(onnx_file, threads=2), OrtModel(onnx_file, threads=2, spinning=False)
    options = parked.session.get_session_options()
    assert options.get_session_config_entry("session.intra_op.allow_spinning") == "0"
    x = torch.randn(2, 1, 8, 8).numpy()
    assert (parked(x) == spinning(x)).all()


@pytest.mark.parametrize("runtime, suffix, expected", [
    ("tensorrt", ".onnx", "runs .engine files"),
    ("onnxruntime-cpu", ".engine", "runs only in the tensorrt runtime"),
    ("onnxruntime-cpu", ".pt", "unknown artifact type"),
])
def test_artifact_and_runtime_mismatch_is_a_clear_error(onnx_file: Path, tmp_path: Path, runtime, suffix, expected):
    path = tmp_path / f"m{suffix}"
    path.write_bytes(onnx_file.read_bytes())
    with pytest.raises(UserInputError, match=expected):
        open_artifact(path, runtime)
    with pytest.raises(UserInputError, match="does not exist"):
        open_artifact(tmp_path / "missing.onnx", "onnxruntime-cpu")


def test_missing_cuda_provider_names_the_gpu_extra(onnx_file: Path):
    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this machine has the CUDA provider")
    with pytest.raises(UserInputError, match=r"gpu extra.*onnxruntime-gpu"):
        open_artifact(onnx_file, "onnxruntime-cuda")


def test_missing_tensorrt_names_the_gpu_extra():
    if tensorrt.unavailable_reason() is None:
        pytest.skip("TensorRT and a GPU are available here")
    with pytest.raises(UserInputError, match=r"pip install 'idap-compress\[gpu\]'"):
        tensorrt.require()


class _Clock:
    """A runtime whose timings are scripted: `fast` ms, except `slow_blocks` calls slowed by `factor`."""

    backend, precision, threads, device = "fake", "fp32", 1, "test"

    def __init__(self, ms: float) -> None:
        self.ms, self.calls, self.factor = ms, 0, 1.0

    def time_once(self, x) -> float:
        self.calls += 1
        return self.ms * self.factor


def test_latency_runs_in_interleaved_blocks_and_reports_the_speedup_spread():
    from export.validation import latency_record, speedup

    base, comp = _Clock(4.0), _Clock(2.0)
    lat = latency({"base": base, "compressed": comp}, (1, 1, 8, 8), warmup=2, runs=20, blocks=4)
    # warm-up, then per block one untimed wake-up run and its share of the timed runs
    assert base.calls == comp.calls == 2 + 4 * (1 + 5)
    assert lat["base"]["runs"] == 20 and len(lat["base"]["block_medians"]) == 4
    sp = speedup(lat)
    assert sp["speedup"] == pytest.approx(2.0) and sp["speedup_low"] == pytest.approx(2.0) and sp["blocks"] == 4
    rec = latency_record(lat, comp, 1, 2)
    assert rec["base_p10"] == 4.0 and rec["compressed_p90"] == 2.0 and rec["threads"] == 1
    assert rec["runs"] == {"base": 20, "compressed": 20}


def test_speedup_gate_holds_only_if_the_low_end_of_the_spread_clears_it():
    s = summary(speedup=2.0)
    s["latency_ms"]["speedup_low"] = 1.4
    fails, _ = check_gates(s, GatesConfig(min_speedup=1.5))
    assert len(fails) == 1 and "low end of its spread 1.40x" in fails[0]
    assert check_gates(s, GatesConfig(min_speedup=1.3)) == ([], [])


def test_min_flops_reduction_gate():
    s = {**summary(), "delta_pct": {"gflops": -42.0}}
    fails, _ = check_gates(s, GatesConfig(min_flops_reduction=0.7))
    assert len(fails) == 1 and "42.0% < min_flops_reduction 70.0%" in fails[0]
    assert check_gates(s, GatesConfig(min_flops_reduction=0.4)) == ([], [])


@pytest.mark.skipif(not Path("/proc/stat").is_file(), reason="reads Linux's /proc/stat")
def test_machine_load_counts_other_processes_not_our_own_work():
    """A latency figure taken while another process keeps a core busy is flagged; our own timing work is not."""
    import subprocess
    import sys
    import time

    from export.runtime import MachineLoad

    with MachineLoad() as own:
        t = time.perf_counter()
        while time.perf_counter() - t < 1.0:
            pass
    burner = subprocess.Popen([sys.executable, "-c", "import time\nt = time.time()\nwhile time.time() - t < 2.5: pass"])
    try:
        time.sleep(0.5)
        with MachineLoad() as busy:
            time.sleep(1.0)
    finally:
        burner.wait()
    assert own.record()["other_cores"] < 0.5, own.record()
    assert busy.record()["other_cores"] > 0.7, busy.record()
    threads = os.cpu_count() or 1  # timing on every core: any other busy core competes with it
    assert busy.warning(threads) and "other processes kept" in busy.warning(threads)
    assert own.warning(threads) is None or "steal" in own.warning(threads)


def test_busy_warning_counts_only_the_cores_the_timing_threads_need():
    """One busy core beside 2 timing threads on 4 cores leaves them room; on 2 cores it competes; steal over 5%
    is flagged whatever the cores; a record without figures (off Linux) warns of nothing."""
    from export.runtime import busy_warning

    one_busy = {"other_cores": 1.0, "steal_share": 0.0, "cores": 4}
    assert busy_warning(one_busy, 2) is None
    assert "1.00 of the 2 cores" in busy_warning({**one_busy, "cores": 2}, 2)
    assert "steal" in busy_warning({"other_cores": 0.0, "steal_share": 0.2, "cores": 4}, 2)
    assert busy_warning({"other_cores": None, "steal_share": None, "cores": 2}, 2) is None
    assert busy_warning(None, 2) is None


@pytest.mark.parametrize("gate", ["min_speedup", "max_latency_ms"])
def test_a_latency_gate_never_passes_on_a_contended_figure(gate: str):
    s = summary()
    s["latency_ms"]["contended"] = "other processes kept 1.90 of the 2 cores busy"
    ok, _ = GATES[gate]
    fails, _ = check_gates(s, GatesConfig(**{gate: ok}, max_parity_error=1e-5))
    assert len(fails) == 1 and gate in fails[0] and "busy machine" in fails[0], fails
    assert check_gates(s, GatesConfig(max_top1_drop=1.5)) == ([], []), "other gates stand"


@pytest.mark.parametrize("gate, bad", [("min_flops_reduction", 0.7), ("max_parity_error", 1e-7),
                                       ("max_top1_drop", 0.5)])
def test_a_busy_machine_takes_only_the_latency_gates_away(gate: str, bad: float):
    """A contended timing once returned before the gates that read no timing: a MACs reduction of 29% passed
    min_flops_reduction 0.7 (exit 0) whenever the machine was busy. Every gate that reads no timing fails on a
    contended run as on a quiet one, beside the latency gate's own failure."""
    s = summary() | {"delta_pct": {"gflops": -28.7}}
    s["latency_ms"]["contended"] = "other processes kept 0.82 of the 2 cores busy"
    quiet = check_gates(summary() | {"delta_pct": {"gflops": -28.7}}, GatesConfig(**{gate: bad}))[0]
    fails, _ = check_gates(s, GatesConfig(**{gate: bad}, min_speedup=1.5))
    assert len(quiet) == 1 and quiet[0] in fails and len(fails) == 2, fails
    assert any("busy machine" in f for f in fails)


def test_a_contended_timing_is_retaken_and_keeps_its_caveat(monkeypatch):
    import export.runtime as R
    from export.validation import CONTENDED_RETRIES, clean_latency, latency_record

    class Fake:
        backend, precision, threads, device = "onnxruntime-cpu", "fp32", 2, "cpu"

        def time_once(self, x):
            return 1.0

    busy = iter(["others kept 1.9 cores busy"] * CONTENDED_RETRIES + [None])
    monkeypatch.setattr(R, "busy_warning", lambda load, threads: next(busy))
    warned = []
    lat, load = clean_latency({"base": Fake(), "compressed": Fake()}, (1, 1, 4, 4), 1, 4, 2, blocks=2,
                              warn=warned.append)
    assert load["contended"] is None and load["attempts"] == CONTENDED_RETRIES + 1 and len(warned) == 2
    monkeypatch.setattr(R, "busy_warning", lambda load, threads: "others kept 1.9 cores busy")
    lat, load = clean_latency({"base": Fake(), "compressed": Fake()}, (1, 1, 4, 4), 1, 4, 2, blocks=2)
    assert load["contended"] == "others kept 1.9 cores busy"
    rec = latency_record(lat, Fake(), 1, 1, load)
    assert rec["contended"] == load["contended"] and "contended" not in rec["machine"]
