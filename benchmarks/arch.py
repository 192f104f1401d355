"""Architecture coverage: the published ten pruned at full resolution to -65% MACs, timed on ONNX Runtime.

Random weights (no model hub here) and random calibration images: this measures what the structure allows
(widths, heads, coupled groups) and what the runtime makes of it, not accuracy. Each model is pruned by the
pipeline's own Pruner with the default criterion and global ranking, widths in multiples of 8 and attention
heads whole, then exported and timed base vs compressed, interleaved, batch 1, FP32, on the CPU provider.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, TensorDataset

# The published table's ten, from timm where timm has them (torchvision for ShuffleNetV2 and for Inception-v3,
# whose torchvision build trains with its auxiliary classifier). Input sizes come from each model's default config.
ARCHITECTURES: dict[str, tuple[str, str]] = {
    "ResNet-50": ("timm", "resnet50"),
    "EfficientNet-B4": ("timm", "efficientnet_b4"),
    "ViT-B/16": ("timm", "vit_base_patch16_224"),
    "MobileNetV3-Large": ("timm", "mobilenetv3_large_100"),
    "DenseNet-121": ("timm", "densenet121"),
    "ConvNeXt-Small": ("timm", "convnext_small"),
    "VGG19-BN": ("timm", "vgg19_bn"),
    "ShuffleNetV2 x2.0": ("torchvision", "shufflenet_v2_x2_0"),
    "Inception-v3": ("torchvision", "inception_v3"),
    "EfficientNetV2-S": ("timm", "tf_efficientnetv2_s"),
}
TARGET = 0.65  # the published table's MACs reduction


def _context(cfg, images: int, batch: int, seed: int) -> SimpleNamespace:
    g = torch.Generator().manual_seed(seed)
    spec = cfg.model
    data = TensorDataset(torch.randn(images, spec.in_chans, *spec.input_size, generator=g),
                         torch.randint(0, spec.num_classes, (images,), generator=g))
    return SimpleNamespace(config=cfg, device=torch.device("cpu"),
                           loader=lambda split, **k: DataLoader(data, batch_size=batch),
                           track=lambda items, description, total=None: items)


def prune_to_target(cfg, target: float, images: int = 8, batch: int = 4, max_steps: int = 16) -> dict[str, Any]:
    """Build cfg.model with random weights and prune it with the Pruner until MACs fall by `target`."""
    from core.models import build_model, clone, count_macs
    from stages._attention import count_heads
    from stages._criteria import CRITERIA
    from stages._goals import Plan, capped_fraction
    from stages._pruner import Pruner

    torch.manual_seed(0)
    spec = cfg.model
    model = build_model(spec, with_weights=False).eval()
    base = clone(model)
    heads0 = count_heads(model)
    g0, p0 = count_macs(model, spec)
    pruner = Pruner(CRITERIA.get(cfg.filter_prune.criterion)(), _context(cfg, images, batch, 0))
    gflops, steps, t0 = g0, 0, time.perf_counter()
    goal = g0 * (1 - target)
    while gflops > goal * 1.01 and steps < max_steps:
        if pruner.apply(model.eval(), Plan(steps, share=capped_fraction(0.25, gflops, goal))).units == 0:
            break
        steps += 1
        gflops = count_macs(model, spec)[0]
    g1, p1 = count_macs(model, spec)
    heads1 = count_heads(model)
    return {"base": base, "model": model.eval(), "gflops": [g0, g1], "params_m": [p0, p1], "steps": steps,
            "held": pruner.held_records(model),
            "heads": [heads0, heads1], "prune_seconds": time.perf_counter() - t0}


def _measure(label: str, source: str, name: str, warmup: int, runs: int, workdir: Path) -> dict[str, Any]:
    from export.config import ExportConfig
    from export.runtime import OrtModel
    from export.torch2onnx import torch2onnx
    from export.validation import latency
    from pipeline.config import Config

    cfg = Config.model_validate({"name": "arch", "model": {"source": source, "name": name, "num_classes": 1000}})
    spec = cfg.model
    res = prune_to_target(cfg, TARGET)
    shape = (1, spec.in_chans, *spec.input_size)
    x = np.random.default_rng(1).standard_normal((2, *shape[1:])).astype(np.float32)
    sessions, parity = {}, {}
    for key in ("base", "model"):
        path = workdir / f"{name}-{key}.onnx"
        torch2onnx(res[key], torch.zeros(shape), path, ExportConfig(), {})
        sessions[key] = OrtModel(path)
        with torch.no_grad():
            ref = res[key](torch.from_numpy(x)).numpy()
        parity[key] = float(np.abs(sessions[key](x) - ref).max() / max(np.abs(ref).max(), 1e-12))
    lat = latency(sessions, shape, warmup, runs)
    (g0, g1), (p0, p1) = res["gflops"], res["params_m"]
    speedup = lat["base"]["median_ms"] / lat["model"]["median_ms"]
    return {"arch": label, "model": f"{source}:{name}", "input": list(spec.input_size), "gflops": [g0, g1],
            "params_m": [p0, p1], "gflops_delta_pct": 100 * (g1 / g0 - 1), "params_delta_pct": 100 * (p1 / p0 - 1),
            "latency_ms": [lat["base"]["median_ms"], lat["model"]["median_ms"]], "speedup": speedup,
            "efficiency": speedup / (g0 / g1), "heads": res["heads"], "steps": res["steps"],
            "prune_seconds": res["prune_seconds"], "parity_rel": parity}


def run(quick: bool, only: list[str] | None = None) -> dict[str, Any]:
    """Every architecture in one run (quick: fewer timing runs)."""
    warmup, runs = (3, 10) if quick else (5, 30)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for label, (source, name) in ARCHITECTURES.items():
            if only and label not in only and name not in only:
                continue
            t0 = time.perf_counter()
            row = _measure(label, source, name, warmup, runs, Path(tmp))
            row["seconds"] = time.perf_counter() - t0
            print(f"   {label}: {row['gflops_delta_pct']:+.1f}% GMACs, {row['speedup']:.2f}x, "
                  f"efficiency {row['efficiency']:.2f} ({row['seconds']:.0f}s)", flush=True)
            rows.append(row)
            for f in Path(tmp).iterdir():
                f.unlink()
    return {"rows": rows, "warmup": warmup, "runs": runs, "target": TARGET}


def markdown(res: dict[str, Any]) -> str:
    rows = res["rows"]
    out = ["## Architecture coverage: the published table's ten at -65% MACs", "",
           f"`make bench-arch`. Each model with random weights at its default input size, pruned by the pipeline's "
           f"Pruner (default criterion, global ranking, widths in multiples of 8, attention heads whole) until MACs "
           f"fall by {res['target']:.0%}; no truncation, no recovery (random weights carry no accuracy to keep). "
           f"Latency: ONNX Runtime CPU, batch 1, FP32, median of {res['runs']} interleaved runs after "
           f"{res['warmup']} warm-up runs, base and compressed timed side by side. GMACs are multiply-accumulates "
           f"(the published tables' \"GFLOPs\"). Efficiency = speedup / (base GMACs / compressed GMACs); 1.0 means "
           f"the latency fell as much as the MACs.", "",
           "| architecture | model | input | params M base → pruned (Δ) | GMACs base → pruned (Δ) | heads | "
           "latency ms base | pruned | speedup | efficiency |",
           "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        (p0, p1), (g0, g1), (l0, l1) = r["params_m"], r["gflops"], r["latency_ms"]
        heads = f"{r['heads'][0]} → {r['heads'][1]}" if r["heads"][0] else "-"
        out.append(f"| {r['arch']} | `{r['model']}` | {r['input'][0]}x{r['input'][1]} | {p0:.1f} → {p1:.1f} "
                   f"({r['params_delta_pct']:+.1f}%) | {g0:.2f} → {g1:.2f} ({r['gflops_delta_pct']:+.1f}%) | {heads} | "
                   f"{l0:.1f} | {l1:.1f} | {r['speedup']:.2f}x | {r['efficiency']:.2f} |")
    if rows:
        eff = [r["efficiency"] for r in rows]
        worst = min(rows, key=lambda r: r["efficiency"])
        best = max(rows, key=lambda r: r["efficiency"])
        out += ["", f"Median efficiency {statistics.median(eff):.2f} over {len(rows)} architectures; lowest "
                f"{worst['arch']} ({worst['efficiency']:.2f}), highest {best['arch']} ({best['efficiency']:.2f}). "
                f"Every row at least {min(-r['gflops_delta_pct'] for r in rows):.1f}% fewer MACs. ONNX parity "
                f"(max |difference| / max |output|, 2 images) of the pruned models at most "
                f"{max(r['parity_rel']['model'] for r in rows):.1e}, of the random-weight base models at most "
                f"{max(r['parity_rel']['base'] for r in rows):.1e}. Time per model (prune + export + timing): "
                + ", ".join(f"{r['arch']} {r['seconds']:.0f}s" for r in rows) + "."]
    return "\n".join(out) + "\n\n"
