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
from tests.conftest import pruner_for, write_config
from tests.fixtures.tied import TiedNet
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


def test_attention_whose_heads_cannot_go_is_held_whole_with_the_reason_and_still_runs():
    from stages._goals import Plan

    torch.manual_seed(0)
    model = TiedNet(literal=True).eval()
    pruner = pruner_for("l2", (8, 16), round_to=8)
    pruner.apply(model, Plan(0, share=0.25))
    with torch.no_grad():
        assert model(torch.randn(2, 1, 8, 16)).shape == (2, 4)
    held = {h.root: h for h in pruner.held.values()}
    inside = [h for h in held.values() if "attention `attn`" in h.reason]
    assert inside, {r: h.reason for r, h in held.items()}
    assert all("Heads, n_heads=4" in h.reason and "derives a head size" in h.reason for h in inside)
    assert model.attn.q.out_features == 32 and model.attn.n_heads == 4, "the heads are kept whole"
    assert model.mlp[0].out_features < 64, "the rest of the model is pruned"
    assert pruner.coupled == {}, "a width spelled as a number cannot shrink, with heads or without"


@pytest.mark.parametrize("latency", [False, True])
def test_heads_tied_to_the_width_they_read_shrink_with_it_as_one_group(latency: bool):
    """Neither `Heads`' heads nor the residual width shrink alone; the proof finds they shrink together (a
    head with head-size channels of the width), the loop prunes them as one group, scored, planned (share or
    latency budget) and applied together, nothing is held, the head count stays true and the model runs."""
    from stages._goals import Plan
    from stages._latency import Profile

    torch.manual_seed(0)
    model = TiedNet().eval()
    pruner = pruner_for("l2", (8, 16), round_to=8)
    for step in range(3):
        if latency:
            layers = {n: 1.0 for n, m in model.named_modules() if isinstance(m, nn.Linear)}
            profile = Profile(total_ms=float(len(layers)) + 1.0, layers=layers, other_ms=1.0)
            plan = Plan(step, share=0.0, budget_ms=2.0, profile=profile)
        else:
            plan = Plan(step, share=0.3)
        pruner.apply(model, plan)
    assert not pruner.held, {r: h.reason for r, h in pruner.held.items()}
    assert list(pruner.coupled.values()) == [["attn.q"]], pruner.coupled
    width = model.embed.out_features
    assert width < 32 and model.attn.n_heads * 8 == width == model.attn.q.out_features == model.mlp[0].in_features
    with torch.no_grad():
        assert model(torch.randn(2, 1, 8, 16)).shape == (2, 4)


def test_inspect_lists_heads_tied_to_a_width_as_one_group_and_exports_the_model_without_a_joint_unit(monkeypatch):
    """`compress inspect` on a user's model whose heads are tied to the width they read: one prunable group
    ("head + its channels", its width in heads), nothing held, and its ONNX check runs on the copy that lost a
    joint unit (a head with head-size channels of the width)."""
    from rich.console import Console

    from pipeline._cli_info import print_inspection
    from pipeline.config import Config
    from pipeline.inspect import inspect_model
    from tests.conftest import REPO, tiny_config

    monkeypatch.chdir(REPO)  # the factory file is relative to the repository
    config = Config.model_validate(tiny_config(model={"source": "python", "name": "tests/fixtures/tied.py:build",
                                                      "num_classes": 4, "in_chans": 1, "input_size": [8, 16]}))
    result = inspect_model(config)
    assert not result.held, result.held
    joint = [g for g in result.groups if g["kind"] == "heads+channels"]
    assert joint == [{"root": "mlp.2", "width": 4, "layers": 3, "kind": "heads+channels", "attentions": 1}], joint
    assert result.onnx["max_rel_diff"] < 1e-4
    out = Console(record=True, width=200)
    print_inspection(result, out)
    text = out.export_text()
    assert "1 of residual channels with the heads of the 1 attention tied to them" in text
    assert "head + its channels" in text and "0 held whole" in text


