"""Architecture matrix (`make bench-matrix`, and the `slow` tests): models no issue named, through the stages.

Each model is built with random weights at a small input its structure allows, run through load, calibrate,
filter_prune (target -50% MACs), layer_truncate, finetune and export on synthetic data, then the ONNX export is
compared with the model rebuilt from its weights-only checkpoint. The table says what was cut, what was held
whole and why (with its share of the MACs), and the parity. Support must come from structure: these models
were chosen for their variety, not because anything in the code names them.
"""

from __future__ import annotations

import json
import statistics
import tempfile
import time
import traceback
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import torch

from benchmarks.tp_alone import RATIO, cell

# (source, name, input size): at least 25, across structural families
MATRIX: list[tuple[str, str, int]] = [
    ("torchvision", "swin_t", 224), ("torchvision", "maxvit_t", 224), ("torchvision", "regnet_y_800mf", 64),
    ("torchvision", "googlenet", 64), ("torchvision", "mnasnet1_0", 64), ("torchvision", "efficientnet_b0", 64),
    ("torchvision", "convnext_tiny", 64), ("torchvision", "resnext50_32x4d", 64),
    ("torchvision", "squeezenet1_1", 64), ("torchvision", "mobilenet_v2", 64), ("torchvision", "vit_b_16", 64),
    ("torchvision", "wide_resnet50_2", 64), ("timm", "levit_128s", 224), ("timm", "poolformer_s12", 64),
    ("timm", "efficientformer_l1", 224), ("timm", "pvt_v2_b0", 64), ("timm", "xcit_nano_12_p16_224", 64),
    ("timm", "mobileone_s0", 64), ("timm", "mobilevit_xxs", 64), ("timm", "ghostnet_100", 64),
    ("timm", "dla34", 64), ("timm", "repvgg_a0", 64), ("timm", "resmlp_12_224", 64), ("timm", "edgenext_xx_small", 64),
    ("timm", "fastvit_t8", 64), ("timm", "efficientvit_b0", 64), ("timm", "rexnet_100", 64),
    ("timm", "cspdarknet53", 64), ("timm", "twins_svt_small", 64), ("timm", "hrnet_w18_small", 64),
]
# Models a report named for widths their forward derives (stored split sizes, per-channel gains, grouped convs,
# reshapes to a stored width): run by the benchmark beside the matrix, not part of the untold set the slow tests
# parametrise
WIDTH_DERIVED: list[tuple[str, str, int]] = [
    ("timm", "inception_next_tiny", 64), ("timm", "mambaout_femto", 64), ("timm", "res2net50_26w_4s", 64),
    ("timm", "caformer_s18", 64), ("timm", "dpn68", 64), ("timm", "nf_resnet26", 64),
]


def _config(source: str, name: str, size: int) -> dict[str, Any]:
    return {
        "name": "matrix", "seed": 0,
        "model": {"source": source, "name": name, "num_classes": 10, "in_chans": 3, "input_size": [size, size]},
        "data": {"kind": "synthetic", "synthetic_samples": 32, "batch_size": 8, "eval_batch_size": 16},
        "calibrate": {"batches": 1, "batch_size": 8},
        "filter_prune": {"target_flops_reduction": 0.5, "steps": 6, "p0": 0.3, "recovery_steps": 1,
                         "recovery_lr": 1e-4, "max_accuracy_drop": 100.0},
        "layer_truncate": {"max_layers": 1, "recovery_steps": 1, "recovery_lr": 1e-4, "max_accuracy_drop": 100.0},
        "finetune": {"max_epochs": 1, "lr": 1e-4},
        "validate": {"gates": {"max_parity_error": None}},
        "runtime": {"progress": False, "threads": 2},
    }


