"""ONNX Runtime (CPU) session: batched scoring and batch-1 latency with warm-up, median and p90."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np


class OrtModel:
    """An ONNX model loaded in ONNX Runtime on the CPU execution provider."""

    backend = "onnxruntime-cpu"

    def __init__(self, path: Path, threads: int | None = None) -> None:
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if threads:
            opts.intra_op_num_threads = threads
        self.session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        self.input_name = self.session.get_inputs()[0].name

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return self.session.run(None, {self.input_name: np.ascontiguousarray(x, dtype=np.float32)})[0]

    def time_once(self, x: np.ndarray) -> float:
        """Wall time of one inference in milliseconds."""
        feed = {self.input_name: np.ascontiguousarray(x, dtype=np.float32)}
        t0 = time.perf_counter()
        self.session.run(None, feed)
        return (time.perf_counter() - t0) * 1e3


def latency_stats(samples_ms: list[float]) -> dict[str, float]:
    """Median, p90 and mean of timed runs."""
    a = np.asarray(samples_ms)
    return {"median_ms": float(np.median(a)), "p90_ms": float(np.percentile(a, 90)), "mean_ms": float(a.mean()),
            "runs": int(a.size)}
