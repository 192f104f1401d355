"""The published table's ten architectures (and one outside them) through the stage list to ONNX.

Random weights, synthetic data and the smallest input each architecture allows, so every model runs the real
stages (load, calibrate, filter_prune, layer_truncate, finetune, export) in seconds. Checks: MACs fell, the
exported ONNX matches the model rebuilt from the last checkpoint (weights_only=True) within 1e-4 relative,
the rebuilt model is the checkpointed one (same state, same recorded structure, attention attributes that
match the weights), it still trains (auxiliary heads included), and truncation found candidates or said why not.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from rich.console import Console

from benchmarks.arch import ARCHITECTURES
from core.models import build_model, rebuild, structure_of
from core.rundir import RunDir, load_checkpoint
from export.runtime import OrtModel
from pipeline.config import load_config
from pipeline.runner import run_pipeline
from stages._attention import attention_modules
from stages._recovery import split_outputs
from tests.conftest import tiny_config, write_config

# Smallest inputs that keep every stage meaningful (64 by default; the ViTs are built for it, a 4x4 token grid):
# Inception-v3 with its auxiliary head needs its full 299.
SMALL = {"inception_v3": 299}
NO_BLOCKS = {"densenet121", "inception_v3"}
OUTSIDE = {"DeiT-Tiny (outside the ten)": ("timm", "deit_tiny_patch16_224"),
           "RegNetY-200MF (outside the ten)": ("timm", "regnety_002")}


def _config(source: str, name: str, size: int) -> dict:
    return tiny_config(
        name=name.replace("/", "_"),
        model={"source": source, "name": name, "num_classes": 10, "in_chans": 3, "input_size": [size, size]},
        data={"synthetic_samples": 32, "batch_size": 8, "eval_batch_size": 16},
        train={"enabled": False},
        calibrate={"batches": 1, "batch_size": 8},
        # small learning rates: one SGD step on random weights can otherwise blow activations up to ~1e7,
        # where float32 itself (PyTorch vs PyTorch in float64) disagrees by more than the parity bound
        filter_prune={"target_flops_reduction": 0.5, "steps": 2, "p0": 0.35, "recovery_steps": 1,
                      "recovery_lr": 1e-4, "max_accuracy_drop": 100.0},
        layer_truncate={"max_layers": 1, "recovery_steps": 1, "recovery_lr": 1e-4, "max_accuracy_drop": 100.0},
        finetune={"max_epochs": 1, "lr": 1e-4},
        runtime={"progress": False, "threads": 2})


@pytest.mark.parametrize("label", list(ARCHITECTURES) + list(OUTSIDE))
def test_architecture_prunes_truncates_exports_and_reloads(label: str, tmp_path: Path):
    source, name = {**ARCHITECTURES, **OUTSIDE}[label]
    size = SMALL.get(name, 64)
    config = load_config(write_config(tmp_path / "c.yaml", _config(source, name, size)))
    run = RunDir(tmp_path / "run")
    torch.manual_seed(0)
    run_pipeline(config, run, Console(quiet=True), until="export")
    manifest = json.loads(run.manifest_path.read_text())["stages"]
    assert all(manifest[s]["status"] == "done" for s in ("load", "calibrate", "filter_prune", "layer_truncate",
                                                        "finetune", "export")), manifest
    prune = manifest["filter_prune"]["metrics"]
    assert prune["flops_reduction"] >= 0.15, prune
    if attention_modules(build_model(config.model, with_weights=False)):
        assert prune["heads"] < prune["heads_before"], prune
    truncate = manifest["layer_truncate"]["metrics"]
    if name in NO_BLOCKS:  # dense concatenation and Inception modules: nothing computes y = x + f(x)
        assert truncate["candidates"] == 0 and truncate["stop_reason"].startswith("no removable block"), truncate
    else:  # residual blocks, inverted residuals, transformer blocks, VGG's shape-keeping conv runs
        assert truncate["candidates"] > 0 and truncate["stop_reason"] == "removed max_layers=1 blocks", truncate

    ckpt = load_checkpoint(run.root / manifest["finetune"]["checkpoint"])
    model = rebuild(config.model, ckpt["structure"], ckpt["model"]).eval()
    # identical model: same tensors, same recorded structure, attention attributes that match the weights
    state = model.state_dict()
    assert state.keys() == ckpt["model"].keys()
    assert all(torch.equal(state[k], ckpt["model"][k]) for k in state)
    assert structure_of(model, config.model) == ckpt["structure"]
    for attn in attention_modules(model).values():
        assert attn.qkv.out_features == 3 * attn.num_heads * attn.head_dim == 3 * attn.proj.in_features
    assert sum(p.numel() for p in model.parameters()) < sum(
        p.numel() for p in build_model(config.model, with_weights=False).parameters())

    x = torch.randn(3, 3, size, size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = model(x).numpy()
    out = OrtModel(run.root / "model.onnx")(x.numpy())
    assert out.shape == (3, 10)
    assert np.abs(out - ref).max() <= 1e-4 * max(np.abs(ref).max(), 1.0)

    # it still trains: every output (auxiliary classifiers too) has the class width and takes a backward pass
    model.train()
    logits, aux = split_outputs(model(x))
    assert logits.shape == (3, 10) and all(a.shape == (3, 10) for a in aux)
    sum(o.sum() for o in [logits, *aux]).backward()


def test_vit_heads_are_pruned_whole_and_recorded(tmp_path: Path):
    """Under the per-layer ranking every attention keeps the stage's share of heads; the record rebuilds them."""
    cfg = _config("timm", "vit_base_patch16_224", 32)
    cfg["filter_prune"].update({"ranking": "per_layer", "steps": 1, "p0": 0.5})
    config = load_config(write_config(tmp_path / "c.yaml", cfg))
    run = RunDir(tmp_path / "run")
    run_pipeline(config, run, Console(quiet=True), until="filter_prune")
    ckpt = load_checkpoint(run.root / "03_filter_prune" / "checkpoint.pt")
    keep = round(12 * (1 - ckpt["state"]["dynamics"][1]["fraction"]))  # the step's share, capped to the target
    assert 1 <= keep < 12
    heads = {k: v["num_heads"] for k, v in ckpt["structure"]["attrs"].items() if "num_heads" in v}
    assert len(heads) == 12 and set(heads.values()) == {keep}, heads
    model = rebuild(config.model, ckpt["structure"], ckpt["model"]).eval()
    for attn in attention_modules(model).values():
        assert attn.num_heads == keep and attn.qkv.out_features == 3 * keep * 64 == 3 * attn.proj.in_features
    with torch.no_grad():
        assert model(torch.zeros(1, 3, 32, 32)).shape == (1, 10)
