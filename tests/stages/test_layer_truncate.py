"""Layer truncation: an identity in disguise goes first; a block that matters is rolled back bit for bit."""

from __future__ import annotations

import logging

import pytest
import torch
from rich.console import Console
from torch import nn
from torch.utils.data import TensorDataset

import stages.layer_truncate as lt
from core._progress import Tracker
from core.context import Context
from core.data import Splits
from core.rundir import RunDir
from pipeline.config import Config
from stages._blocks import find_candidates, measure_blocks
from stages._flows import calibration_pass
from stages._latency import Profile
from stages._recovery import Outcome
from tests.conftest import tiny_config


class Residual(nn.Module):
    """y = x + f(x)."""

    def __init__(self, f: nn.Module) -> None:
        super().__init__()
        self.f = f

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.f(x)


def _conv(c: int, scale: float) -> nn.Conv2d:
    conv = nn.Conv2d(c, c, 3, padding=1, bias=False)
    with torch.no_grad():
        conv.weight.zero_()
        conv.weight[:, :, 1, 1] = scale * torch.eye(c)
    return conv


def make_net() -> nn.Sequential:
    """Class = sign of the input's mean. `zero` adds nothing (an identity in disguise); `flip` maps x to -x,
    and the head expects the flipped signal, so removing `flip` inverts every prediction."""
    torch.manual_seed(0)
    zero = Residual(nn.Sequential(_conv(4, 1.0), nn.ReLU(), _conv(4, 0.0)))
    flip = Residual(_conv(4, -2.0))
    head = nn.Linear(4, 2)
    with torch.no_grad():
        head.weight.copy_(torch.tensor([[1.0] * 4, [-1.0] * 4]))
        head.bias.zero_()
    return nn.Sequential(nn.Conv2d(1, 4, 1), zero, flip, nn.AdaptiveAvgPool2d(1), nn.Flatten(), head)


def make_ctx(net: nn.Sequential, tmp_path, fp: dict | None = None, **cfg) -> Context:
    with torch.no_grad():
        net[0].weight.fill_(1.0)
        net[0].bias.zero_()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 1, 8, 8, generator=g) + torch.where(torch.rand(64, 1, 1, 1, generator=g) > 0.5, 1.0, -1.0)
    y = (x.mean(dim=(1, 2, 3)) > 0).long()  # head on -x: class 0 wins for positive means
    ds = TensorDataset(x, y)
    config = Config.model_validate(tiny_config(
        model={"num_classes": 2, "input_size": [8, 8]}, data={"batch_size": 32, "eval_batch_size": 64},
        layer_truncate={"min_flops_share": 0.0, **cfg}, recovery={"distill_weight": 0.0}, **({"filter_prune": fp}
                                                                                          if fp else {})))
    ctx = Context(config, RunDir(tmp_path), tmp_path, torch.device("cpu"), logging.getLogger("test"),
                  Tracker(Console(), "layer_truncate", False), {"stages": {}})
    ctx._splits = Splits(ds, ds, ds)
    return ctx


def test_zero_residual_block_is_scored_lowest(tmp_path):
    net = make_net().eval()
    ctx = make_ctx(net, tmp_path)
    rows, units = measure_blocks(net)
    calibration_pass(net, ctx, [rows, units])
    blocks, _ = find_candidates(net, rows.result(), units.result(), 0.0)
    scores = {b.name: b.divergence for b in blocks}
    assert set(scores) == {"1", "2"}
    assert scores["1"] == 0.0 and scores["2"] == pytest.approx(2.0, rel=1e-5)


def test_identity_in_disguise_goes_first_and_essential_block_rolls_back(monkeypatch, tmp_path):
    net = make_net().eval()
    ctx = make_ctx(net, tmp_path, max_layers=2, max_accuracy_drop=5.0, recovery_steps=2, recovery_lr=1e-3)
    monkeypatch.setattr(lt, "teacher_and_reference", lambda model, ctx: (None, {}))
    snapshots = []
    real_clone = lt.clone

    def recording_clone(model):
        snapshots.append({k: v.clone() for k, v in model.state_dict().items()})
        return real_clone(model)

    monkeypatch.setattr(lt, "clone", recording_clone)
    result = lt.LayerTruncate().run(net, ctx)
    decisions = result.state["decisions"]
    assert [(d["block"], d["accepted"]) for d in decisions] == [("1", True), ("2", False)]
    assert decisions[0]["top1_after"] == 100.0 and decisions[1]["top1_after"] < 50.0
    assert result.state["removed_blocks"] == ["1"]
    model = result.model
    assert isinstance(model[1], nn.Identity) and isinstance(model[2], Residual)
    final = model.state_dict()
    before_flip_removal = snapshots[-1]
    assert final.keys() == before_flip_removal.keys()
    assert all(torch.equal(final[k], before_flip_removal[k]) for k in final), "rollback must be bit-identical"
    assert result.metrics["stop_reason"] == "no candidate left (the rest are essential)"



