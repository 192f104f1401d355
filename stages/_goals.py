"""What filter_prune prunes towards: a share of the MACs, or a measured speedup on the runtime that ships.

The loop (stages/filter_prune.py) reads as its algorithm: `plan = goal.plan(step)`, `removal =
pruner.apply(model, plan)`, `measured = goal.measure(model, plan, removal)`, `decision = goal.judge(plan, removal,
measured)`; a decision that asks for a retake undoes the step and tries its corrected plan, and an accepted one goes,
with the accuracy after recovery, into the stage's one decision log (`StepRecord`), which the checkpoint, the log
lines, the report and summary.json all read. Plans, removals, measurements and decisions are frozen dataclasses; the
goals share the `Goal` protocol. Nothing measures in a constructor: the caller times the base model with the meter it
passes in (`goal_for`).

The speedup goal closes the loop: after a step the model is exported and timed against the base model in
interleaved blocks. By default (`steering: planned`) the steps are planned on the latency model alone and the
readings say only how far the target still is and when it is reached; with `steering: readings` the latency
model's misprediction so far also corrects every step's budget (`Drift`) and each layer's unit costs (`LayerFit`).
"""

from __future__ import annotations

import dataclasses
import math
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from torch import nn

from core.models import count_macs
from stages._latency import CONTENDED_RETRIES, FIRM_TIMING, STEP_TIMING, Drift, LatencyMeter, LayerFit, Profile


def step_fraction(p0: float, alpha: float, t: int, steps: int) -> float:
    """p_t = p0 * (1 + t/T)^alpha: the share of the remaining units removed at step t."""
    return min(p0 * (1.0 + t / steps) ** alpha, 0.95)


def capped_fraction(p: float, gflops: float, target: float) -> float:
    """Shrink the last step so that MACs land near the target (MACs scale about as width squared)."""
    if gflops * (1.0 - p) ** 2 >= target:
        return p
    return max(1.0 - math.sqrt(target / gflops), 1e-3)


@dataclass(frozen=True)
class Plan:
    """What one attempt at pruning step `step` (0-based) asks of the pruner: a share of the remaining units (MACs
    goal), or a latency budget for the knapsack (speedup goal: `budget_ms` is `wanted_ms` corrected by the drift,
    unit costs come from `profile`, each layer's corrected by `scale`; `cap` is the most of any layer's current
    width the step may remove, see STEP_CAP; `macs_cap` the most of the model's current MACs, see STEP_MACS).
    `attempt` counts retakes; `why` says why this one was needed."""

    step: int
    share: float = 0.0
    budget_ms: float | None = None
    wanted_ms: float = 0.0
    profile: Profile | None = None
    scale: dict[str, float] | None = None
    attempt: int = 1
    why: str = ""
    cap: float | None = None
    macs_cap: float | None = None


@dataclass(frozen=True)
class Removal:
    """What the pruner removed: units, and for a budgeted step the latency it predicted they save, in all and per
    layer (uncorrected: the corrections learn from it)."""

    units: int
    predicted_ms: float | None = None
    predicted_layers: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class Measurement:
    """Where a step landed: MACs always; for the speedup goal the speedup over the base model with its spread, and
    whether it was timed (an untimed step is taken to land where the corrected latency model says). A timing after
    untimed steps measures them too (`*_since`, `steps_since`)."""

    gflops: float
    timed: bool = False
    profile: Profile | None = None
    speedup: float = 1.0
    low: float = 1.0
    high: float = 1.0
    latency_ms: float | None = None
    predicted_ms: float | None = None
    measured_ms: float | None = None
    predicted_since_ms: float | None = None
    measured_since_ms: float | None = None
    steps_since: int = 1
    contended: str | None = None

    def latency_fields(self) -> dict[str, Any]:
        """The measurement as the decision log's row carries it (nothing for a MACs goal)."""
        if self.latency_ms is None:
            return {}
        row = {"predicted_ms": self.predicted_ms, "measured_ms": self.measured_ms, "latency_ms": self.latency_ms,
               "speedup": self.speedup, "speedup_low": self.low, "speedup_high": self.high, "timed": self.timed}
        if self.contended:
            row["contended"] = self.contended
        if self.timed and self.steps_since > 1:  # this timing measured the untimed steps before it too
            row.update(predicted_since_ms=self.predicted_since_ms, measured_since_ms=self.measured_since_ms,
                       steps_since=self.steps_since)
        return row


