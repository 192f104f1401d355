"""Pruning steps: the schedule, aligned widths, per-layer caps, one dependency graph per step."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from stages._goals import capped_fraction, step_fraction
from stages._pruning import GroupRecord, plan_step


def _records(widths: dict[str, int], seed: int = 0) -> list[GroupRecord]:
    g = torch.Generator().manual_seed(seed)
    return [GroupRecord(n, nn.Identity(), None, w, torch.rand(w, generator=g) + 0.5) for n, w in widths.items()]


def test_schedule_matches_method():
    assert step_fraction(0.05, 1.5, 0, 10) == pytest.approx(0.05)
    assert step_fraction(0.05, 1.5, 5, 10) == pytest.approx(0.05 * 1.5**1.5)
    # the last step is shrunk so MACs land on the target instead of overshooting
    assert capped_fraction(0.2, 1.0, 0.9) == pytest.approx(1 - 0.9**0.5)
    assert capped_fraction(0.05, 1.0, 0.5) == 0.05


@pytest.mark.parametrize("ranking", ["global", "per_layer"])
def test_plan_keeps_widths_aligned(ranking: str):
    recs = _records({"a": 64, "b": 128, "c": 36, "d": 256})
    plan = plan_step(recs, {r.name: r.width for r in recs}, 0.3, 8, 0.9, ranking, 0.7)
    assert plan, "something must be pruned"
    for r in recs:
        left = r.width - len(plan.get(r.name, []))
        assert left % 8 == 0 and left >= 8
        assert len(set(plan.get(r.name, []))) == len(plan.get(r.name, []))
    if ranking == "global":
        removed = sum(len(v) for v in plan.values())
        want = 0.3 * sum(r.width for r in recs)
        assert want <= removed < want + 8


def test_global_plan_takes_lowest_scores_first():
    recs = _records({"a": 64, "b": 64})
    recs[0].scores = torch.full((64,), 0.1)  # layer a is weak everywhere
    plan = plan_step(recs, {"a": 64, "b": 64}, 0.2, 8, 0.9, "global", 0.8)
    assert set(plan) == {"a"}


def test_plan_respects_max_layer_ratio():
    recs = _records({"a": 64, "b": 64})
    recs[0].scores = torch.full((64,), 1e-6)
    plan = plan_step(recs, {"a": 64, "b": 64}, 0.9, 8, 0.5, "global", 0.1)
    assert 64 - len(plan["a"]) >= 32