class FakeMeter:
    """Reads the models after each removal at the next of `readings` (speedups over the base)."""

    def __init__(self, readings: list[float]) -> None:
        self.readings, self.seconds, self.hits, self.misses = list(readings), 0.0, 0, 0

    def measure(self, model, base):
        s = self.readings.pop(0)
        return Profile(1.0 / s, {}, 0.0), (s, s * 0.95, s * 1.05)


def _under_target(monkeypatch, tmp_path, readings: list[float], start: float = 1.5, **cfg):
    """The stage under a 2x target, starting at `start`x, the removals read at `readings`."""
    net = make_net().eval()
    ctx = make_ctx(net, tmp_path, {"target_speedup": 2.0, "target_flops_reduction": None}, recovery_steps=2,
                   recovery_lr=1e-3, **cfg)
    monkeypatch.setattr(lt, "teacher_and_reference", lambda model, ctx: (None, {}))
    monkeypatch.setattr(lt, "LatencyMeter", lambda *a: None)
    monkeypatch.setattr(lt.LatencyCurrency, "measured", classmethod(
        lambda cls, ctx, model, meter, folder: cls(ctx.config.filter_prune, FakeMeter(readings),
                                                   folder / "base.onnx", Profile(0.5, {"1.f.0": 0.1, "2": 0.1}, 0.3),
                                                   start)))
    return lt.LayerTruncate().run(net, ctx)


def test_a_removal_past_the_speedup_target_that_costs_no_top1_is_kept(monkeypatch, tmp_path):
    # block 1 adds nothing: without it the model is as accurate as before and faster than asked, so it dominates
    # the model the target asked for
    result = _under_target(monkeypatch, tmp_path, [3.0, 3.5], max_layers=2, max_accuracy_drop=5.0)
    first, second = result.state["decisions"]
    assert first["block"] == "1" and first["accepted"] and first["overshoots"] and first["beyond_target"]
    assert second["block"] == "2" and not second["accepted"]  # past the target, and it inverts every prediction
    assert result.state["removed_blocks"] == ["1"] and isinstance(result.model[1], nn.Identity)
    assert "1 took the model past the speedup target (3.00x) and was kept" in result.metrics["stop_reason"]
    assert result.metrics["beyond_target"] == ["1"]  # what the frontier row reads, not the prose


def test_with_the_target_reached_a_block_still_goes_when_it_costs_no_top1(monkeypatch, tmp_path):
    # width pruning reached the target (2.1x for 2x): a MACs target's truncation would still remove blocks, and
    # one whose removal leaves the model no less accurate dominates the model the target asked for
    result = _under_target(monkeypatch, tmp_path, [2.6, 3.0], start=2.1, max_layers=2, max_accuracy_drop=100.0)
    first, second = result.state["decisions"]
    assert first["block"] == "1" and first["accepted"] and first["beyond_target"]
    assert second["block"] == "2" and not second["accepted"] and "beyond_target" not in second
    assert result.state["removed_blocks"] == ["1"]
    stop = result.metrics["stop_reason"]
    assert stop.startswith("the speedup target is reached (2.10x)") and "1 took the model past" in stop


def test_with_the_target_reached_and_no_block_as_accurate_nothing_goes(monkeypatch, tmp_path):
    monkeypatch.setattr(lt, "dominates", lambda before, after: False)  # every removal costs top-1 here
    result = _under_target(monkeypatch, tmp_path, [2.6, 3.0], start=2.1, max_layers=2, max_accuracy_drop=100.0)
    assert [d["accepted"] for d in result.state["decisions"]] == [False, False]
    assert result.state["removed_blocks"] == [] and isinstance(result.model[1], Residual)
    assert result.metrics["stop_reason"] == ("the speedup target is reached (2.10x); no block removal past it was "
                                             "as accurate (no candidate left (the rest are essential))")


def test_a_removal_past_the_speedup_target_that_costs_top1_is_rolled_back(monkeypatch, tmp_path):
    # block 1 goes short of the target; block 2's removal inverts every prediction: within the accuracy budget
    # (100 points) but less accurate than the model it would replace, so the overshoot is not kept
    result = _under_target(monkeypatch, tmp_path, [1.8, 3.0], max_layers=2, max_accuracy_drop=100.0)
    first, second = result.state["decisions"]
    assert first["accepted"] and not first.get("overshoots")
    assert second["block"] == "2" and second["overshoots"] and not second["accepted"]
    assert "beyond_target" not in second and second["top1_after"] < first["top1_after"]
    assert second["past_target"] and not first.get("past_target")
    assert result.state["removed_blocks"] == ["1"] and isinstance(result.model[2], Residual)
    assert "past the speedup target" not in result.metrics["stop_reason"]
    assert result.metrics["beyond_target"] == []  # a rolled-back removal is not one kept beyond the target