@dataclass(frozen=True)
class Decision:
    """A goal's verdict on one attempt: keep it (`retake` is None), or undo it and take `retake` instead."""

    plan: Plan
    removal: Removal
    measured: Measurement | None = None
    retake: Plan | None = None


class Goal(Protocol):
    """What filter_prune prunes towards; MacsGoal and SpeedupGoal."""

    name: str

    def reached(self) -> bool: ...

    def advance(self) -> bool: ...

    def plan(self, step: int) -> Plan: ...

    def measure(self, model: nn.Module, plan: Plan, removal: Removal) -> Measurement: ...

    def judge(self, plan: Plan, removal: Removal, measured: Measurement) -> Decision: ...

    def accept(self, decision: Decision) -> None: ...

    def undo(self) -> None: ...

    def progress(self) -> float: ...

    def reached_because(self) -> str: ...

    def describe(self) -> str: ...

    def record(self, steps: list[Measurement]) -> dict[str, Any]: ...


class Points:
    """The targets a trajectory stops at, in order (one, or a frontier's points): the goal aims at the current one
    as a single-target run would, and `advance` moves it to the next once it is reached."""

    def __init__(self, cfg) -> None:
        self.points, self.index = cfg.points(), 0

    @property
    def value(self) -> float:
        return self.points[self.index]

    def advance(self) -> bool:
        """Aim at the next point; False when this was the last."""
        if self.index + 1 >= len(self.points):
            return False
        self.index += 1
        return True


class MacsGoal:
    """Remove `target_flops_reduction` of the MACs (each frontier point's share in turn)."""

    name = "flops_reduction"

    def __init__(self, cfg, spec, gflops0: float) -> None:
        self.cfg, self.spec = cfg, spec
        self.gflops0 = self.gflops = gflops0
        self.points = Points(cfg)
        self._before: list[float] = []

    @property
    def reduction(self) -> float:
        return self.points.value

    @property
    def target(self) -> float:
        return self.gflops0 * (1.0 - self.reduction)

    def reached(self) -> bool:
        return self.gflops <= self.target * (1.0 + self.cfg.flops_tolerance)

    def advance(self) -> bool:
        return self.points.advance()

    def plan(self, step: int) -> Plan:
        p = step_fraction(self.cfg.p0, self.cfg.alpha, step, self.cfg.steps)
        return Plan(step, share=capped_fraction(p, self.gflops, self.target))

    def measure(self, model: nn.Module, plan: Plan, removal: Removal) -> Measurement:
        return Measurement(count_macs(model, self.spec)[0])

    def judge(self, plan: Plan, removal: Removal, measured: Measurement) -> Decision:
        return Decision(plan, removal, measured)  # the MACs a step removes are known before it is taken

    def accept(self, decision: Decision) -> None:
        self._before.append(self.gflops)
        self.gflops = decision.measured.gflops

    def undo(self) -> None:
        self.gflops = self._before.pop()

    def progress(self) -> float:
        return (1.0 - self.gflops / self.gflops0) / self.reduction

    def reached_because(self) -> str:
        return "reached the FLOPs target"  # MACs are counted, not timed: no caveat

    def describe(self) -> str:
        return f"target -{self.reduction:.0%} MACs"

    def record(self, steps: list[Measurement]) -> dict[str, Any]:
        return {}


RETRIES = 3  # attempts per step when a step saves far more latency than it asked for


def _summed(a: dict[str, float], b: dict[str, float]) -> dict[str, float]:
    """Per-layer milliseconds added up."""
    return {layer: a.get(layer, 0.0) + b.get(layer, 0.0) for layer in a.keys() | b.keys()}

