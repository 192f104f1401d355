"""INT8 after pruning: base FP32, pruned FP32, pruned INT8 and base INT8.

Latency: timm ResNet-50 at 3x224x224 with random weights (latency does not depend on them), pruned to a 2x
measured speedup by the pipeline's latency-targeted pruning (L2 criterion, no data needed), both models
exported and quantized the way `export.quantize: int8` does it (QDQ, per-channel weights, minmax ranges from
32 random images), the four timed at batch 1 on ONNX Runtime CPU in one interleaved loop (10 blocks of at
least 0.3 s per model). Accuracy: the trained demo model (`configs/demo.yaml` with `export.quantize: int8`),
one pipeline run per seed; the base INT8 model is the run's `07_validate/base.onnx` quantized on the same
calibration split, scored on the same validation split.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
ROLES = ("base FP32", "pruned FP32", "pruned INT8", "base INT8")


def _int8(fp32: Path, out: Path, batches: list[np.ndarray], modules: set[str], work: Path) -> dict[str, Any]:
    from export.quantize import int8_model

    return int8_model(fp32, out, batches, "minmax", 99.999, [], modules, work)


def resnet50_latency(quick: bool) -> dict[str, Any]:
    from benchmarks.latency_target import prune_to_speedup
    from export.runtime import OrtModel
    from export.torch2onnx import torch2onnx
    from export.validation import latency, speedup

    models: dict[str, Any] = {}
    pruned = prune_to_speedup("timm", "resnet50", 2.0, models=models)
    cfg = models["config"]
    shape = (1, 3, *cfg.model.input_size)
    rng = np.random.default_rng(0)
    batches = [rng.standard_normal((8, *shape[1:])).astype(np.float32) for _ in range(4)]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        paths = {}
        for key, m in (("base", models["base"]), ("pruned", models["pruned"])):
            fp32 = tmp / f"{key}.onnx"
            torch2onnx(m.eval(), torch.zeros(*shape), fp32, cfg.export, {"role": key})
            int8 = tmp / f"{key}.int8.onnx"
            _int8(fp32, int8, batches, {n for n, _ in m.named_modules()}, tmp / f"work-{key}")
            paths[f"{key} FP32"], paths[f"{key} INT8"] = fp32, int8
        threads = cfg.validate_.threads
        rts = {role: OrtModel(paths[role], threads) for role in ROLES}
        sizes = {role: paths[role].stat().st_size for role in ROLES}
        lat = latency(rts, shape, 10, 50 if quick else 100, blocks=10, block_seconds=0.3)
    rows = {}
    for role in ROLES:
        s = speedup(lat, "base FP32", role) if role != "base FP32" else None
        rows[role] = {"median_ms": lat[role]["median_ms"], "p10_ms": lat[role]["p10_ms"],
                      "p90_ms": lat[role]["p90_ms"], "bytes": sizes[role],
                      "speedup": s["speedup"] if s else 1.0, "low": s["speedup_low"] if s else 1.0,
                      "high": s["speedup_high"] if s else 1.0}
    int8_over_fp32 = speedup(lat, "pruned FP32", "pruned INT8")
    return {"rows": rows, "pruning": {k: pruned[k] for k in ("achieved", "macs_ratio", "steps")},
            "pruned_int8_vs_pruned_fp32": int8_over_fp32, "base_int8_vs_base_fp32": speedup(lat, "base FP32",
                                                                                            "base INT8")}


def demo_seed(out: Path, seed: int) -> dict[str, Any]:
    """One demo pipeline run with INT8, plus the base model quantized on the same calibration split."""
    from torch.utils.data import DataLoader

    from core.data import build_splits
    from export.runtime import OrtModel
    from export.validation import accuracy
    from pipeline.config import load_config

    run = out / f"int8-demo-seed{seed}"
    overrides = [f"seed={seed}", "export.quantize=int8", "runtime.progress=false"]
    cmd = [sys.executable, "-m", "pipeline.cli", "pipeline", str(REPO / "configs" / "demo.yaml"), "--run-dir",
           str(run), "--fresh", *[a for o in overrides for a in ("--set", o)]]
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
    if done.returncode != 0:
        raise SystemExit(f"demo seed {seed} exited {done.returncode}:\n{done.stderr[-3000:]}")
    s = json.loads((run / "summary.json").read_text())
    config = load_config(REPO / "configs" / "demo.yaml", overrides)
    splits = build_splits(config)
    cal, left = [], config.export.calibration_samples
    for x, _ in DataLoader(splits.calibration, batch_size=config.calibrate.batch_size):
        if left <= 0:
            break
        cal.append(x[:left].numpy())
        left -= len(x)
    base_int8 = out / f"int8-demo-seed{seed}-base.int8.onnx"
    _int8(run / "07_validate" / "base.onnx", base_int8, cal, set(), out / f"int8-demo-seed{seed}-work")
    val = DataLoader(splits.validation, batch_size=config.data.eval_batch_size)
    b8 = accuracy(OrtModel(base_int8, config.validate_.threads), val)
    q = s["quantized"]
    return {"seed": seed, "base FP32": s["base"]["top1"], "pruned FP32": s["compressed"]["top1"],
            "pruned INT8": q["top1"], "base INT8": b8["top1"], "agreement": q["agreement"],
            "int8_drop": q["top1_drop"], "speedup_vs_base": q["speedup_vs_base"]["speedup"],
            "speedup_vs_compressed": q["speedup_vs_compressed"]["speedup"], "gflops_delta": s["delta_pct"]["gflops"]}


def run(out: Path, seeds: list[int], quick: bool = False) -> dict[str, Any]:
    res = {"resnet50": resnet50_latency(quick)}
    r = res["resnet50"]["rows"]
    print("int8 resnet50: " + ", ".join(f"{k} {v['median_ms']:.1f} ms" for k, v in r.items()), flush=True)
    res["demo"] = []
    for seed in seeds[:1] if quick else seeds:
        res["demo"].append(demo_seed(out, seed))
        print(f"int8 demo seed {seed}: " + ", ".join(f"{k} {res['demo'][-1][k]:.2f}" for k in ROLES), flush=True)
    return res


def _mean_sd(values: list[float]) -> str:
    return f"{statistics.mean(values):.2f}" + (f" ± {statistics.stdev(values):.2f}" if len(values) > 1 else "")


def markdown(res: dict[str, Any]) -> str:
    r50 = res["resnet50"]
    p = r50["pruning"]
    lines = ["## INT8", "", (__doc__ or "").split("\n\n", 1)[1].strip(), "",
             f"### Latency: timm ResNet-50, 3x224x224, batch 1 (pruned to {p['achieved']:.2f}x FP32 in "
             f"{p['steps']} steps, MACs {p['macs_ratio']:.2f}x fewer)", "",
             "| artifact | median ms | p10-p90 ms | speedup vs base FP32 | spread | size MB |",
             "|---|---|---|---|---|---|"]
    for role, v in r50["rows"].items():
        lines.append(f"| {role} | {v['median_ms']:.1f} | {v['p10_ms']:.1f}-{v['p90_ms']:.1f} | "
                     f"{v['speedup']:.2f}x | {v['low']:.2f}-{v['high']:.2f} | {v['bytes'] / 1e6:.1f} |")
    q, b = r50["pruned_int8_vs_pruned_fp32"], r50["base_int8_vs_base_fp32"]
    lines += ["", f"INT8 over FP32 on the same model: pruned {q['speedup']:.2f}x ({q['speedup_low']:.2f}-"
              f"{q['speedup_high']:.2f}), base {b['speedup']:.2f}x ({b['speedup_low']:.2f}-{b['speedup_high']:.2f})."]
    demo = res["demo"]
    lines += ["", f"### Accuracy: the demo model (digits 1x32x32), top-1 %, {len(demo)} seed(s)", "",
              "| seed | base FP32 | pruned FP32 | pruned INT8 | base INT8 | INT8 drop (pts) | agreement % | "
              "INT8 speedup vs base FP32 | vs pruned FP32 |", "|---|---|---|---|---|---|---|---|---|"]
    for d in demo:
        lines.append(f"| {d['seed']} | {d['base FP32']:.2f} | {d['pruned FP32']:.2f} | {d['pruned INT8']:.2f} | "
                     f"{d['base INT8']:.2f} | {d['int8_drop']:+.2f} | {d['agreement']:.1f} | "
                     f"{d['speedup_vs_base']:.2f}x | {d['speedup_vs_compressed']:.2f}x |")
    lines.append("| mean ± sd | " + " | ".join(_mean_sd([d[k] for d in demo]) for k in ROLES) + " | "
                 + _mean_sd([d["int8_drop"] for d in demo]) + " | " + _mean_sd([d["agreement"] for d in demo])
                 + " | " + _mean_sd([d["speedup_vs_base"] for d in demo]) + " | "
                 + _mean_sd([d["speedup_vs_compressed"] for d in demo]) + " |")
    return "\n".join(lines) + "\n"
