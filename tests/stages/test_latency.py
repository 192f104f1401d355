"""Latency-targeted pruning: the knapsack, the latency model's mapping and cache, the closed loop's stop reasons."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from export.onnx_names import node_owners
from pipeline.config import Config
from stages._latency import Drift, LatencyMeter, LayerFit, Profile, best_alignment, unit_costs
from stages._pruning import GroupRecord, plan_latency_step
from tests.conftest import pruner_for, tiny_config


def _record(name: str, scores: list[float], unit_ms: float) -> tuple[GroupRecord, float]:
    return GroupRecord(name, nn.Identity(), None, len(scores), torch.tensor(scores)), unit_ms


def test_knapsack_finds_the_known_optimum():
    """Three layers of 16 channels in chunks of 8 (a layer's chunks go weakest first). A 10 ms budget is met by
    a1 + b1 (10 ms, importance 4.96), b1 + c1 + c2 (10 ms, 6.4) or a1 + c1 (12 ms, 1.76): the optimum loses the
    least importance, a1 + c1, although a greedy by importance per millisecond takes c1 first and then needs more."""
    a = _record("a", [0.12] * 8 + [5.0] * 8, 1.0)   # chunk costs 8 ms; importance 0.96 then 40
    b = _record("b", [0.5] * 8 + [0.6] * 8, 0.25)   # 2 ms each; importance 4.0 then 4.8
    c = _record("c", [0.1] * 8 + [0.2] * 8, 0.5)    # 4 ms each; importance 0.8 then 1.6
    records = [r for r, _ in (a, b, c)]
    unit_ms = {r.name: ms for r, ms in (a, b, c)}
    plan = plan_latency_step(records, {}, 10.0, 8, 0.9, unit_ms)
    assert {k: len(v) for k, v in plan.items()} == {"a": 8, "c": 8}
    assert sorted(plan["a"]) == list(range(8)) and sorted(plan["c"]) == list(range(8)), "the weakest chunks go"
    # a budget within one cheap chunk takes the cheapest importance that covers it
    assert {k: len(v) for k, v in plan_latency_step(records, {}, 3.5, 8, 0.9, unit_ms).items()} == {"c": 8}


def test_knapsack_takes_everything_the_caps_allow_when_the_budget_is_out_of_reach():
    r, ms = _record("a", [1.0] * 32, 1.0)
    plan = plan_latency_step([r], {"a": 32}, 1000.0, 8, 0.5, {"a": ms})  # at most half of the width may go
    assert len(plan["a"]) == 16


def test_a_step_cap_bounds_what_an_unmeetable_budget_takes_from_each_layer():
    """A budget the latency model says cannot be met (one noisy reading shrank every unit's cost) takes what the
    caps allow; the step cap keeps that to its share of each layer's current width, and a narrow layer still
    loses one aligned chunk."""
    wide, ms = _record("wide", [1.0] * 256, 0.001)
    narrow, _ = _record("narrow", [1.0] * 16, 0.001)
    unit_ms = {"wide": ms, "narrow": ms}
    uncapped = plan_latency_step([wide, narrow], {}, 1000.0, 8, 0.9, unit_ms)
    assert {k: len(v) for k, v in uncapped.items()} == {"wide": 224, "narrow": 8}, "everything the 90% cap allows"
    capped = plan_latency_step([wide, narrow], {}, 1000.0, 8, 0.9, unit_ms, cap=0.15)
    assert {k: len(v) for k, v in capped.items()} == {"wide": 32, "narrow": 8}, "15% of 256 is 38: 4 chunks"
    # a budget within the cap is planned as before
    assert plan_latency_step([wide], {}, 0.016, 8, 0.9, unit_ms, cap=0.15) == \
        plan_latency_step([wide], {}, 0.016, 8, 0.9, unit_ms)


def test_a_speedup_step_is_capped_at_a_multiple_of_the_macs_schedule():
    from stages._goals import STEP_CAP, SpeedupGoal, step_fraction

    cfg = Config.model_validate(tiny_config(filter_prune={"target_speedup": 2.0, "target_flops_reduction": None}))
    goal = SpeedupGoal(cfg.filter_prune, cfg.model, None, Profile(1.0, {"c": 0.9}, 0.1), None, 1.0)
    for t in (0, 10, 19):
        expected = min(STEP_CAP * step_fraction(cfg.filter_prune.p0, cfg.filter_prune.alpha, t, cfg.filter_prune.steps),
                       0.95)
        assert goal.plan(t).cap == pytest.approx(expected)


def test_a_step_removes_at_most_its_share_of_the_macs_whatever_the_budget():
    """A budget inflated by noisy readings takes what the per-layer caps allow from every layer; the MACs bound
    scales the budget down until the step's MACs fit, and the plan is then the knapsack's for the smaller budget
    (the cheapest units per millisecond still go first)."""
    wide, ms = _record("wide", [float(i + 1) for i in range(256)], 0.001)
    narrow, _ = _record("narrow", [1.0] * 64, 0.004)
    unit_ms = {"wide": ms, "narrow": 0.004}
    unit_macs = {"wide": 10.0, "narrow": 10.0}
    total = 10.0 * (256 + 64)
    free = plan_latency_step([wide, narrow], {}, 1000.0, 8, 0.9, unit_ms, cap=0.5)
    assert sum(map(len, free.values())) == 128 + 32, "the per-layer caps alone: half of every layer"
    bounded = plan_latency_step([wide, narrow], {}, 1000.0, 8, 0.9, unit_ms, cap=0.5, unit_macs=unit_macs,
                                max_macs=0.15 * total)
    removed = sum(len(idx) * unit_macs[name] for name, idx in bounded.items())
    assert 0 < removed <= 0.15 * total
    assert len(bounded["narrow"]) == 32, "the narrow layer's units save 4x the milliseconds at the same importance"
    # a budget whose plan fits is planned as without the bound
    small = plan_latency_step([wide, narrow], {}, 0.05, 8, 0.9, unit_ms, cap=0.5)
    assert plan_latency_step([wide, narrow], {}, 0.05, 8, 0.9, unit_ms, cap=0.5, unit_macs=unit_macs,
                             max_macs=0.15 * total) == small


def test_a_layer_cut_deeper_than_the_model_weighs_more():
    """Scores are normalised over the units a layer has left, so a layer cut to a quarter of its width shows the
    same scores as an untouched one; at the same milliseconds per unit the knapsack takes the untouched layer's
    units, and the narrow layer's only when its milliseconds are worth more than (model keep / layer keep) **
    KEEP_POWER. Layers cut alike weigh as their scores say."""
    from stages._pruning import KEEP_POWER

    cut, _ = _record("cut", [1.0] * 32, 0.01)
    whole, _ = _record("whole", [1.0] * 128, 0.01)
    originals = {"cut": 128, "whole": 128}
    plan = plan_latency_step([cut, whole], originals, 0.08, 8, 0.9, {"cut": 0.01, "whole": 0.01})
    assert {k: len(v) for k, v in plan.items()} == {"whole": 8}
    deeper = (160 / 256) / (32 / 128)  # the model keeps 160 of 256 units, the cut layer 32 of 128
    dear = 1.01 * deeper ** KEEP_POWER * 0.01  # the cut layer's units now save more than their extra weight
    plan = plan_latency_step([cut, whole], originals, 8 * dear, 8, 0.9, {"cut": dear, "whole": 0.01})
    assert {k: len(v) for k, v in plan.items()} == {"cut": 8}
    # both cut to a quarter: no layer is deeper than the model, the lower scores go first
    low, _ = _record("low", [0.5] * 32, 0.01)
    plan = plan_latency_step([cut, low], originals | {"low": 128}, 0.08, 8, 0.9, {"cut": 0.01, "low": 0.01})
    assert {k: len(v) for k, v in plan.items()} == {"low": 8}


def test_a_speedup_step_bounds_its_macs_at_a_multiple_of_the_schedules():
    from stages._goals import STEP_MACS, SpeedupGoal, step_fraction

    cfg = Config.model_validate(tiny_config(filter_prune={"target_speedup": 2.0, "target_flops_reduction": None}))
    goal = SpeedupGoal(cfg.filter_prune, cfg.model, None, Profile(1.0, {"c": 0.9}, 0.1), None, 1.0)
    for t in (0, 10, 19):
        p = step_fraction(cfg.filter_prune.p0, cfg.filter_prune.alpha, t, cfg.filter_prune.steps)
        assert goal.plan(t).macs_cap == pytest.approx(min(STEP_MACS * (1 - (1 - p) ** 2), 0.95))


def test_unit_cost_charges_each_member_its_share_of_width():
    from stages._latency import Profile

    prof = Profile(10.0, {"conv1": 4.0, "conv2": 2.0}, 4.0)
    assert unit_costs(prof, {"conv1": (64, 1), "conv2": (32, 1)}) == pytest.approx(4 / 64 + 2 / 32)
    assert unit_costs(prof, {"conv1": (64, 16)}) == pytest.approx(1.0)  # a head of 16 features


def test_units_weigh_the_work_they_do_so_a_narrow_layer_is_not_stripped_for_its_milliseconds_per_channel():
    """Flat scores (every unit 1 after per-layer normalisation): a 64-wide layer at high resolution has more
    milliseconds per channel than a 512-wide one, so counted per unit the knapsack strips it, though each of its
    channels is a larger share of the model's work; weighed by the MACs a unit carries, it takes the wide layer's
    units, whose milliseconds are dearer per MAC."""
    from stages._pruning import work_per_unit

    narrow = GroupRecord("narrow", nn.Identity(), None, 64, torch.ones(64), members={"n.conv": (64, 1)})
    wide = GroupRecord("wide", nn.Identity(), None, 512, torch.ones(512), members={"w.conv": (512, 1)})
    # same MACs per layer; the wide layer's time is 1.25x its share of the MACs (slow per MAC)
    unit_ms = {"narrow": 0.8 / 64, "wide": 1.0 / 512}
    budget = 8 * 0.8 / 64  # one chunk of the narrow layer
    assert set(plan_latency_step([narrow, wide], {}, budget, 8, 0.9, unit_ms)) == {"narrow"}, "per unit"
    weights = work_per_unit([narrow, wide], {"n.conv": 1e6, "w.conv": 1e6})
    assert weights["narrow"] == pytest.approx(8 * weights["wide"])
    plan = plan_latency_step([narrow, wide], {}, budget, 8, 0.9, unit_ms, weights=weights)
    assert set(plan) == {"wide"} and len(plan["wide"]) == 56, "7 chunks of 8: 0.109 ms, the first to reach 0.1"


def test_layer_fit_corrects_each_layer_by_what_its_removals_saved():
    """A layer that saved half its predicted milliseconds (a fixed kernel cost, or both its widths cut in one
    step) is charged about half next time; a layer never cut takes the ratio of all layers measured so far."""
    fit = LayerFit()
    before = Profile(10.0, {"a": 4.0, "b": 4.0, "c": 2.0}, 0.0)
    after = Profile(7.0, {"a": 2.0, "b": 3.0, "c": 2.0}, 0.0)
    fit.add(before, after, {"a": 2.0, "b": 2.0})  # a saved all its 2 ms predicted; b 1 of its 2
    factors = fit.factors(after)
    assert fit.overall() == pytest.approx(0.75)
    assert factors["c"] == pytest.approx(0.75), "not measured: the overall ratio"
    assert factors["b"] < 0.6 < 0.95 < factors["a"] <= 1.0, factors  # shrunk a little towards the overall ratio
    assert unit_costs(after, {"a": (10, 1), "b": (10, 1)}, factors) == pytest.approx(
        0.2 * factors["a"] + 0.3 * factors["b"])
    assert LayerFit().factors(after) == {"a": 1.0, "b": 1.0, "c": 1.0}, "nothing measured: the model as it is"


def _meter(tmp_path: Path, monkeypatch, **validate) -> LatencyMeter:
    """A meter with its own cache, on a machine taken to be quiet: a contended timing is retaken and never cached,
    so on a busy test machine the cache counts these tests check would vary (the contention test sets its own)."""
    from stages import _latency

    monkeypatch.setenv("COMPRESS_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(_latency, "contention", lambda load, threads: None)
    cfg = Config.model_validate(tiny_config(model={"source": "timm", "name": "resnet18", "num_classes": 4,
                                                   "in_chans": 1, "input_size": [32, 32]},
                                            validate={"threads": 1, **validate}))
    return LatencyMeter(cfg, runs=5, warmup=1)


def test_profile_maps_fused_nodes_to_their_layers_and_is_cached(tmp_path: Path, monkeypatch):
    import timm

    meter = _meter(tmp_path, monkeypatch)
    model = timm.create_model("resnet18", num_classes=4, in_chans=1).eval()
    first = meter.measure(model)[0]
    convs = {n for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))}
    assert set(first.layers) <= convs and len(first.layers) >= len(convs) - 2, set(convs) - set(first.layers)
    assert abs(sum(first.layers.values()) + first.other_ms - first.total_ms) < 1e-6 * max(first.total_ms, 1)
    assert meter.misses == 1 and meter.hits == 0
    second = meter.measure(model)[0]
    assert meter.hits == 1 and second.layers == first.layers, "the same graph on the same machine: from the cache"
    assert len(list((tmp_path / "cache" / "latency").glob("*.json"))) == 1


class _Mixer(nn.Module):
    """Token mixing with linear layers on 3-d input (exported as MatMul + Add, which ONNX Runtime fuses into a
    renamed Gemm node) and a scaled matmul (fused into FusedMatMul)."""

    def __init__(self, dim: int = 128) -> None:
        super().__init__()
        self.embed = nn.Conv2d(1, dim, 2, 2)  # 256 tokens of a 32x32 input
        self.fc1, self.fc2, self.head = nn.Linear(dim, 4 * dim), nn.Linear(4 * dim, dim), nn.Linear(dim, 4)

    def forward(self, x):
        t = self.embed(x).flatten(2).transpose(1, 2)
        t = t + self.fc2(torch.relu(self.fc1(t)))
        t = torch.softmax(t @ t.transpose(1, 2) / 8.0, -1) @ t
        return self.head(t.mean(1))


def test_profile_charges_renamed_fused_nodes_to_their_layers(tmp_path: Path, monkeypatch):
    """ONNX Runtime renames what it fuses ("/fc1/MatMul/MatMulAddFusion"): those nodes still belong to fc1. When
    they did not, a transformer's layers carried 4% of its time and the first step's budget removed all it could."""
    meter = _meter(tmp_path, monkeypatch)
    profile = meter.measure(_Mixer().eval())[0]
    assert {"fc1", "fc2", "embed"} <= set(profile.layers)
    # the two linear layers carry about half the time (the token matmuls belong to no layer: fixed cost)
    assert profile.layers["fc1"] + profile.layers["fc2"] > 0.3 * profile.total_ms, profile


def _speedup_goal(speedup: float = 1.0, low: float = 1.0, high: float = 1.0, meter=None, **fp):
    """A SpeedupGoal on a 10 ms base model (two layers of 5 ms), target 2x, at the given last reading."""
    from stages._goals import SpeedupGoal

    cfg = Config.model_validate({**tiny_config(), "filter_prune": {"target_speedup": 2.0, **fp}})
    goal = SpeedupGoal(cfg.filter_prune, cfg.model, meter, Profile(10.0, {"a": 5.0, "b": 5.0}, 0.0), None, 1.0)
    goal.speedup, goal.low, goal.high = speedup, low, high
    return goal


def _judged(goal, plan, predicted: float, measured: float, speedup: float, low: float, high: float):
    from stages._goals import Measurement, Removal

    return goal.judge(plan, Removal(8, predicted), Measurement(1.0, True, Profile(10.0 / speedup, {}, 0.0), speedup,
                                                               low, high, 10.0 / speedup, predicted, measured,
                                                               predicted, measured))


def test_a_step_that_saves_far_more_than_asked_is_retaken_with_a_corrected_budget():
    from stages._goals import RETRIES, Plan

    goal = _speedup_goal()
    plan = Plan(0, budget_ms=1.5, wanted_ms=1.5)
    # predicted 1.5 ms, saved 7.5 ms (4x): beyond the target -> the budget shrinks by the measured ratio (5x)
    again = _judged(goal, plan, 1.5, 7.5, 4.0, 3.9, 4.1).retake
    assert again is not None and again.attempt == 2 and again.budget_ms == pytest.approx(0.3)
    assert "saved 7.5 ms of 1.5 ms wanted" in again.why
    assert _judged(goal, plan, 1.5, 1.8, 1.22, 1.2, 1.24).retake is None, "close enough"
    assert _judged(goal, Plan(0, budget_ms=1.5, wanted_ms=1.5, attempt=RETRIES), 1.5, 7.5, 4.0, 3.9,
                   4.1).retake is None, "the last attempt stands"


def test_a_saving_within_the_timing_noise_is_not_retaken_and_steps_are_not_smaller_than_the_noise():
    """On a sub-millisecond model a few units' saving is within the timing noise: a step that seems to save four
    times its budget, while the measurement's spread is wider than the excess, is kept (retaking it would steer by
    noise), and the next step asks for at least what a measurement can resolve."""
    from stages._goals import Plan

    goal = _speedup_goal(steering="readings")
    plan = Plan(0, budget_ms=0.2, wanted_ms=0.2)
    # 10 ms base: 1.09x measured (0.8 ms saved of 0.2 wanted), but the spread 1.0-1.2x spans 1.7 ms
    assert _judged(goal, plan, 0.2, 0.8, 1.087, 1.0, 1.2).retake is None
    assert _judged(goal, plan, 0.2, 0.8, 1.087, 1.08, 1.095).retake is not None, "measured tightly: retaken"
    goal.speedup, goal.low, goal.high = 1.087, 1.0, 1.2
    step = goal.plan(0)  # schedule: 1-(1-0.05)^2 = 9.75% of 9.2 ms = 0.9 ms; the spread: 1.67 ms
    assert step.wanted_ms == pytest.approx(10.0 * (1 / 1.0 - 1 / 1.2))
    goal.low, goal.high = 1.08, 1.095
    assert goal.plan(0).wanted_ms == pytest.approx((1 - 0.95 ** 2) * 10.0 / 1.087), "a tight spread: the schedule"


def test_planned_steps_prune_the_same_units_whatever_the_readings():
    """Under `steering: planned` a step's budget and its units' costs come from the latency model alone (the base's
    profile less what earlier steps were predicted to save): two runs whose timings read differently plan the same
    steps until the target bounds one, and then aim at the target as each run's readings say."""
    from stages._goals import Measurement, Removal

    runs = [_speedup_goal(steps=10), _speedup_goal(steps=10)]  # base 10 ms, target 2x: 5 ms
    plans: list[list] = [[], []]
    for t in range(3):
        for i, goal in enumerate(runs):
            plan = goal.plan(t)
            plans[i].append(plan)
            saved = (0.7, 1.6)[i] * plan.budget_ms  # the readings: one run's steps save less than predicted, one more
            now = goal.current_ms - saved
            removal = Removal(4, plan.budget_ms, {"a": plan.budget_ms})
            measured = Measurement(1.0, True, Profile(now, {"a": 5.0 - saved, "b": 5.0}, 0.0), 10.0 / now,
                                   10.0 / now * 0.99, 10.0 / now * 1.01, now, plan.budget_ms, saved,
                                   plan.budget_ms, saved)
            goal.accept(goal.judge(plan, removal, measured))
    for a, b in zip(*plans, strict=True):
        assert a.budget_ms == pytest.approx(b.budget_ms) and a.profile == b.profile and a.scale is None
    assert runs[0].planned.layers == pytest.approx(runs[1].planned.layers)
    assert runs[0].planned.total_ms == pytest.approx(10.0 - sum(p.budget_ms for p in plans[0]))
    # near the target the readings say how much is left: 0.3 ms above it, and this run's steps saved 1.6x their
    # prediction so far (against one pseudo-step at 1)
    goal = runs[1]
    goal.speedup = 10.0 / 5.3
    last = goal.plan(3)
    assert last.budget_ms == pytest.approx(0.3 / goal.drift.factor) and last.wanted_ms == pytest.approx(0.3)
    assert last.budget_ms < runs[0].plan(3).budget_ms


def test_a_planned_step_behind_the_schedule_takes_an_even_share_of_what_is_left():
    """A model whose latency falls more slowly than the account says is behind: with 2 of 10 steps left and 4.9 ms
    still above the target (drift 1), a step asks for at least half of it, more than the schedule's share."""
    from stages._goals import step_fraction

    goal = _speedup_goal(steps=10)  # base 10 ms, target 2x: 5 ms
    goal.speedup = 10.0 / 9.9
    p = step_fraction(goal.cfg.p0, goal.cfg.alpha, 8, 10)
    assert (1 - (1 - p) ** 2) * 10.0 < 2.45
    assert goal.plan(8).budget_ms == pytest.approx(2.45)
    assert goal.plan(9).budget_ms == pytest.approx(4.9), "the last step: all that is left"
    assert goal.plan(0).budget_ms == pytest.approx((1 - 0.95 ** 2) * 10.0), "early on the schedule is larger"


def test_planned_steps_are_not_retaken_for_saving_more_than_asked_short_of_the_target():
    """A planned step far from the target that saves more than its budget is kept (its size is the schedule's, not a
    reading's); one that overshoots the target is still retaken smaller."""
    from stages._goals import Plan

    goal = _speedup_goal()  # steering: planned (the default)
    assert goal.cfg.steering == "planned"
    plan = Plan(0, budget_ms=0.2, wanted_ms=0.2)
    assert _judged(goal, plan, 0.2, 0.8, 1.087, 1.08, 1.095).retake is None
    assert _judged(goal, plan, 0.2, 7.5, 4.0, 3.9, 4.1).retake is not None, "beyond the target"


class _ScriptedMeter:
    """Stands in for LatencyMeter.measure: returns the next (latency ms, per-layer ms) it was given, and counts."""

    runtime, device, threads, seconds, confirmations, hits, misses, contended, retaken = ("x", "y", 1, 0, 0, 0, 0,
                                                                                         0, 0)

    def __init__(self, base_ms: float, readings: list[tuple[float, dict[str, float]]]) -> None:
        self.base_ms, self.readings, self.calls = base_ms, list(readings), 0

    def measure(self, model, base, timing, confirm=None, save_as=None):
        self.calls += 1
        total, layers = self.readings.pop(0)
        s = self.base_ms / total
        return Profile(total, layers, total - sum(layers.values())), (s, s * 0.99, s * 1.01)


def test_a_step_far_from_the_target_after_a_timed_one_is_not_timed_and_the_next_timing_covers_both():
    """Far from the target a step's landing only sets the next budget: every other step there goes untimed (no
    export, no timing), taken to land where the corrected model says, and the next timing charges the drift and
    the per-layer fit with both steps' predictions. The first step, steps near the target and the last step are
    always timed."""
    from stages._goals import UNTIMED_FAR, Plan, Removal

    meter = _ScriptedMeter(10.0, [(9.0, {"a": 4.0, "b": 5.0}), (8.0, {"a": 3.5, "b": 4.5}),
                                  (6.0, {"a": 3.0, "b": 3.0})])
    goal = _speedup_goal(meter=meter, steps=10)  # base 10 ms, target 2x: 5 ms
    log = []

    def step(t: int, predicted: tuple[float, dict[str, float]]) -> dict:
        plan, removal = Plan(t, budget_ms=predicted[0]), Removal(4, *predicted)
        decision = goal.judge(plan, removal, goal.measure(nn.Conv2d(1, 4, 1), plan, removal))
        goal.accept(decision)
        log.append(decision.measured)
        return decision.measured.latency_fields()

    first = step(0, (1.0, {"a": 1.0}))
    assert first["timed"] and meter.calls == 1, "the first step is timed"
    assert 9.0 - 0.5 >= UNTIMED_FAR * goal.target_ms
    second = step(1, (0.5, {"b": 0.5}))
    assert not second["timed"] and meter.calls == 1, "far from the target after a timed step: not timed"
    assert second["measured_ms"] is None and second["latency_ms"] == pytest.approx(8.5), "lands where predicted"
    third = step(2, (0.5, {"a": 0.5}))
    assert third["timed"] and meter.calls == 2, "the step after an untimed one is timed"
    assert third["steps_since"] == 2 and third["predicted_since_ms"] == pytest.approx(1.0)
    assert third["measured_since_ms"] == pytest.approx(1.0), "9 ms -> 8 ms over both steps"
    assert goal.drift.history[-1]["predicted_ms"] == pytest.approx(1.0)
    assert goal.fit.predicted == pytest.approx({"a": 1.5, "b": 0.5}), "both steps' per-layer predictions"
    assert goal.fit.measured == pytest.approx({"a": 1.5, "b": 0.5})  # 5 -> 3.5 and 5 -> 4.5 ms
    assert goal._may_go_untimed(Plan(5), 0.1), "8 ms, a small step: far"
    assert not goal._may_go_untimed(Plan(goal.cfg.steps - 1), 0.1), "the last step is timed"
    near = step(3, (2.0, {"a": 1.0, "b": 1.0}))  # 8 ms, leaving about 6 ms < 7.5: near the target
    assert near["timed"] and meter.calls == 3
    assert [s["timed"] for s in goal.record(log)["steps"]] == [True, False, True, True]
    goal.undo()
    assert goal.speedup == pytest.approx(10.0 / 8.0) and goal.last.timed, "undo restores the step before"


def test_a_short_timing_clearly_beyond_the_target_is_not_timed_again_unless_it_is_the_last_attempt():
    """A step that overshoots the target is retaken smaller: timing it longer first buys nothing. One that reaches
    it within the tolerance may stop the stage, and so does the last attempt whatever it measured: both are
    confirmed at length."""
    from stages._goals import RETRIES, Plan

    goal = _speedup_goal()  # target 2x, tolerance 3%
    assert goal._confirm(2.01, 1.98, 1), "reaches the target: the stage may stop on it"
    assert not goal._confirm(1.9, 1.85, 1), "short of the target"
    assert not goal._confirm(2.6, 2.5, 1), "clearly beyond: retaken smaller, not confirmed"
    assert goal._confirm(2.6, 2.0, 1), "the spread reaches back within the tolerance: it may stand"
    assert goal._confirm(2.6, 2.5, RETRIES), "the last attempt stands on what it measures"
    again = _judged(goal, Plan(0, budget_ms=1.0, wanted_ms=1.0), 1.0, 6.0, 2.5, 2.4, 2.6).retake
    assert again.attempt == 2, "the retake counts the attempt"


def test_node_owners_follow_fused_ops_back_to_their_conv(tmp_path: Path):
    import timm

    from export.config import ExportConfig
    from export.torch2onnx import torch2onnx

    model = timm.create_model("resnet18", num_classes=4).eval()
    path = tmp_path / "m.onnx"
    torch2onnx(model, torch.zeros(1, 3, 32, 32), path, ExportConfig(dynamic_batch=False), {})
    owners = node_owners(path, {n for n, _ in model.named_modules()})
    # a Relu (later fused into its Conv) and an Add + Relu after conv2 belong to the convs that feed them
    assert owners["/layer1/layer1.0/act1/Relu_output_0"] == "layer1.0.conv1"
    assert owners["/layer1/layer1.0/act2/Relu_output_0"] == "layer1.0.conv2"
    assert owners["/fc/Gemm"] == "fc"


def test_alignment_is_measured_once_per_machine(tmp_path: Path, monkeypatch):
    meter = _meter(tmp_path, monkeypatch)
    first = best_alignment(meter, size=8)
    assert first in (8, 16, 32) and meter.misses == 1
    assert best_alignment(meter, size=8) == first and meter.hits == 1


def test_an_unreachable_speedup_stops_with_the_reason_in_the_summary(tmp_path: Path, monkeypatch):
    from tests.conftest import run_cli, write_config

    monkeypatch.setenv("COMPRESS_CACHE_DIR", str(tmp_path / "cache"))
    cfg = tiny_config(filter_prune={"target_flops_reduction": None, "target_speedup": 50.0, "steps": 3,
                                    "p0": 0.5, "recovery_steps": 1, "max_layer_pruning_ratio": 0.3,
                                    "max_accuracy_drop": 100.0},
                      layer_truncate={"max_layers": 0}, finetune={"max_epochs": 0})
    run = tmp_path / "run"
    done = run_cli("pipeline", str(write_config(tmp_path / "c.yaml", cfg)), "--run-dir", str(run),
                   env={"COMPRESS_CACHE_DIR": str(tmp_path / "cache")})
    assert done.returncode == 0, done.stderr[-2000:]
    s = json.loads((run / "summary.json").read_text())
    target = s["targets"]["speedup"]
    assert target["requested"] == 50.0 and target["met"] is False
    assert ("cannot be reached" in target["stop_reason"]
            or target["stop_reason"] == "took all 3 steps (filter_prune.steps)")
    assert "WARNING target speedup 50 was NOT met" in (run / "log.txt").read_text()


def test_a_short_timing_that_appears_to_reach_the_target_is_timed_again_on_the_same_export(tmp_path: Path,
                                                                                          monkeypatch):
    """The loop's check is short; only a step that appears to reach the target pays for the longer timing, on
    the file already exported (one export per step), and both timings are cached apart."""
    import timm

    from stages._latency import FIRM_TIMING, STEP_TIMING

    meter = _meter(tmp_path, monkeypatch)
    base, model = (timm.create_model("resnet18", num_classes=4, in_chans=1).eval() for _ in range(2))
    base_path = tmp_path / "base.onnx"
    meter.measure(base, save_as=base_path)
    assert base_path.is_file()
    exports = []
    real_export = meter.export
    monkeypatch.setattr(meter, "export", lambda m, p: (exports.append(p), real_export(m, p)))
    seen = []
    _, short = meter.measure(model, base_path, STEP_TIMING, lambda s, low: seen.append(s) or False)
    assert meter.confirmations == 0 and len(seen) == 1 and short[0] == seen[0]
    misses = meter.misses
    _, firm = meter.measure(model, base_path, STEP_TIMING, lambda s, low: True)
    assert meter.confirmations == 1 and len(exports) == 2, "one export per call, the firm timing on the same file"
    assert meter.misses == misses + 1 and meter.hits >= 2, "the short timing and profile from the cache, the firm new"
    assert STEP_TIMING != FIRM_TIMING and firm[1] <= firm[0] <= firm[2]


def test_measurements_are_keyed_by_the_graph_not_the_weights(tmp_path: Path, monkeypatch):
    """Recovery fine-tuning changes the weights, not the latency: the same widths hit the cache (layer_truncate
    starts on what filter_prune's last step measured); a narrower layer is a new graph."""
    import timm

    from stages._latency import graph_digest

    meter = _meter(tmp_path, monkeypatch)
    model = timm.create_model("resnet18", num_classes=4, in_chans=1).eval()

    def train_a_little():  # every tensor distinct, as after training (the exporter merges equal initializers)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.01 * torch.randn_like(p))

    train_a_little()
    meter.measure(model)[0]
    train_a_little()
    meter.measure(model)[0]
    assert (meter.misses, meter.hits) == (1, 1)
    a, b = tmp_path / "a.onnx", tmp_path / "b.onnx"
    meter.export(model, a)
    model.fc = nn.Linear(model.fc.in_features, 3)
    meter.export(model, b)
    assert graph_digest(a.read_bytes()) != graph_digest(b.read_bytes())


def test_one_step_that_saves_nothing_does_not_swing_the_next_budget_tenfold():
    """Drift starts from the latency model's word; consistent readings move it all the way."""
    d = Drift()
    d.add(0.05, 0.0, 1)
    assert 0.4 < d.factor < 0.6
    for step in range(2, 12):
        d.add(0.05, 0.1, step)
    assert d.factor > 1.7


def test_a_step_read_as_slower_than_before_counts_as_saving_nothing():
    """A negative reading (timing noise on a sub-millisecond model) is not a reason to make the next step ten times
    larger: it moves the budget as a step that saved nothing does."""
    slower, none = Drift(), Drift()
    slower.add(0.05, -0.04, 1)
    none.add(0.05, 0.0, 1)
    assert slower.factor == none.factor and 0.4 < slower.factor < 0.6
    assert slower.history[0]["measured_raw_ms"] == -0.04


def test_alternating_timing_noise_does_not_inflate_the_drift():
    """A model that saves what was predicted, read with noise that alternates (a fast reading, then a slow one,
    then a clean one): the savings measured step to step are +0.07, -0.08, +0.12, -0.08, ... ms for 0.02 ms
    predicted each. Their sum is the base minus the last reading, so the factor is 1; clipped step by step they
    read 2.7x."""
    d = Drift()
    noise = [0.05, -0.05] * 5 + [0.0]
    previous = 0.0
    for step, n in enumerate(noise, 1):
        d.add(0.02, 0.02 + n - previous, step)
        previous = n
    assert d.factor == pytest.approx(1.0)
    assert max(h["measured_ms"] for h in d.history) == pytest.approx(0.12)  # each step's own saving, recorded
    assert min(h["measured_ms"] for h in d.history) == 0.0


def test_a_contended_measurement_is_retaken_then_neither_cached_nor_reused(tmp_path: Path, monkeypatch):
    """Others holding the timing cores (simulated): the measurement is taken again, and when it never comes out
    clean it is returned with its caveat and not cached, so that no later run reads it as a figure."""
    import timm

    import stages._latency as L

    meter = _meter(tmp_path, monkeypatch)
    model = timm.create_model("resnet18", num_classes=4, in_chans=1).eval()
    calls = []
    monkeypatch.setattr(L, "contention", lambda load, threads: calls.append(1) or "others kept 2.0 cores busy")
    busy = meter.measure(model)[0]
    assert busy.contended == "others kept 2.0 cores busy"
    assert len(calls) == 1 + L.CONTENDED_RETRIES and meter.retaken == L.CONTENDED_RETRIES and meter.contended == 1
    assert not list((tmp_path / "cache" / "latency").glob("*.json")), "a contended figure must not be cached"
    monkeypatch.setattr(L, "contention", lambda load, threads: None)  # the machine is quiet again
    quiet = meter.measure(model)[0]
    assert quiet.contended is None and meter.hits == 0, "taken again, not read back"
    entries = list((tmp_path / "cache" / "latency").glob("*.json"))
    assert len(entries) == 1
    entry = json.loads(entries[0].read_text())
    assert entry["version"] == L.CACHE_VERSION and entry["contended"] is None and "other_cores" in entry["machine"]
    # an entry of another version (or one that says it was contended) is never read as a measurement
    for poisoned in ({**entry, "version": L.CACHE_VERSION - 1}, {**entry, "contended": "busy"}):
        entries[0].write_text(json.dumps(poisoned))
        hits = meter.hits
        meter.measure(model)[0]
        assert meter.hits == hits
    meter.measure(model)[0]
    assert meter.hits == 1


def test_a_stop_on_an_implausible_or_contended_timing_is_timed_again(tmp_path: Path, monkeypatch):
    """A step that reaches the target on a reading far beyond what its MACs allow is re-timed fresh before the
    stage may stop on it; one that stays contended carries its caveat into the stop reason."""
    from types import SimpleNamespace

    import timm

    import stages._goals as G
    from stages._latency import FIRM_TIMING, Profile

    monkeypatch.setenv("COMPRESS_CACHE_DIR", str(tmp_path / "cache"))
    cfg = Config.model_validate(tiny_config(filter_prune={"target_speedup": 1.5, "target_flops_reduction": None}))
    model = timm.create_model("resnet18", num_classes=4, in_chans=1).eval()
    readings = []

    class FakeMeter:
        runtime, device, threads, seconds, confirmations, hits, misses, contended, retaken = ("x", "y", 1, 0, 0, 0,
                                                                                               0, 0, 0)

        def __init__(self, config, target=None):
            pass

        def measure(self, m, base=None, timing=None, confirm=None, save_as=None, fresh=False):
            readings.append((timing, fresh))
            if base is None:
                return Profile(1.0, {}, 1.0), (1.0, 1.0, 1.0)
            # the first reading is poisoned (19x for a model whose MACs did not change); the fresh one is honest
            return (Profile(1.0 / 19.3, {}, 0.05), (19.3, 19.0, 19.6)) if not fresh else \
                (Profile(1.0, {}, 1.0, contended="others kept 1.9 cores busy"), (1.01, 0.99, 1.02))

    goal = G.goal_for(SimpleNamespace(config=cfg), model, FakeMeter(cfg))
    plan = G.Plan(0)
    measured = goal.measure(model, plan, G.Removal(0))
    assert readings[-1] == (FIRM_TIMING, True), "re-timed fresh at length"
    assert measured.speedup == pytest.approx(1.01) and goal.retimed[0]["speedup"] == 19.3
    assert "implausible" in goal.retimed[0]["why"]
    goal.accept(goal.judge(plan, G.Removal(0), measured))
    assert not goal.reached()
    assert "busy" in goal.reached_because() and goal.record([measured])["retimed"] == goal.retimed


@pytest.mark.parametrize("weight", ["work", "none"])
def test_latency_weight_chooses_what_the_knapsack_weighs_a_units_score_by(weight: str, monkeypatch):
    """`filter_prune.latency_weight`: the MACs a unit carries (work), or nothing (none: importance per millisecond
    alone, HALP's ranking); the step still removes units and the model still runs."""
    import stages._pruner as pruner_mod
    from stages._goals import Plan

    seen = []
    real = pruner_mod.plan_latency_step

    def spy(*args, **kwargs):
        seen.append(kwargs.get("weights"))
        return real(*args, **kwargs)

    monkeypatch.setattr(pruner_mod, "plan_latency_step", spy)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 64, 3, stride=2), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 4)).eval()
    pruner = pruner_for("l2", (16, 16), latency_weight=weight, target_speedup=2.0, target_flops_reduction=None)
    profile = Profile(1.0, {"0": 0.4, "2": 0.5, "6": 0.01}, 0.09)
    removal = pruner.apply(model, Plan(0, budget_ms=0.2, wanted_ms=0.2, profile=profile, cap=0.5))
    assert removal.units > 0 and model(torch.randn(1, 1, 16, 16)).shape == (1, 4)
    assert len(seen) == 1
    if weight == "work":
        assert set(seen[0]) == {"0", "2"} and seen[0]["0"] != seen[0]["2"]
    else:
        assert seen[0] is None