@pytest.mark.parametrize("coupled", [True, False])
def test_a_group_that_breaks_a_step_is_held_whole_with_every_layer_and_root_it_ties(coupled: bool, monkeypatch):
    """A group the proof passed but a step's removal breaks (here: the proof is told nothing breaks, or that the
    width and the heads shrink together, for a width also spelled as a number) is found by the step's fallback on
    copies (a joint record removed as one) and held: the width by every layer that produces it (held by its root
    alone, it was derived again from its next producer and pruned again: "broke the model even without the groups
    held for it"), and the heads tied to it, with the reason; the step is taken again without them."""
    import stages._pruner as pruner_mod
    from stages._goals import Plan
    from stages._structure import Proof

    def claims_a_coupling(*args, **kwargs) -> Proof:
        if not coupled:
            return Proof({})
        return Proof({"mlp.2": "tied", "attn.q": "tied"}, {"mlp.2": ["attn.q"]})

    claims_a_coupling.last_cached = False
    monkeypatch.setattr(pruner_mod, "prove", claims_a_coupling)
    torch.manual_seed(0)
    model = TiedNet(literal=True).eval()
    pruner = pruner_for("l2", (8, 16), round_to=8, ranking="per_layer")
    pruner.apply(model, Plan(0, share=0.3))
    assert "mlp.2" in pruner.held and ("attn.q" in pruner.held or "attn" in pruner.held), \
        {r: h.reason for r, h in pruner.held.items()}
    assert "breaks the model" in pruner.held["mlp.2"].reason
    assert {"embed", "attn.out", "mlp.2"} <= set(pruner.held["mlp.2"].layers)
    if coupled:
        assert "shrink only together with mlp.2" in pruner.held["attn.q"].reason
    assert model.embed.out_features == 32 and model.attn.n_heads == 4 and model.mlp[0].out_features < 64
    with torch.no_grad():
        assert model(torch.randn(2, 1, 8, 16)).shape == (2, 4)