def run_one(source: str, name: str, size: int, workdir: Path) -> dict[str, Any]:
    """Run one model through the stages to ONNX; the row of the table (raises on any failure)."""
    import yaml
    from rich.console import Console

    from core.models import rebuild, structure_of
    from core.rundir import RunDir, load_checkpoint
    from export.runtime import OrtModel
    from pipeline.config import load_config
    from pipeline.runner import run_pipeline

    (workdir / "c.yaml").write_text(yaml.safe_dump(_config(source, name, size)))
    config = load_config(workdir / "c.yaml")
    run = RunDir(workdir / "run")
    torch.manual_seed(0)
    t0 = time.perf_counter()
    run_pipeline(config, run, Console(quiet=True), until="export")
    seconds = time.perf_counter() - t0
    stages = json.loads(run.manifest_path.read_text())["stages"]
    prune, trunc = stages["filter_prune"]["metrics"], stages["layer_truncate"]["metrics"]
    held = load_checkpoint(run.root / stages["filter_prune"]["checkpoint"])["state"]["held_whole"]
    ckpt = load_checkpoint(run.root / stages["finetune"]["checkpoint"])
    model = rebuild(config.model, ckpt["structure"], ckpt["model"]).eval()
    if structure_of(model, config.model) != ckpt["structure"]:
        raise AssertionError("the rebuilt model's structure differs from the checkpoint's")
    x = torch.randn(3, 3, size, size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = model(x).numpy()
    out = OrtModel(run.root / "model.onnx")(x.numpy())
    rel = float(np.abs(out - ref).max() / max(np.abs(ref).max(), 1e-12))
    if rel > 1e-4:
        raise AssertionError(f"ONNX parity {rel:.1e} (relative) > 1e-4")
    g0 = prune["gflops_before"]
    return {"model": f"{source}:{name}", "input": size, "gflops": g0, "cut": 1.0 - trunc["gflops"] / g0,
            "held": len(held), "held_share": round(sum(h["macs_share"] for h in held), 4),
            "held_kinds": dict(Counter(h["kind"] for h in held)), "held_reasons": [h["reason"] for h in held[:3]],
            "removed_blocks": trunc.get("removed_blocks", []), "parity_rel": rel, "seconds": round(seconds, 1),
            "stop": prune["stop_reason"]}


def inspect_seconds(source: str, name: str, size: int) -> float | None:
    """`compress inspect`'s check (with its ONNX export check) on the run's config, as a user previews a run."""
    from pipeline.config import Config
    from pipeline.inspect import inspect_model

    t0 = time.perf_counter()
    try:
        inspect_model(Config.model_validate(_config(source, name, size)))
    except Exception:  # noqa: BLE001 - the run that follows says what fails; this only times the check
        traceback.print_exc()
        return None
    return round(time.perf_counter() - t0, 2)


def run(quick: bool = False) -> dict[str, Any]:
    from benchmarks import tp_alone

    rows, failures = [], {}
    for source, name, size in (MATRIX[:8] if quick else MATRIX + WIDTH_DERIVED):
        alone = tp_alone.run_one(source, name, size)  # in its own process: it may hang or grow without bound
        inspected = inspect_seconds(source, name, size)
        with tempfile.TemporaryDirectory() as tmp:
            try:
                rows.append(run_one(source, name, size, Path(tmp)) | {"tp_alone": alone, "inspect_s": inspected})
                r = rows[-1]
                print(f"matrix {r['model']}: -{r['cut']:.1%} MACs, held {r['held']} ({r['held_share']:.1%}), "
                      f"parity {r['parity_rel']:.1e}, {r['seconds']:.0f}s; inspect {inspected} s; Torch-Pruning "
                      f"alone: {tp_alone.cell(alone)}", flush=True)
            except Exception as exc:  # noqa: BLE001 - a failure is a row of the table, with its error
                failures[f"{source}:{name}"] = f"{type(exc).__name__}: {exc}"
                traceback.print_exc()
    return {"rows": rows, "failures": failures}


def _ratio(r: dict[str, Any]) -> float | None:
    return r["inspect_s"] / r["seconds"] if r.get("inspect_s") is not None and r["seconds"] > 0 else None


def markdown(res: dict[str, Any]) -> str:
    lines = ["## Architecture matrix", "", (__doc__ or "").split("\n\n", 1)[1].strip(), "",
             f"{len(res['rows'])} of {len(res['rows']) + len(res['failures'])} models finished (the last "
             f"{len(WIDTH_DERIVED)}, when present, are models a report named for widths their forward derives; "
             f"the rest no issue named).", "",
             "| model | input | GMACs | MACs cut | held whole (share of MACs) | why held | parity (rel) | run s | "
             "inspect s (% of run) | Torch-Pruning alone |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in res["rows"]:
        kinds = ", ".join(f"{n} {k}" for k, n in r["held_kinds"].items()) or "-"
        ratio = _ratio(r)
        inspected = f"{r['inspect_s']:.1f} ({ratio:.0%})" if ratio is not None else "-"
        lines.append(f"| {r['model']} | {r['input']} | {r['gflops']:.3g} | -{r['cut']:.1%} | {r['held']} "
                     f"({r['held_share']:.1%}) | {kinds} | {r['parity_rel']:.1e} | {r['seconds']:.0f} | {inspected} "
                     f"| {cell(r.get('tp_alone'))} |")
    for model, error in res["failures"].items():
        lines.append(f"| {model} | | | FAILED | | {error[:120]} | | | | |")
    ratios = sorted(x for r in res["rows"] if (x := _ratio(r)) is not None)
    alone = [r.get("tp_alone") for r in res["rows"] if r.get("tp_alone")]
    if ratios:
        lines += ["", f"`compress inspect` (its structure check and ONNX export check, run before each model's "
                  f"pipeline run) took a median {statistics.median(ratios):.1%} of the pipeline run's time "
                  f"(range {ratios[0]:.1%}-{ratios[-1]:.1%}, {len(ratios)} models)."]
    if alone:
        ok = sum(a["outcome"] == "ok" for a in alone)
        lines += ["", f"Torch-Pruning alone (benchmarks/tp_alone.py: its README's recipe, `MetaPruner` with L2 "
                  f"magnitude, the classifier ignored, `pruning_ratio` {RATIO} in one step, no hand work; `-x%` "
                  f"means it finished with an output of the right shape, which does not prove the channels "
                  f"map right) finished on {ok} of {len(alone)}."]
    lines += ["", "Held-whole kinds: `index map` (channels pass a reshape, concatenation or slice whose channel "
              "mapping cannot be derived: channel shuffles, window partitions), `grouped conv` (a grouped "
              "convolution reached through a concatenation, or with one channel per group: only whole groups "
              "could go), `graph` (Torch-Pruning could not derive the coupling, e.g. an index map "
              "that grows without bound), `breaks forward` (removing units on a copy broke the model: attributes "
              "derived from a width), `time budget`. A MACs cut short of -50% comes with the held share that "
              "explains it (the rest stops at `filter_prune.steps`).", ""]
    return "\n".join(lines)
