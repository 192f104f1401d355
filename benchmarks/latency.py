"""Latency efficiency: measured ONNX Runtime CPU batch-1 FP32 speedup divided by the MACs ratio.

For the demo model (timm ResNet-18, 1x32x32) and torchvision ResNet-50 (3x224x224), random weights (latency
does not depend on them), -70% MACs by four routes: widths rounded to multiples of 8 or not (round_to 8 vs 1),
each with and without truncation (the two residual blocks with the lowest divergence on random inputs replaced
by the identity first, the rest of the cut by width). Base and the four compressed models are timed in one
interleaved loop, so machine noise hits all alike. Efficiency 1.0 means latency fell exactly as MACs did.
"""

from __future__ import annotations

import statistics
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from core.config import ModelConfig
from core.models import build_model, clone, count_macs
from export.config import ExportConfig
from export.runtime import OrtModel
from export.torch2onnx import torch2onnx
from export.validation import latency

MODELS = {
    "demo (timm resnet18, 1x32x32)": ModelConfig(source="timm", name="resnet18", num_classes=10, in_chans=1,
                                                 input_size=(32, 32)),
    "torchvision resnet50, 3x224x224": ModelConfig(source="torchvision", name="resnet50", num_classes=1000,
                                                    in_chans=3, input_size=(224, 224)),
}
ROUTES = [("rounded (8)", 8, False), ("unrounded (1)", 1, False), ("rounded + truncation", 8, True),
          ("unrounded + truncation", 1, True)]


def _truncate(model, spec: ModelConfig, n: int) -> list[str]:
    """Replace the n lowest-divergence residual blocks (random calibration inputs) by the identity."""
    from stages._blocks import find_candidates, measure_blocks, replace_with_identity

    rows, unit_div = measure_blocks(model)
    handles = [h for c in (rows, unit_div) for h in c.attach(model)]
    model.eval()
    with torch.no_grad():
        for _ in range(2):
            model(torch.randn(8, spec.in_chans, *spec.input_size))
            rows.batches += 1
            unit_div.batches += 1
    for h in handles:
        h.remove()
    for c in (rows, unit_div):
        if hasattr(c, "finish"):
            c.finish(model)
    blocks, _ = find_candidates(model, rows.result(), unit_div.result(), 0.005)
    chosen = sorted(blocks, key=lambda b: (b.divergence, b.name))[:n]
    for b in chosen:
        replace_with_identity(model, b.modules)
    return [b.name for b in chosen]


def _prune_to(model, spec: ModelConfig, reduction: float, round_to: int, g0: float) -> None:
    """L2 group magnitude through the pipeline's Pruner (aligned global plan), steps capped to land on the target."""
    from types import SimpleNamespace

    from pipeline.config import Config
    from stages._criteria import CRITERIA
    from stages._goals import Plan, capped_fraction
    from stages._pruner import Pruner

    cfg = Config.model_validate({"name": "latency", "model": spec.model_dump(mode="json"),
                                 "filter_prune": {"criterion": "l2", "round_to": round_to}})
    pruner = Pruner(CRITERIA.get("l2")(), SimpleNamespace(config=cfg, device=torch.device("cpu")))
    target = g0 * (1 - reduction)
    gflops = count_macs(model, spec)[0]
    for _ in range(12):
        if gflops <= target * 1.01:
            break
        if pruner.apply(model, Plan(0, share=capped_fraction(0.3, gflops, target))).units == 0:
            break
        gflops = count_macs(model, spec)[0]


def run(quick: bool) -> dict[str, Any]:
    torch.manual_seed(0)
    runs, warmup = (40, 5) if quick else (100, 10)
    out: dict[str, Any] = {"reduction": 0.7, "runs": runs, "warmup": warmup, "models": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for label, spec in MODELS.items():
            base = build_model(spec, with_weights=False).eval()
            g0, p0 = count_macs(base, spec)
            variants, info = {"base": base}, {"base": {"gflops": g0, "params_m": p0, "removed": []}}
            for name, round_to, trunc in ROUTES:
                m = clone(base)
                removed = _truncate(m, spec, 2) if trunc else []
                _prune_to(m, spec, 0.7, round_to, g0)
                g, p = count_macs(m, spec)
                variants[name], info[name] = m.eval(), {"gflops": g, "params_m": p, "removed": removed}
            sessions = {}
            for name, m in variants.items():
                path = Path(tmp) / f"{abs(hash((label, name)))}.onnx"
                torch2onnx(m, torch.zeros(1, spec.in_chans, *spec.input_size), path,
                           ExportConfig(dynamic_batch=False), {})
                sessions[name] = OrtModel(path, threads=torch.get_num_threads())
                x = np.random.default_rng(0).standard_normal((2, spec.in_chans, *spec.input_size)).astype(np.float32)
                with torch.no_grad():
                    ref = m(torch.from_numpy(x[:1])).numpy()
                assert np.abs(sessions[name](x[:1]) - ref).max() < 1e-3
            lat = latency(sessions, (1, spec.in_chans, *spec.input_size), warmup, runs)
            rows = {}
            for name, _, _ in [("base", 0, False), *ROUTES]:
                speedup = lat["base"]["median_ms"] / lat[name]["median_ms"]
                ratio = g0 / info[name]["gflops"]
                rows[name] = {**info[name], "median_ms": lat[name]["median_ms"], "p90_ms": lat[name]["p90_ms"],
                              "speedup": speedup, "macs_ratio": ratio, "efficiency": speedup / ratio}
            out["models"][label] = rows
            print(f"latency {label}: " + ", ".join(f"{k} {v['median_ms']:.3f}ms eff {v['efficiency']:.2f}"
                                                   for k, v in rows.items()), flush=True)
    return out


def markdown(res: dict[str, Any]) -> str:
    lines = ["## Latency efficiency", "", (__doc__ or "").split("\n\n", 1)[1].strip(), "",
             f"{res['runs']} timed runs per model after {res['warmup']} warm-up runs, ONNX Runtime CPU execution "
             f"provider, batch 1, FP32, {torch.get_num_threads()} threads.", ""]
    for label, rows in res["models"].items():
        lines += [f"### {label}", "",
                  "| model | GMACs | params (M) | removed blocks | median ms | p90 ms | speedup | MACs ratio | "
                  "efficiency |", "|---|---|---|---|---|---|---|---|---|"]
        for name, r in rows.items():
            lines.append(f"| {name} | {r['gflops']:.4f} | {r['params_m']:.2f} | {', '.join(r['removed']) or '-'} | "
                         f"{r['median_ms']:.3f} | {r['p90_ms']:.3f} | {r['speedup']:.2f}x | {r['macs_ratio']:.2f}x | "
                         f"{r['efficiency']:.2f} |")
        lines.append("")
    effs = {name: statistics.mean(rows[name]["efficiency"] for rows in res["models"].values())
            for name, _, _ in ROUTES}
    lines += ["Mean efficiency over the two models: " + ", ".join(f"{k} {v:.2f}" for k, v in effs.items()) + ".", ""]
    return "\n".join(lines) + "\n"