class _Grouped(nn.Module):
    """Channels into grouped convolutions three ways: straight into one (groups 4), into two with nested counts
    (8 and 2), and through a concatenation (held whole: the concatenation offsets the positions)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, 32, 3, padding=1)
        self.a = nn.Conv2d(32, 64, 1)
        self.bn = nn.BatchNorm2d(64)
        self.g4 = nn.Conv2d(64, 64, 3, padding=1, groups=4)
        self.b = nn.Conv2d(64, 48, 1)
        self.g8 = nn.Conv2d(48, 48, 3, padding=1, groups=8)
        self.g2 = nn.Conv2d(48, 48, 3, padding=1, groups=2)
        self.c1, self.c2 = nn.Conv2d(48, 16, 1), nn.Conv2d(48, 16, 1)
        self.gcat = nn.Conv2d(32, 32, 3, padding=1, groups=4)
        self.head = nn.Linear(32, 4)

    def forward(self, x):
        x = torch.relu(self.stem(x))
        x = self.g4(torch.relu(self.bn(self.a(x))))
        x = self.b(x)
        x = self.g8(x) + self.g2(x)
        x = self.gcat(torch.cat([self.c1(x), self.c2(x)], 1))
        return self.head(x.mean((2, 3)))


@pytest.mark.parametrize("criterion", ["l2", "divergence_taylor"])
def test_grouped_convolutions_shrink_alike_in_every_group(criterion: str):
    """A grouped convolution (not depthwise) loses the same positions in every group, so its groups stay equal
    and its weights line up with the channels it reads: the pruned model computes what the unpruned one does on
    the kept channels. Only the group that reaches one through a concatenation is held, with the reason."""
    from stages._goals import Plan
    from stages._structure import is_grouped

    torch.manual_seed(0)
    model = _Grouped().eval()
    data = [(torch.randn(4, 1, 8, 8), torch.randint(0, 4, (4,))) for _ in range(2)]
    pruner = pruner_for(criterion, (8, 8), data, round_to=8)
    for step in range(3):
        pruner.apply(model, Plan(step, share=0.3))
    with torch.no_grad():
        assert model(torch.randn(2, 1, 8, 8)).shape == (2, 4)
    assert model.g4.in_channels < 64 and model.g4.groups == 4 and model.g4.in_channels % 4 == 0
    assert model.g8.in_channels < 48 and model.g8.groups == 8 and model.g2.groups == 2
    assert model.g8.in_channels == model.g2.in_channels and model.g8.in_channels % 8 == 0
    held = {h.root: h for h in pruner.held.values()}
    assert sorted(held) == ["c1", "c2"], {r: h.reason for r, h in held.items()}
    assert all(h.kind == "grouped conv" and "concatenation" in h.reason for h in held.values())
    assert model.gcat.in_channels == 32, "the concatenation's channels are held"
    assert all(m.weight.shape[1] * m.groups == m.in_channels for m in model.modules() if is_grouped(m))


def test_removing_positions_of_every_group_keeps_the_kept_channels_outputs():
    """Position j of each group goes: the pruned grouped convolution's outputs are the unpruned one's on the
    kept channels (its weights were cut where its inputs were)."""
    from stages._graph import build_graph
    from stages._structure import channel_groups, grouped_channels, prune_group

    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(2, 12, 1), nn.Conv2d(12, 12, 3, padding=1, groups=3)).eval()
    x = torch.randn(1, 2, 6, 6)
    with torch.no_grad():
        before = net(x)
    dg = build_graph(net, x)
    group = dg.get_pruning_group(net[0], dg.get_pruner_of_module(net[0]).prune_out_channels, list(range(12)))
    assert channel_groups(group) == 3
    gone = grouped_channels([1, 3], 12, 3)
    assert gone == [1, 3, 5, 7, 9, 11]
    assert prune_group(dg, net[0], dg.get_pruner_of_module(net[0]).prune_out_channels, gone, net)
    assert net[1].in_channels == 6 and net[1].groups == 3
    # the grouped conv keeps its outputs and loses inputs: the same model with those inputs zeroed agrees
    torch.manual_seed(0)
    ref = nn.Sequential(nn.Conv2d(2, 12, 1), nn.Conv2d(12, 12, 3, padding=1, groups=3)).eval()
    with torch.no_grad():
        ref[0].weight[gone] = 0
        ref[0].bias[gone] = 0
        assert torch.allclose(net(x), ref(x), atol=1e-5)
        assert not torch.allclose(before, net(x)), "the removed channels did contribute"


def test_channels_one_per_convolution_group_are_held_with_the_reason():
    """A convolution with as many groups as input channels and more outputs (a depthwise multiplier) leaves
    no position to remove on its input side: that group is held, said so, and its output side still prunes."""
    from stages._graph import build_graph
    from stages._pruning import classifier_layers

    net = nn.Sequential(nn.Conv2d(1, 16, 3), nn.Conv2d(16, 32, 3, groups=16), nn.Conv2d(32, 8, 1),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4)).eval()
    x = torch.zeros(1, 1, 12, 12)
    found, held = build_graph(net, x).groups(net, classifier_layers(net, 4), {})
    assert [(h.root, h.kind) for h in held] == [("0", "grouped conv")]
    assert "one channel each" in held[0].reason
    assert {name for name, *_ in found} == {"1", "2"}


class _GainConv(nn.Conv2d):
    """A convolution with its own per-output-channel tensors beside weight and bias (a weight-standardised
    convolution's gain, a per-channel buffer), used through its width attribute in forward."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.gain = nn.Parameter(torch.rand(self.out_channels, 1, 1, 1) + 0.5)
        self.register_buffer("shift", torch.randn(self.out_channels))

    def forward(self, x):
        w = torch.nn.functional.batch_norm(self.weight.reshape(1, self.out_channels, -1), None, None,
                                           weight=self.gain.view(-1), training=True).reshape_as(self.weight)
        return self._conv_forward(x, w, self.bias) + self.shift.view(1, -1, 1, 1)


def test_a_layers_own_per_channel_tensors_follow_its_output_channels():
    """Torch-Pruning cuts a layer's weight and bias; any other parameter or buffer of the layer with one entry
    per output channel is cut with them, at the same channels, so the pruned layer computes what the unpruned
    one did on the channels it keeps."""
    from stages._graph import build_graph
    from stages._pruning import classifier_layers
    from stages._structure import prune_group

    torch.manual_seed(0)
    net = nn.Sequential(_GainConv(1, 16, 3), nn.ReLU(), _GainConv(16, 8, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                        nn.Linear(8, 4)).eval()
    x = torch.randn(1, 1, 8, 8)
    with torch.no_grad():
        inner = net[:2](x)
    dg = build_graph(net, x)
    found, held = dg.groups(net, classifier_layers(net, 4), {})
    assert not held and {n for n, *_ in found} == {"0", "2"}
    gone = [1, 5, 6, 15]
    assert prune_group(dg, net[0], dg.get_pruner_of_module(net[0]).prune_out_channels, gone, net)
    kept = [c for c in range(16) if c not in gone]
    assert net[0].gain.shape == (12, 1, 1, 1) and net[0].shift.shape == (12,)
    assert "shift" in dict(net[0].named_buffers())
    with torch.no_grad():
        assert torch.allclose(net[:2](x), inner[:, kept], atol=1e-5)
        assert net(x).shape == (1, 4)


def _twins(make) -> tuple[nn.Module, nn.Module]:
    """A model in eval mode and a reference with the same weights, whose removed channels a test zeroes."""
    model, ref = make().eval(), make().eval()
    ref.load_state_dict(model.state_dict())
    return model, ref


class _StoredSplit(nn.Module):
    """Splits its channels by sizes it stores, runs a depthwise convolution on three of the parts and
    concatenates them back (the parts' consumers are created in an order other than the parts')."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(1, 24, 1)
        self.sizes = (12, 4, 4, 4)
        self.d = nn.ModuleList([nn.Conv2d(4, 4, 3, padding=1, groups=4) for _ in range(3)])
        self.head = nn.Linear(24, 4)

    def forward(self, x):
        x = self.a(x)
        first, *parts = torch.split(x, self.sizes, dim=1)
        x = torch.cat([first, *(d(p) for d, p in zip(self.d, parts, strict=True))], 1)
        return self.head(torch.relu(x).mean((2, 3)))


def test_split_sizes_a_module_stores_follow_the_channels_each_part_loses():
    """Each part of a split loses the removed channels that fall in it, its consumers lose the same ones (not
    those of another part), and the module's stored sizes are set to match: the pruned model computes what the
    unpruned one does with those channels zeroed."""
    from stages._graph import build_graph
    from stages._structure import prune_group

    torch.manual_seed(0)
    model, ref = _twins(_StoredSplit)
    x = torch.randn(1, 1, 6, 6)
    gone = [0, 5, 13, 14, 18, 23]  # parts 0, 0, 1, 1, 2, 3
    with torch.no_grad():  # the removed channels carry nothing to the head: their producer and biases zeroed
        ref.a.weight[gone] = 0
        ref.a.bias[gone] = 0
        for d, local in zip(ref.d, ([1, 2], [2], [3]), strict=True):
            d.bias[local] = 0
        expected = ref(x)
    dg = build_graph(model, x)
    assert prune_group(dg, model.a, dg.get_pruner_of_module(model.a).prune_out_channels, gone, model)
    assert model.sizes == (10, 2, 3, 3)
    assert [d.in_channels for d in model.d] == [2, 3, 3]
    with torch.no_grad():
        assert torch.allclose(model(x), expected, atol=1e-5)


class _EqualSplit(nn.Module):
    """Splits into equal parts by one size, each part through its own convolution, concatenated back."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(1, 24, 1)
        self.c = nn.ModuleList([nn.Conv2d(6, 6, 1) for _ in range(4)])
        self.head = nn.Linear(24, 4)

    def forward(self, x):
        parts = torch.split(self.a(x), 6, dim=1)
        x = torch.cat([c(p) for c, p in zip(self.c, parts, strict=True)], 1)
        return self.head(torch.relu(x).mean((2, 3)))


def test_an_equal_split_maps_each_part_to_its_own_place_in_the_concatenation():
    """Torch-Pruning inferred an equal split's parts from its consumers (104, 26, 26, 26 for four parts of 26
    in Res2Net) and mapped one part's channels into others; with the parts the forward saw, removing outputs of
    the third part's convolution removes exactly those inputs of the head."""
    from stages._graph import build_graph
    from stages._structure import prune_group

    torch.manual_seed(0)
    model, ref = _twins(_EqualSplit)
    x = torch.randn(1, 1, 5, 5)
    with torch.no_grad():
        ref.c[2].weight[[0, 4]] = 0
        ref.c[2].bias[[0, 4]] = 0
        expected = ref(x)
    dg = build_graph(model, x)
    group = dg.get_pruning_group(model.c[2], dg.get_pruner_of_module(model.c[2]).prune_out_channels, [0, 4])
    touched = {type(dep.target.module).__name__ for dep, _ in group}
    assert "Conv2d" in touched and not any(dep.target.module is model.a for dep, _ in group), \
        "the group stays in its part: the producer before the split is not in it"
    assert prune_group(dg, model.c[2], dg.get_pruner_of_module(model.c[2]).prune_out_channels, [0, 4], model)
    assert model.head.in_features == 22 and [c.out_channels for c in model.c] == [6, 6, 4, 6]
    with torch.no_grad():
        assert torch.allclose(model(x), expected, atol=1e-5)


class _Parts(nn.Module):
    """One convolution's channels split into equal parts by a stored width (`torch.split(x, self.width, 1)`, as
    Res2Net does), each part through its own convolution, concatenated again: the parts must stay equal, and the
    stored width must follow them."""

    def __init__(self) -> None:
        super().__init__()
        self.width = 8
        self.stem = nn.Conv2d(1, 16, 3, padding=1)
        self.conv1 = nn.Conv2d(16, 32, 1)
        self.convs = nn.ModuleList(nn.Conv2d(8, 8, 3, padding=1) for _ in range(4))
        self.head = nn.Linear(32, 4)

    def parts(self, x):
        return torch.split(x, self.width, 1)

    def forward(self, x):
        parts = self.parts(torch.relu(self.conv1(torch.relu(self.stem(x)))))
        x = torch.cat([torch.relu(conv(p)) for conv, p in zip(self.convs, parts, strict=True)], 1)
        return self.head(x.mean((2, 3)))


class _LiteralParts(_Parts):
    """The same, split by a width written in the forward: no attribute can follow it, so removing any of conv1's
    channels breaks the model."""

    def parts(self, x):
        return torch.split(x, 8, 1)


def test_equal_parts_by_a_stored_width_lose_the_same_positions_and_the_width_follows():
    """A split into equal parts by one size keeps them equal only if each part loses as many channels: conv1's
    units are positions removed from every part at once, the stored width is set to the new part size, and the
    pruned model computes what the unpruned one does with those channels zeroed."""
    from stages._graph import build_graph
    from stages._structure import channel_groups, grouped_channels, prune_group

    torch.manual_seed(0)
    model, ref = _twins(_Parts)
    x = torch.randn(1, 1, 6, 6)
    dg = build_graph(model, x)
    handler = dg.get_pruner_of_module(model.conv1).prune_out_channels
    assert channel_groups(dg.get_pruning_group(model.conv1, handler, list(range(32)))) == 4
    gone = grouped_channels([0, 5], 32, 4)
    with torch.no_grad():
        ref.conv1.weight[gone] = 0
        ref.conv1.bias[gone] = 0
        expected = ref(x)
    assert prune_group(dg, model.conv1, handler, gone, model)
    assert model.width == 6 and [c.in_channels for c in model.convs] == [6, 6, 6, 6]
    with torch.no_grad():
        assert torch.allclose(model(x), expected, atol=1e-5)


def test_equal_parts_are_pruned_by_the_loop_and_never_held():
    """Through the pruning loop: the proof finds nothing that breaks, conv1 shrinks by whole positions of every
    part, and the model runs; the same model splitting by a literal width is held with the reason."""
    from stages._goals import Plan

    for make, held_roots in ((_Parts, []), (_LiteralParts, ["conv1"])):
        torch.manual_seed(0)
        model = make().eval()
        pruner = pruner_for("l2", (8, 8), round_to=1)
        for step in range(2):
            pruner.apply(model, Plan(step, share=0.3))
        with torch.no_grad():
            assert model(torch.randn(2, 1, 8, 8)).shape == (2, 4)
        held = {h.root: h for h in pruner.held.values()}
        assert sorted(held) == held_roots, {r: h.reason for r, h in held.items()}
        if make is _Parts:
            assert model.conv1.out_channels < 32 and model.conv1.out_channels == 4 * model.width
        else:
            assert model.conv1.out_channels == 32 and held["conv1"].kind == "breaks forward"


class _DualPath(nn.Module):
    """Two dual-path blocks (DPN's): a layer's output cut at a stored width into a residual part, added to the
    same part of the block's input (cut the same way), and a dense part, concatenated after the input's dense
    part. Torch-Pruning inferred the concatenations' part widths through the slices wrongly and the stored width
    did not follow: every group was held."""

    def __init__(self) -> None:
        super().__init__()
        self.num = 16
        self.stem = nn.Conv2d(1, 24, 3, padding=1)  # 16 residual + 8 dense
        self.c1 = nn.Conv2d(24, 20, 1)  # 16 residual + 4 dense
        self.c2 = nn.Conv2d(28, 20, 1)
        self.head = nn.Linear(32, 4)

    def block(self, x, conv):
        y = conv(torch.relu(x))
        return torch.cat([x[:, :self.num] + y[:, :self.num], x[:, self.num:], y[:, self.num:]], dim=1)

    def forward(self, x):
        return self.head(self.block(self.block(self.stem(x), self.c1), self.c2).mean((2, 3)))


def test_slices_at_a_stored_width_and_the_concatenations_after_them_follow_the_pruned_channels():
    """Removing two residual channels and one dense channel of c1: the residual channels go along the whole
    residual path (stem, c1, c2, head), the dense one where the concatenations put it (c2's input 26, and the head's
    input 26 again one block later), the stored width moves to 14, and the pruned model computes what the unpruned
    one does with those channels zeroed."""
    from stages._graph import build_graph
    from stages._structure import prune_group

    torch.manual_seed(0)
    model, ref = _twins(_DualPath)
    x = torch.randn(1, 1, 6, 6)
    with torch.no_grad():
        for conv, rows in ((ref.stem, [1, 5]), (ref.c1, [1, 5, 18]), (ref.c2, [1, 5])):
            conv.weight[rows] = 0
            conv.bias[rows] = 0
        expected = ref(x)
    dg = build_graph(model, x)
    assert prune_group(dg, model.c1, dg.get_pruner_of_module(model.c1).prune_out_channels, [1, 5, 18], model)
    assert model.num == 14 and model.stem.out_channels == 22 and model.c1.out_channels == 17
    assert model.c2.in_channels == 25 and model.c2.out_channels == 18 and model.head.in_features == 29
    with torch.no_grad():
        assert torch.allclose(model(x), expected, atol=1e-5)


class _ChannelsLastGate(nn.Module):
    """A gated block on a channels-last tensor: one Linear's features split by stored sizes along the last
    dimension into a gate, an identity part and a part through a depthwise convolution (channels first and back),
    the gate multiplying the other two concatenated (MambaOut's gated convolution block, written here)."""

    def __init__(self, dim: int = 8, hidden: int = 16, conv: int = 8) -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, dim, 3, padding=1)
        self.fc1 = nn.Linear(dim, 2 * hidden)
        self.split_indices = (hidden, hidden - conv, conv)
        self.conv = nn.Conv2d(conv, conv, 3, padding=1, groups=conv)
        self.fc2 = nn.Linear(hidden, dim)
        self.head = nn.Linear(dim, 4)

    def forward(self, x):
        x = self.stem(x).permute(0, 2, 3, 1)
        g, i, c = torch.split(self.fc1(x), self.split_indices, dim=-1)
        c = self.conv(c.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        x = x + self.fc2(nn.functional.gelu(g) * torch.cat((i, c), dim=-1))
        return self.head(x.mean((1, 2)))


def test_a_channels_last_split_by_stored_sizes_follows_the_pruned_features():
    """A split along the last dimension of a channels-last tensor is the one Torch-Pruning maps as channels: its
    stored sizes follow the features each part loses, a gate channel goes with the channel it multiplies, and
    the pruned model computes what the unpruned one does with those gate channels zeroed (GELU(0) = 0)."""
    from stages._graph import build_graph
    from stages._structure import prune_group

    torch.manual_seed(0)
    model, ref = _twins(_ChannelsLastGate)
    x = torch.randn(1, 1, 6, 6)
    gone = [1, 9, 14]  # gate channels; they take 17 (identity part) and 25, 30 (convolution part) with them
    with torch.no_grad():
        ref.fc1.weight[gone] = 0
        ref.fc1.bias[gone] = 0
        expected = ref(x)
    dg = build_graph(model, x)
    assert prune_group(dg, model.fc1, dg.get_pruner_of_module(model.fc1).prune_out_channels, gone, model)
    assert model.fc1.out_features == 26 and model.split_indices == (13, 7, 6)
    assert model.conv.in_channels == model.conv.out_channels == model.conv.groups == 6
    assert model.fc2.in_features == 13
    with torch.no_grad():
        assert torch.allclose(model(x), expected, atol=1e-5)


def test_a_step_that_breaks_the_model_after_the_proof_passed_holds_the_group_that_breaks_it(monkeypatch):
    """The proof tries one set of units per group; a coupling that fails only for other sets shows when the step
    runs. The step is undone, the group whose removal breaks the model is found on copies of the model before the
    step (the records name the step's own modules, which the undo replaced), held with the reason, and the step
    is taken again without it."""
    import stages._pruner as pruner_mod
    from stages._goals import Plan
    from stages._structure import Proof

    def saw_no_break(*args, **kwargs) -> Proof:
        return Proof({})

    saw_no_break.last_cached = False
    monkeypatch.setattr(pruner_mod, "prove", saw_no_break)
    torch.manual_seed(0)
    model = _LiteralParts().eval()
    pruner = pruner_for("l2", (8, 8), round_to=1)
    removal = pruner.apply(model, Plan(0, share=0.3))
    with torch.no_grad():
        assert model(torch.randn(2, 1, 8, 8)).shape == (2, 4)
    held = {h.root: h for h in pruner.held.values()}
    assert list(held) == ["conv1"], {r: h.reason for r, h in held.items()}
    assert held["conv1"].kind == "breaks forward" and held["conv1"].layers == ["conv1"]
    assert "breaks the model" in held["conv1"].reason
    assert removal.units > 0 and model.conv1.out_channels == 32 and model.stem.out_channels < 16
