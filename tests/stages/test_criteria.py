"""Importance criteria: every registered one scores every group; divergence sees where signal leaves a layer."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from core.config import ModelConfig
from core.models import build_model
from stages._criteria import CRITERIA, accumulate_gradients
from stages._flows import collect_unit_stats
from stages._graph import build_graph
from stages._pruning import classifier_layers, score_groups

SPEC = ModelConfig(source="timm", name="resnet18", num_classes=4, in_chans=1, input_size=(32, 32))


def fake_ctx(n: int = 32) -> SimpleNamespace:
    g = torch.Generator().manual_seed(0)
    ds = TensorDataset(torch.randn(n, 1, 32, 32, generator=g), torch.randint(0, 4, (n,), generator=g))
    return SimpleNamespace(device=torch.device("cpu"), config=SimpleNamespace(calibrate=SimpleNamespace(batch_size=16)),
                           loader=lambda split, batch_size=16, **k: DataLoader(ds, batch_size=batch_size),
                           track=lambda items, desc, total=None: items)


def _scores(model, name: str) -> dict[str, torch.Tensor]:
    ctx = fake_ctx()
    crit = CRITERIA.get(name)()
    stats = collect_unit_stats(model, ctx) if crit.needs_stats else None
    if crit.needs_grad:
        accumulate_gradients(model, ctx)
    crit.prepare(model, ctx, stats)
    dg = build_graph(model, torch.zeros(1, 1, 32, 32))
    found, _ = dg.groups(model, classifier_layers(model, 4), {})
    return {r.name: r.scores for r in score_groups(found, model, crit)}


@pytest.mark.parametrize("name", CRITERIA.names())
def test_every_criterion_scores_every_group(name: str):
    torch.manual_seed(0)
    model = build_model(SPEC).eval()
    scores = _scores(model, name)
    assert "layer1.0.conv1" in scores and "fc" not in scores, "classifier outputs are never scored"
    assert len(scores["layer1.0.conv1"]) == model.layer1[0].conv1.out_channels
    for s in scores.values():
        assert torch.isfinite(s).all() and (s >= 0).all()


def test_divergence_ranks_a_channel_killed_after_batchnorm_lowest():
    torch.manual_seed(0)
    model = build_model(SPEC).eval()
    bn = model.layer1[0].bn1
    with torch.no_grad():  # channel 5 is silenced after BN + ReLU; its raw conv output is untouched
        bn.weight[5], bn.bias[5] = 0.0, -1.0
    div = _scores(model, "divergence")["layer1.0.conv1"]
    pub = _scores(model, "divergence_published")["layer1.0.conv1"]
    assert div.argmin().item() == 5 and div[5] == 0
    assert pub[5] > pub.min(), "the published pre-BN form cannot see the dead channel"


def test_divergence_scores_are_normalised_per_layer():
    torch.manual_seed(0)
    model = build_model(SPEC).eval()
    for s in _scores(model, "divergence").values():
        assert s.mean().item() == pytest.approx(1.0, rel=1e-4)


def test_a_criterion_that_miscounts_a_groups_units_leaves_it_unscored():
    """A score vector of another length than the group's units would prune the wrong channels: never used."""
    torch.manual_seed(0)
    model = build_model(SPEC).eval()
    dg = build_graph(model, torch.zeros(1, 1, 32, 32))
    found, _ = dg.groups(model, classifier_layers(model, 4), {})

    def short(group):  # one score too few for layer1.0.conv1 only
        n = len(group[0].idxs)
        return torch.ones(n - 1 if group[0].dep.target.module is model.layer1[0].conv1 else n)

    unscored: list[tuple[str, str]] = []
    names = {r.name for r in score_groups(found, model, short, unscored)}
    assert "layer1.0.conv1" not in names and "layer1.1.conv1" in names
    assert unscored == [("layer1.0.conv1", "the criterion gave 63 scores for its 64 units")]
