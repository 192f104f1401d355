"""The proof's trials run on one working copy of the model, pruned in place and undone after each trial (one deep
copy and one trace for the whole proof): it finds exactly what fresh copies per trial find, leaves the copy as it
was after every trial, and gives way to fresh copies when an undo does not restore the structure."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import stages._structure as S
from stages._graph import build_graph
from stages._pruning import classifier_layers
from tests.integration.test_structures import (
    _ChannelsLastGate,
    _DualPath,
    _GainConv,
    _Grouped,
    _LiteralParts,
    _Parts,
    _StoredSplit,
)
from tests.stages.test_proof_cache import Stored


class _Scaled(nn.Module):
    """A loose per-channel parameter (a layer scale) viewed through a stored shape: Torch-Pruning cuts it by
    replacing its .data, which the undo must put back."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 16, 3, padding=1)
        self.scale = nn.Parameter(torch.ones(16))
        self.shape = (16, 1, 1)
        self.conv2 = nn.Conv2d(16, 8, 1)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        x = self.conv(x) * self.scale.view(self.shape)
        return self.fc(self.conv2(x).mean((2, 3)))


def _res2net() -> nn.Module:
    """timm's Res2Net blocks (splits into equal parts by a stored width, a pool on the last part), four stages."""
    from timm.models.res2net import Bottle2neck
    from timm.models.resnet import ResNet

    return ResNet(block=Bottle2neck, layers=[1, 1, 1, 1], base_width=26, block_args=dict(scale=4), num_classes=4,
                  in_chans=3)


MODELS = {"stored reshape width": (Stored, (3, 8, 8)), "stored split sizes": (_StoredSplit, (1, 6, 6)),
          "equal parts by a stored width": (_Parts, (1, 8, 8)),
          "equal parts by a literal width": (_LiteralParts, (1, 8, 8)),
          "channels-last split by stored sizes": (_ChannelsLastGate, (1, 6, 6)), "layer scale": (_Scaled, (3, 8, 8)),
          "dual paths (slices at a stored width)": (_DualPath, (1, 6, 6)),
          "per-channel gain": (lambda: nn.Sequential(_GainConv(1, 16, 3), nn.ReLU(), _GainConv(16, 8, 1),
                                                     nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4)),
                               (1, 8, 8)),
          "Res2Net blocks": (_res2net, (3, 32, 32)),
          "grouped convolutions (their counts from the bench's own graph)": (_Grouped, (1, 8, 8))}


BREAKS = {"stored reshape width", "equal parts by a literal width"}


def _roots(model: nn.Module, x: torch.Tensor) -> list[str]:
    dg = build_graph(model, x)
    found, _ = dg.groups(model, classifier_layers(model, 4), {})
    return [f[0] for f in found]


@pytest.mark.parametrize("label", list(MODELS))
def test_the_bench_finds_what_fresh_copies_find(label: str, monkeypatch):
    make, shape = MODELS[label]
    torch.manual_seed(0)
    model = make().eval()
    x = torch.randn(1, *shape)
    roots = _roots(model, x)
    fresh_copies = []
    real = S.spread_copy
    monkeypatch.setattr(S, "spread_copy", lambda *a, **k: fresh_copies.append(1) or real(*a, **k))
    fast = S._prove(model, x, roots, build_graph, 600.0, None)
    assert not fresh_copies, "every trial ran on the bench"
    monkeypatch.setattr(S, "_Bench", None)  # not callable: every trial takes a fresh copy, as before the bench
    slow = S._prove(model, x, roots, build_graph, 600.0, None)
    assert fresh_copies and fast == slow
    # where a group's removal breaks the model, the comparison covers failing trials (and their undo); where the
    # widths are followed (stored split sizes, a layer scale's view, a per-channel gain), passing ones
    assert bool(fast) == (label in BREAKS)


def test_an_undo_puts_back_every_shape_value_and_attribute():
    torch.manual_seed(0)
    model = _StoredSplit().eval()
    x = torch.randn(1, 1, 6, 6)
    bench = S._Bench(model, x, build_graph)
    before = {k: v.clone() for k, v in bench.model.state_dict().items()}
    with torch.no_grad():
        y = bench.model(x)
    assert S._trial(model, x, ["a"], build_graph, (1, 4), {}, bench) is None
    assert bench.sound and bench.model.sizes == (12, 4, 4, 4) and bench.model.a.out_channels == 24
    after = bench.model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], v) for k, v in before.items())
    with torch.no_grad():
        assert torch.equal(bench.model(x), y)


def test_an_undo_that_misses_something_hands_the_rest_to_fresh_copies(monkeypatch):
    torch.manual_seed(0)
    model = Stored().eval()
    x = torch.zeros(1, 3, 8, 8)
    undo = S._Bench.undo

    def missing(self) -> None:
        undo(self)
        self.model.conv2.out_channels -= 1  # as if a trial changed something the undo does not reach
        self.sound = S._structure_print(self.modules) == self.print

    monkeypatch.setattr(S._Bench, "undo", missing)
    fresh_copies = []
    real = S.spread_copy
    monkeypatch.setattr(S, "spread_copy", lambda *a, **k: fresh_copies.append(1) or real(*a, **k))
    assert set(S._prove(model, x, ["conv1", "conv2"], build_graph, 600.0, None)) == {"conv1"}
    assert fresh_copies, "after the failed undo, the trials took fresh copies"


def test_an_undo_puts_back_the_graphs_node_of_a_pruned_loose_parameter():
    """Torch-Pruning replaces a pruned loose parameter (a layer scale) with a new one in its graph too: node,
    module-to-node map and parameter names. Undone only in the model, the next trial pruned the stale, already
    pruned parameter again (EdgeNeXt's layer scales went 48 -> 36 in one trial and 48 -> 26 in the next, and the
    proof's verdicts depended on the order of its trials)."""
    torch.manual_seed(0)
    model = _Scaled().eval()
    x = torch.randn(1, 3, 8, 8)
    bench = S._Bench(model, x, build_graph)
    shapes = []
    for _ in range(2):
        S.remove_spread(bench.model, bench.dg, ["conv"], {})
        shapes.append((tuple(bench.model.scale.shape), bench.model.shape, bench.model.conv.out_channels))
        bench.undo()
        param = bench.model.scale
        assert param.shape == (16,) and bench.dg.module2node[param].module is param
        assert bench.dg._param_to_name[param] == "scale"
    assert shapes[0] == shapes[1] and shapes[0][0][0] < 16
