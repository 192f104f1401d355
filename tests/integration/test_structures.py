"""One model per structural class nobody named, at small sizes, through the stages to ONNX.

Each class is a way a model can defeat channel pruning: a parameter outside any known layer reshaped by an
attribute (MetaFormer's layer scale), attention with its own head attributes (LeViT, EfficientFormer), shifted
windows (roll and window partition), spatial-reduction attention (PVT), cross-covariance attention (XCiT),
re-parameterisable branches (MobileOne), hybrid conv-attention (MobileViT). Every one must finish: pruned where
the structure allows, held whole with the reason where it does not, the ONNX export equal to the model rebuilt
from its weights-only checkpoint.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from rich.console import Console
from torch import nn

from core.models import rebuild, structure_of
from core.rundir import RunDir, load_checkpoint
from export.runtime import OrtModel
from pipeline.config import load_config
from pipeline.runner import run_pipeline
from tests.conftest import write_config
from tests.integration.test_architectures import _config

CLASSES = {
    "layer scale via reshape (PoolFormer)": ("timm", "poolformer_s12", 64),
    "attention with its own head attributes (LeViT)": ("timm", "levit_128s", 64),
    "spatial-reduction attention (PVT-v2)": ("timm", "pvt_v2_b0", 64),
    "cross-covariance attention (XCiT)": ("timm", "xcit_nano_12_p16_224", 64),
    "re-parameterisable branches (MobileOne)": ("timm", "mobileone_s0", 64),
    "hybrid conv-attention (MobileViT)": ("timm", "mobilevit_xxs", 64),
    "shifted windows (roll + window partition)": ("python", "tests/fixtures/shifted.py:build", 32),
}


def run_class(tmp_path: Path, source: str, name: str, size: int) -> tuple[dict, Path]:
    cfg = _config(source, name, size)
    cfg["name"] = "cls"
    config = load_config(write_config(tmp_path / "c.yaml", cfg))
    run = RunDir(tmp_path / "run")
    torch.manual_seed(0)
    run_pipeline(config, run, Console(quiet=True), until="export")
    return json.loads(run.manifest_path.read_text())["stages"], run.root


@pytest.mark.parametrize("label", list(CLASSES))
def test_structural_class_finishes_with_reasons_parity_and_reload(label: str, tmp_path: Path, monkeypatch):
    from tests.conftest import REPO

    monkeypatch.chdir(REPO)  # the shifted-window fixture is a factory file relative to the repository
    source, name, size = CLASSES[label]
    stages, root = run_class(tmp_path, source, name, size)
    assert all(stages[s]["status"] == "done" for s in ("load", "calibrate", "filter_prune", "layer_truncate",
                                                      "finetune", "export")), stages
    prune = stages["filter_prune"]["metrics"]
    ckpt_prune = load_checkpoint(root / stages["filter_prune"]["checkpoint"])
    held = ckpt_prune["state"]["held_whole"]
    assert prune["held_whole"] == len(held)
    for h in held:  # anything left whole says why and how much of the model it keeps
        assert h["reason"] and h["kind"] and 0.0 <= h["macs_share"] <= 1.0 and h["layers"], h
    # pruned as far as the structure allows: the target, or what is held whole explains the gap
    assert prune["flops_reduction"] >= 0.15 or prune["held_macs_share"] >= 0.3, prune

    config = load_config(root / "config.json") if (root / "config.json").is_file() else None
    config = config or load_config(tmp_path / "c.yaml")
    ckpt = load_checkpoint(root / stages["finetune"]["checkpoint"])
    model = rebuild(config.model, ckpt["structure"], ckpt["model"]).eval()
    state = model.state_dict()
    assert all(torch.equal(state[k], ckpt["model"][k]) for k in ckpt["model"])
    assert structure_of(model, config.model) == ckpt["structure"]
    x = torch.randn(3, 3, size, size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = model(x).numpy()
    out = OrtModel(root / "model.onnx")(x.numpy())
    assert np.abs(out - ref).max() <= 1e-4 * max(np.abs(ref).max(), 1.0)


def test_layer_scale_attribute_follows_its_pruned_parameter(tmp_path: Path):
    """A module whose forward reshapes its own parameter by a stored shape (MetaFormer's Scale): the shape is
    pruned with the channels, recorded in the structure, and rebuilt from it."""
    from core.config import ModelConfig
    from stages._graph import build_graph
    from stages._structure import prune_group

    spec = ModelConfig(source="timm", name="poolformer_s12", num_classes=10, input_size=(64, 64))
    from core.models import build_model

    torch.manual_seed(0)
    model = build_model(spec).eval()
    x = torch.randn(2, 3, 64, 64)
    dg = build_graph(model, torch.zeros(1, 3, 64, 64))
    root = model.get_submodule("stages.0.blocks.1.mlp.fc2")
    pruner = dg.get_pruner_of_module(root)
    assert prune_group(dg, root, pruner.prune_out_channels, [0, 5, 17, 33], model)
    scale = model.get_submodule("stages.0.blocks.0.layer_scale1")
    assert scale.scale.shape == (60,) and tuple(scale.shape) == (60, 1, 1)
    with torch.no_grad():
        y = model(x)
    structure = structure_of(model, spec)
    assert structure["attrs"]["stages.0.blocks.0.layer_scale1"]["shape"] == [60, 1, 1]
    again = rebuild(spec, structure, model.state_dict()).eval()
    with torch.no_grad():
        assert torch.equal(again(x), y)


class _Heads(nn.Module):
    """Attention with separate q, k, v projections and a head count, recognised by structure, whose forward takes
    the head size from the input's width (c // n_heads), as torch's MultiheadAttention does: no head can go."""

    def __init__(self, dim: int = 32, n_heads: int = 4) -> None:
        super().__init__()
        self.n_heads = n_heads
        self.q, self.k, self.v, self.out = (nn.Linear(dim, dim) for _ in range(4))

    def forward(self, x):
        b, n, c = x.shape

        def split(t):
            return t.view(b, n, self.n_heads, c // self.n_heads).transpose(1, 2)

        att = (split(self.q(x)) @ split(self.k(x)).transpose(-1, -2)).softmax(-1)
        return self.out((att @ split(self.v(x))).transpose(1, 2).reshape(b, n, c))


def test_attention_whose_heads_cannot_go_is_held_whole_with_the_reason_and_still_runs():
    from types import SimpleNamespace

    from pipeline.config import Config
    from stages._criteria import CRITERIA
    from stages._goals import Plan
    from stages._pruner import Pruner

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Linear(16, 32)
            self.attn = _Heads()
            self.mlp = nn.Sequential(nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 32))
            self.head = nn.Linear(32, 4)

        def forward(self, x):  # x: B x 1 x 8 x 16 image, read as 8 tokens of 16 features
            t = self.embed(x.flatten(1, 2))
            t = t + self.attn(t)
            t = t + self.mlp(t)
            return self.head(t.mean(1))

    torch.manual_seed(0)
    model = Net().eval()
    cfg = Config.model_validate({"name": "a", "model": {"source": "timm", "name": "resnet18", "num_classes": 4,
                                                        "in_chans": 1, "input_size": [8, 16]},
                                 "filter_prune": {"criterion": "l2", "round_to": 8}})
    ctx = SimpleNamespace(config=cfg, device=torch.device("cpu"), loader=lambda *a, **k: [],
                          track=lambda items, *a, **k: items)
    pruner = Pruner(CRITERIA.get("l2")(), ctx)
    pruner.apply(model, Plan(0, share=0.25))
    with torch.no_grad():
        assert model(torch.randn(2, 1, 8, 16)).shape == (2, 4)
    held = {h.root: h for h in pruner.held.values()}
    inside = [h for h in held.values() if "attention `attn`" in h.reason]
    assert inside, {r: h.reason for r, h in held.items()}
    assert all("_Heads, n_heads=4" in h.reason and "derives a head size" in h.reason for h in inside)
    assert model.attn.q.out_features == 32 and model.attn.n_heads == 4, "the heads are kept whole"
    assert model.mlp[0].out_features < 64, "the rest of the model is pruned"
