"""The full stage list on torchvision ResNet-50 (random weights, synthetic data, small input)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch

from tests.conftest import resnet50_config, run_cli, write_config


def test_resnet50_full_pipeline_exports_valid_onnx(tmp_path: Path):
    cfg = resnet50_config(finetune={"max_epochs": 1, "lr": 0.001})
    run = tmp_path / "run"
    done = run_cli("pipeline", str(write_config(tmp_path / "r50.yaml", cfg)), "--run-dir", str(run))
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["model"] == "torchvision:resnet50"
    assert summary["delta_pct"]["gflops"] <= -30
    assert summary["parity"]["max_abs_diff"] <= 1e-3
    assert summary["removed_blocks"], "ResNet-50 has shape-preserving bottlenecks to remove"
    proto = onnx.load(run / "model.onnx")
    onnx.checker.check_model(proto, full_check=True)
    meta = {p.key: p.value for p in proto.metadata_props}
    assert meta["model"] == "torchvision:resnet50" and meta["input_size"] == "3x64x64"
    sess = ort.InferenceSession(str(run / "model.onnx"), providers=["CPUExecutionProvider"])
    out = sess.run(None, {"input": np.zeros((3, 3, 64, 64), np.float32)})[0]
    assert out.shape == (3, 10)
    # every conv width the pruning touched stays a multiple of round_to (8)
    structure = torch.load(run / "03_filter_prune" / "checkpoint.pt", weights_only=True)["structure"]
    widths = [a["out_channels"] for a in structure["attrs"].values() if "out_channels" in a]
    assert widths and all(w % 8 == 0 for w in widths)