# A step may go untimed while the latency it is predicted to leave is at least this many times the target's
# (and the step before it was timed): far from the target, where a step lands only sets the next budget, and the
# next timing measures both steps against the latency model's prediction for both.
UNTIMED_FAR = 1.5
# A timed speedup more than this many times the MACs ratio is taken again before the stage may stop on it:
# memory footprint and fixed per-op costs move latency away from MACs, but not this far
# in one honest reading (a contended run stopped at "19.30x" for 1.22x fewer MACs).
PLAUSIBLE = 2.0
# A budgeted step removes at most this many times the MACs schedule's share p_t of any layer's current width.
# The budget is corrected by readings (Drift, LayerFit), and on a sub-millisecond model one noisy reading can
# shrink the predicted cost of a unit tenfold: a demo step after one read as 0.91x asked the knapsack for a
# budget it could not meet, which then took everything the caps allowed (2480 units, 98.3% of the MACs, 12
# points of top-1 lost, and the trajectory ended). Three times the schedule leaves room for models whose latency
# falls more slowly than their MACs, and no single reading can make a step collapse the model.
STEP_CAP = 3.0
# And the whole step removes at most this many times the MACs the schedule's step would (1-(1-p_t)^2 of the current
# MACs). The per-layer cap bounds where a step cuts, not how much: on a sub-millisecond model the readings swing
# (0.97x after a step that removed 9% of the MACs), the drift and the spread floor inflate the next budget, and the
# knapsack took every layer to its cap: 408 units, -23% of the MACs in one step of the short-recovery demo, where
# 4 recovery steps cannot bring the network back (top-1 53 at 3.8x; the recipe's schedule, 96 at the same speed).
# 1.5 times the schedule still allows 99.8% of the MACs in 20 steps for a model whose latency falls slowly.
STEP_MACS = 1.5


def _caps(p: float) -> dict[str, float]:
    """A budgeted step's bounds for the schedule's share p: per layer (STEP_CAP) and over the model (STEP_MACS)."""
    return {"cap": min(STEP_CAP * p, 0.95), "macs_cap": min(STEP_MACS * (1.0 - (1.0 - p) ** 2), 0.95)}


def _less(profile: Profile, removal: Removal) -> Profile:
    """The latency model's account after a removal: each layer less what it was predicted to save, and the total
    less their sum (what no layer holds, `other_ms`, stays)."""
    layers = {layer: max(ms - removal.predicted_layers.get(layer, 0.0), 0.0) for layer, ms in profile.layers.items()}
    saved = sum(profile.layers.values()) - sum(layers.values())
    return Profile(max(profile.total_ms - saved, profile.other_ms, 1e-9), layers, profile.other_ms)


@dataclass(frozen=True)
class Anchor:
    """The last timed model (its latency and profile) and what the untimed steps since were predicted to save."""

    ms: float
    profile: Profile
    predicted_ms: float = 0.0
    layers: dict[str, float] = field(default_factory=dict)
    steps: int = 0