def test_a_past_target_removal_is_not_credited_with_its_recovery(monkeypatch, tmp_path):
    # every recovery adds 20 points, block or not (a model width pruning left undertrained); removing block 1 costs
    # one point against the same model recovered alike, so it is less accurate than the model it would replace,
    # though more accurate than that model before the recovery
    def fake_recover(model, ctx, budget, teacher, reference, description, seed, **kw):
        model.recovered = getattr(model, "recovered", 0) + 1
        return model, Outcome()

    def fake_evaluate(model, ctx):
        top1 = 50.0 + 20.0 * getattr(model, "recovered", 0) - 1.0 * isinstance(model[1], nn.Identity) \
            - 30.0 * isinstance(model[2], nn.Identity)
        return {"top1": top1, "top5": 100.0}

    monkeypatch.setattr(lt, "recover", fake_recover)
    monkeypatch.setattr(lt, "evaluate", fake_evaluate)
    result = _under_target(monkeypatch, tmp_path, [3.0, 3.5], max_layers=2, max_accuracy_drop=100.0,
                           past_target_tries=1)
    first, second = result.state["decisions"]
    assert first["block"] == "1" and first["past_target"] and not first["accepted"]
    assert first["top1_after"] == 69.0 and first["top1_without"] == 70.0 and "beyond_target" not in first
    # the block stays, with the recovery its comparison gave the model: the next decision starts from 70 (and a
    # refusal that left the model better does not count against layer_truncate.past_target_tries=1)
    assert second["top1_before"] == 70.0 and not second["accepted"]
    assert result.state["removed_blocks"] == [] and isinstance(result.model[1], Residual)
    assert result.model.recovered == 2 and result.metrics["top1"] == 90.0


def test_dominance_is_no_top1_lost():
    assert lt.dominates({"top1": 90.0, "top5": 99.0}, {"top1": 90.0, "top5": 99.5})
    assert lt.dominates({"top1": 90.0, "top5": 99.6}, {"top1": 91.0, "top5": 99.5})
    assert not lt.dominates({"top1": 90.0, "top5": 99.0}, {"top1": 89.9, "top5": 99.9})


def _harmful_recoveries(monkeypatch) -> list[int]:
    """Every recovery costs half a point and removing block 1 (2) one (thirty): every removal comes back less
    accurate than the model before it, and no control is adopted. Returns the seeds the recoveries were given."""
    seeds: list[int] = []

    def fake_recover(model, ctx, budget, teacher, reference, description, seed, **kw):
        seeds.append(seed)
        model.recovered = getattr(model, "recovered", 0) + 1
        return model, Outcome()

    def fake_evaluate(model, ctx):
        top1 = 50.0 - 0.5 * getattr(model, "recovered", 0) - 1.0 * isinstance(model[1], nn.Identity) \
            - 30.0 * isinstance(model[2], nn.Identity)
        return {"top1": top1, "top5": 100.0}

    monkeypatch.setattr(lt, "recover", fake_recover)
    monkeypatch.setattr(lt, "evaluate", fake_evaluate)
    return seeds


def test_removals_tried_from_the_same_model_share_one_control(monkeypatch, tmp_path):
    # both removals are tried from the same model (the first is rolled back, its control no better): one control,
    # made once, and both removals recovered with its seed, so each is compared with the same model recovered alike
    seeds = _harmful_recoveries(monkeypatch)
    result = _under_target(monkeypatch, tmp_path, [2.6, 3.0], start=2.1, max_layers=2, max_accuracy_drop=100.0)
    first, second = result.state["decisions"]
    assert not first["accepted"] and not second["accepted"]
    assert first["top1_without"] == second["top1_without"] == 49.5
    assert len(seeds) == 3 and len(set(seeds)) == 1  # two removals and one control, all on one seed
    assert result.metrics["top1"] == 50.0 and result.state["removed_blocks"] == []


def test_past_target_tries_bound_the_removals_tried_past_the_target(monkeypatch, tmp_path):
    seeds = _harmful_recoveries(monkeypatch)
    result = _under_target(monkeypatch, tmp_path, [2.6, 3.0], start=2.1, max_layers=2, max_accuracy_drop=100.0,
                           past_target_tries=1)
    assert [d["block"] for d in result.state["decisions"]] == ["1"] and len(seeds) == 2
    stop = result.metrics["stop_reason"]
    assert stop.startswith("the speedup target is reached (2.10x); no block removal past it was as accurate")
    assert "1 removal(s) past the speedup target were less accurate" in stop and "1 candidate(s) not tried" in stop
    assert "left it as it was" in stop
    nothing = _under_target(monkeypatch, tmp_path / "0", [2.6], start=2.1, max_layers=2, past_target_tries=0)
    assert nothing.state["decisions"] == [] and "past_target_tries is 0" in nothing.metrics["stop_reason"]