class SpeedupGoal:
    """Reach `target_speedup` over the base model, measured on the validation runtime at its batch size, with the
    meter passed in; `base` is the base model's profile, timed from its ONNX file at `base_path`."""

    name = "speedup"

    def __init__(self, cfg, spec, meter: LatencyMeter, base: Profile, base_path: Path | None, gflops0: float) -> None:
        self.cfg, self.spec, self.meter = cfg, spec, meter
        self.base, self.base_path, self.gflops0 = base, base_path, gflops0
        self.retimed: list[dict[str, Any]] = []  # timings taken again before the stage could stop on them
        self.profile: Profile = base
        self.speedup, self.low, self.high = 1.0, 1.0, 1.0
        self.drift = Drift()
        self.fit = LayerFit()
        self.layers_before = dict(base.layers)
        self.anchor = Anchor(base.total_ms, base)
        self.planned: Profile = base  # the latency model's own account of the model: the base less every prediction
        self.last: Measurement | None = None  # the last accepted step's measurement
        self._before: list[tuple] = []  # the state before each accepted step, for undo
        self.folder: tempfile.TemporaryDirectory | None = None  # holds base_path when goal_for made it
        self.points = Points(cfg)

    @property
    def target_speedup(self) -> float:
        return self.points.value

    def advance(self) -> bool:
        return self.points.advance()

    @property
    def target_ms(self) -> float:
        return self.base.total_ms / self.target_speedup

    @property
    def current_ms(self) -> float:
        return self.base.total_ms / self.speedup

    def _reaches(self, speedup: float) -> bool:
        return speedup >= self.target_speedup * (1.0 - self.cfg.speedup_tolerance)

    def reached(self) -> bool:
        return self._reaches(self.speedup)

    def _beyond(self, low: float) -> bool:
        """The low end of a timing's spread past the target's tolerance: the step overshot."""
        return low > self.target_speedup * (1.0 + self.cfg.speedup_tolerance)

    def _confirm(self, speedup: float, low: float, attempt: int) -> bool:
        """Whether a short timing must be repeated at length: it appears to reach the target, and the step could
        stand on it (the stage may stop there). A step clearly beyond the target is retaken smaller instead, so
        timing it longer would buy nothing, unless it is the last attempt, which stands whatever it measured
        (on a sub-millisecond model with a latency cliff, confirming every overshoot cost 10 long timings, 19 s,
        in one digits run)."""
        return self._reaches(speedup) and (not self._beyond(low) or attempt >= RETRIES)

    def spread_ms(self, low: float, high: float) -> float:
        """How far apart the latencies a measurement cannot tell apart are: the width of its spread in ms."""
        return max(self.base.total_ms * (1.0 / low - 1.0 / high), 0.0) if low > 0 and high > 0 else 0.0

    def plan(self, step: int) -> Plan:
        if self.cfg.steering == "planned":
            return self._planned(step)
        # The share of the latency a MACs-targeted step of the same schedule removes (it cuts p of the units, and a
        # layer loses about 1-(1-p)^2 of its work as both its widths shrink), so both goals take equal steps; and
        # never less than the last measurement could resolve, or the loop would steer by timing noise (on a
        # sub-millisecond model a few units' saving is within it).
        p = step_fraction(self.cfg.p0, self.cfg.alpha, step, self.cfg.steps)
        scheduled = max((1.0 - (1.0 - p) ** 2) * self.current_ms, self.spread_ms(self.low, self.high))
        remaining = self.current_ms - self.target_ms
        # the last step aims at the target itself; every step's budget is corrected by the model's drift so far
        wanted = max(min(scheduled, remaining), 0.0)
        return Plan(step, budget_ms=wanted / self.drift.factor, wanted_ms=wanted, profile=self.profile,
                    scale=self.fit.factors(self.profile), **_caps(p))

    def _planned(self, step: int) -> Plan:
        """The step as the latency model alone plans it: the schedule's share of the latency the model predicts
        for the current network (the base's profile less what every accepted step was predicted to save), costed on
        that same profile, uncorrected. Nothing a timing read enters it but how much is left: the last reading's
        milliseconds still above the target, over the model's misprediction so far (`Drift`), bound the step (the
        last step aims at the target), and an even share of them over the steps left is its least size (a run
        behind the schedule still reaches the target in its steps). While the schedule is the larger, a run
        prunes the same units at every step whatever its timings read, until the one that reaches the target.
        Steered by the readings instead (`steering: readings`), the short-recovery benchmark's seed 0 kept 95.2
        top-1 in one run and 71.6 in the next with the same code: each step's budget followed that run's noise,
        and with 4 recovery steps the budgets decided which layers collapsed."""
        p = step_fraction(self.cfg.p0, self.cfg.alpha, step, self.cfg.steps)
        left = max(self.current_ms - self.target_ms, 0.0)  # measured ms still above the target
        needed = left / self.drift.factor  # in the account's milliseconds
        # never less than an even share of what is left over the steps left, so that a model whose latency falls
        # more slowly than the account says still reaches the target in its steps (the demo at 2 threads: 3.4x of
        # 4x after 20 schedule-sized steps); on the short-recovery demo the schedule is the larger until the end
        size = max((1.0 - (1.0 - p) ** 2) * self.planned.total_ms, needed / max(self.cfg.steps - step, 1))
        budget = min(size, needed)
        return Plan(step, budget_ms=budget, wanted_ms=budget * self.drift.factor, profile=self.planned, **_caps(p))

    def measure(self, model: nn.Module, plan: Plan, removal: Removal) -> Measurement:
        """Time the model as a step left it (latency does not depend on the weights: before recovery), briefly: a
        step only needs to know where it landed to within the step's size. A step that appears to reach the target
        is timed again for longer, so that the stage does not stop on a lucky reading; one taken on a busy machine
        or implausibly far beyond the MACs ratio is taken again fresh (`_doubt`). A step far from the target after
        a timed one is not timed (UNTIMED_FAR): it is taken to land where the corrected latency model says."""
        gflops = count_macs(model, self.spec)[0]
        predicted = removal.predicted_ms
        if predicted and self._may_go_untimed(plan, predicted):
            return self._estimate(gflops, removal)
        profile, (speedup, low, high) = self.meter.measure(
            model, self.base_path, STEP_TIMING, lambda s, lo: self._confirm(s, lo, plan.attempt))
        doubt = self._doubt(gflops, profile, speedup)
        if doubt:  # a reading that would stop the stage must stand on a clean, plausible timing: take it again
            self.retimed.append({"step": plan.step + 1, "speedup": speedup, "why": doubt})
            profile, (speedup, low, high) = self.meter.measure(model, self.base_path, FIRM_TIMING, fresh=True)
        now = self.base.total_ms / speedup
        return Measurement(gflops, True, profile, speedup, low, high, now, predicted, self.current_ms - now,
                           self.anchor.predicted_ms + (predicted or 0.0), self.anchor.ms - now,
                           self.anchor.steps + 1, profile.contended)

    def _doubt(self, gflops: float, profile: Profile, speedup: float) -> str | None:
        """Why a timing that reaches the target (the stage may stop on it) must be taken again: it was taken on a
        busy machine, or it is more than PLAUSIBLE times the MACs ratio. None otherwise. (A speedup far below the
        MACs ratio is common on small models, where fixed per-op costs dominate, and cannot stop the stage early:
        it is not re-timed.)"""
        if not self._reaches(speedup):
            return None
        if profile.contended:
            return f"taken on a busy machine ({profile.contended})"
        macs_ratio = self.gflops0 / max(gflops, 1e-12)
        if speedup > PLAUSIBLE * macs_ratio:
            return f"{speedup:.2f}x measured for {macs_ratio:.2f}x fewer MACs is implausible"
        return None

    def _may_go_untimed(self, plan: Plan, predicted_ms: float) -> bool:
        """Far from the target, neither the first step nor the last, and the step before was timed."""
        if self.last is None or plan.step >= self.cfg.steps - 1 or not self.last.timed:
            return False
        return self.current_ms - predicted_ms * self.drift.factor >= UNTIMED_FAR * self.target_ms

    def _estimate(self, gflops: float, removal: Removal) -> Measurement:
        """Where an untimed step is taken to land: each layer loses its prediction corrected by LayerFit and the
        drift so far (the profile the next step's costs come from); the end-to-end latency loses their sum."""
        factors, drift, layers = self.fit.factors(self.profile), self.drift.factor, removal.predicted_layers
        after = {layer: max(ms - layers.get(layer, 0.0) * factors.get(layer, 1.0) * drift, 0.0)
                 for layer, ms in self.profile.layers.items()}
        total = max(self.current_ms - (sum(self.profile.layers.values()) - sum(after.values())), 1e-9)
        speedup = self.base.total_ms / total
        return Measurement(gflops, False, Profile(total, after, self.profile.other_ms), speedup, speedup, speedup,
                           total, removal.predicted_ms)

    def judge(self, plan: Plan, removal: Removal, measured: Measurement) -> Decision:
        """Learn from a timed step (the drift and the per-layer fit, against the saving measured since the last
        timed model and what every step since was predicted to save), then keep it, or retake it with a corrected
        budget when it saved far more than it asked for: beyond the target's tolerance, or (`steering: readings`
        only: a planned step's size is the schedule's, not a reading's) twice the step's budget and 5% of the
        latency. The retake's budget is scaled by this attempt's own misprediction."""
        if measured.timed and removal.predicted_ms:
            self.drift.add(measured.predicted_since_ms, measured.measured_since_ms, plan.step + 1)
            self.fit.add(self.anchor.profile, measured.profile, _summed(self.anchor.layers, removal.predicted_layers))
        keep = Decision(plan, removal, measured)
        if plan.attempt >= RETRIES or not measured.timed or not removal.predicted_ms or measured.measured_ms <= 0:
            return keep
        # only what the measurement can tell from its own noise: the spread's low end beyond the target, or an
        # excess wider than the spread (a timing that merely wobbles is not a step to undo)
        excess = measured.measured_ms - plan.wanted_ms
        too_big = (self.cfg.steering == "readings" and measured.measured_ms > 2.0 * plan.wanted_ms
                   and excess > 0.05 * self.current_ms and excess > self.spread_ms(measured.low, measured.high))
        if not (self._beyond(measured.low) or too_big):
            return keep
        ratio = measured.measured_ms / removal.predicted_ms
        retake = dataclasses.replace(plan, budget_ms=plan.wanted_ms / ratio, attempt=plan.attempt + 1,
                                     why=f"saved {measured.measured_ms:.3g} ms of {plan.wanted_ms:.3g} ms wanted "
                                         f"({measured.speedup:.2f}x)")
        return dataclasses.replace(keep, retake=retake)

    def accept(self, decision: Decision) -> None:
        m = decision.measured
        self._before.append((self.profile, self.anchor, self.speedup, self.low, self.high, self.last, self.planned))
        self.planned = _less(self.planned, decision.removal)
        self.profile, self.speedup, self.low, self.high, self.last = m.profile, m.speedup, m.low, m.high, m
        if m.timed:
            self.anchor = Anchor(self.current_ms, self.profile)
        else:
            a = self.anchor
            self.anchor = Anchor(a.ms, a.profile, a.predicted_ms + m.predicted_ms,
                                 _summed(a.layers, decision.removal.predicted_layers), a.steps + 1)

    def undo(self) -> None:
        self.profile, self.anchor, self.speedup, self.low, self.high, self.last, self.planned = self._before.pop()

    def progress(self) -> float:
        return (1.0 - 1.0 / self.speedup) / (1.0 - 1.0 / self.target_speedup)

    def reached_because(self) -> str:
        """The stop on the last timing, with what it must say when that timing was taken on a busy machine."""
        why = self.last.contended if self.last else None
        return "reached the speedup target" + (
            f"; the timing it stands on was taken while the machine was busy and stayed so after "
            f"{CONTENDED_RETRIES} retries ({why}): the speedup is uncertain, re-run on an idle machine" if why else "")

    def describe(self) -> str:
        return f"latency {self.current_ms:.3g} ms, {self.speedup:.2f}x (target {self.target_speedup:g}x)"

    def record(self, steps: list[Measurement]) -> dict[str, Any]:
        """The latency record of the accepted steps (`steps`, in order, from the stage's decision log)."""
        rows = [m.latency_fields() for m in steps]
        return {"runtime": self.meter.runtime, "device": self.meter.device, "threads": self.meter.threads,
                "base_ms": self.base.total_ms, "target_ms": self.target_ms, "speedup": self.speedup,
                "speedup_low": self.low, "speedup_high": self.high, "steps": rows,
                "speedup_timed": rows[-1]["timed"] if rows else True,
                "untimed_steps": sum(not s["timed"] for s in rows),
                "layers_before": self.layers_before, "layers_after": dict(self.profile.layers),
                "other_ms_before": self.base.other_ms, "other_ms_after": self.profile.other_ms,
                "measure_seconds": round(self.meter.seconds, 2), "confirmations": self.meter.confirmations,
                "cache_hits": self.meter.hits,
                "cache_misses": self.meter.misses, "contended_timings": self.meter.contended,
                "retaken_busy": self.meter.retaken, "retimed": self.retimed, "drift": self.drift.factor,
                "layer_fit": round(self.fit.overall(), 3)}


def goal_for(ctx, model: nn.Module, meter: LatencyMeter | None) -> Goal:
    """The goal of `filter_prune`'s configuration for `model`; for a speedup target the base model is exported and
    timed here, with `meter` (a LatencyMeter for the deployment target)."""
    cfg, spec = ctx.config.filter_prune, ctx.config.model
    gflops0 = count_macs(model, spec)[0]
    if not cfg.target_speedup:
        return MacsGoal(cfg, spec, gflops0)
    tmp = tempfile.TemporaryDirectory()
    base_path = Path(tmp.name) / "base.onnx"
    goal = SpeedupGoal(cfg, spec, meter, meter.measure(model, save_as=base_path)[0], base_path, gflops0)
    goal.folder = tmp  # the base model's file lives as long as the goal
    return goal
