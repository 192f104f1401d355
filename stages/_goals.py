"""What filter_prune prunes towards: a share of the MACs, or a measured speedup on the runtime that ships.

A goal says whether it is reached, how much the next step should remove (a share of the units, or a latency
budget in milliseconds for the knapsack), and takes the measurement after each step. The speedup goal closes
the loop: after every step the current model is exported and timed against the base model in interleaved
blocks, and the latency model's misprediction so far corrects the next step's budget (`Drift`).
"""

from __future__ import annotations

import math
import tempfile
from pathlib import Path
from typing import Any

from torch import nn

from pipeline.models import count_macs
from stages._latency import CONTENDED_RETRIES, FIRM_TIMING, STEP_TIMING, Drift, LatencyMeter, LayerFit, Profile


def step_fraction(p0: float, alpha: float, t: int, steps: int) -> float:
    """p_t = p0 * (1 + t/T)^alpha: the share of the remaining units removed at step t."""
    return min(p0 * (1.0 + t / steps) ** alpha, 0.95)


def capped_fraction(p: float, gflops: float, target: float) -> float:
    """Shrink the last step so that MACs land near the target (MACs scale about as width squared)."""
    if gflops * (1.0 - p) ** 2 >= target:
        return p
    return max(1.0 - math.sqrt(target / gflops), 1e-3)


class MacsGoal:
    """Remove `target_flops_reduction` of the MACs."""

    name = "flops_reduction"

    def __init__(self, ctx, model: nn.Module) -> None:
        self.cfg, self.spec = ctx.config.filter_prune, ctx.config.model
        self.gflops0 = count_macs(model, self.spec)[0]
        self.gflops = self.gflops0
        self.target = self.gflops0 * (1.0 - self.cfg.target_flops_reduction)

    def reached(self) -> bool:
        return self.gflops <= self.target * (1.0 + self.cfg.flops_tolerance)

    def step(self, t: int) -> dict[str, Any]:
        return {"p": capped_fraction(step_fraction(self.cfg.p0, self.cfg.alpha, t, self.cfg.steps), self.gflops,
                                     self.target)}

    def attempt(self, model: nn.Module, predicted: tuple[float, dict[str, float]] | None) -> dict[str, Any]:
        return {}

    def retry(self, attempt: dict[str, Any], plan: dict[str, Any]) -> dict[str, Any] | None:
        return None  # the MACs a step removes are known before it is taken

    def observe(self, model: nn.Module, gflops: float, attempt: dict[str, Any]) -> dict[str, Any]:
        self.gflops = gflops
        return {}

    def undo(self, row: dict[str, Any]) -> None:
        self.gflops = row["gflops"]

    def done(self) -> float:
        return (1.0 - self.gflops / self.gflops0) / self.cfg.target_flops_reduction

    def caveat(self) -> str:
        return ""  # MACs are counted, not timed

    def describe(self) -> str:
        return f"target -{self.cfg.target_flops_reduction:.0%} MACs"

    def record(self) -> dict[str, Any]:
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


class SpeedupGoal:
    """Reach `target_speedup` over the base model, measured on the validation runtime at its batch size."""

    name = "speedup"

    def __init__(self, ctx, model: nn.Module) -> None:
        self.cfg, self.spec = ctx.config.filter_prune, ctx.config.model
        self.gflops0 = count_macs(model, self.spec)[0]
        self.retimed: list[dict[str, Any]] = []  # timings taken again before the stage could stop on them
        self.meter = LatencyMeter(ctx.config, ctx.target)
        self.tmp = tempfile.TemporaryDirectory()
        self.base_path = Path(self.tmp.name) / "base.onnx"
        self.base = self.meter.measure(model, save_as=self.base_path)[0]
        self.profile: Profile = self.base
        self.speedup, self.low, self.high = 1.0, 1.0, 1.0
        self.drift = Drift()
        self.fit = LayerFit()
        self.steps: list[dict[str, Any]] = []
        self._before: list[tuple[Profile, dict[str, Any]]] = []  # (profile, anchor) before each step, for undo
        self.layers_before = dict(self.base.layers)
        self.t, self.try_ = 0, 1  # the step and its attempt (retry() counts the attempts)
        # the last timed model (its latency and profile) and what the untimed steps since were predicted to save
        self.anchor: dict[str, Any] = {"ms": self.base.total_ms, "profile": self.base, "predicted_ms": 0.0,
                                       "layers": {}, "steps": 0}

    @property
    def target_ms(self) -> float:
        return self.base.total_ms / self.cfg.target_speedup

    @property
    def current_ms(self) -> float:
        return self.base.total_ms / self.speedup

    def _reaches(self, speedup: float) -> bool:
        return speedup >= self.cfg.target_speedup * (1.0 - self.cfg.speedup_tolerance)

    def reached(self) -> bool:
        return self._reaches(self.speedup)

    def _beyond(self, low: float) -> bool:
        """The low end of a timing's spread past the target's tolerance: the step overshot."""
        return low > self.cfg.target_speedup * (1.0 + self.cfg.speedup_tolerance)

    def _confirm(self, speedup: float, low: float) -> bool:
        """Whether a short timing must be repeated at length: it appears to reach the target, and the step could
        stand on it (the stage may stop there). A step clearly beyond the target is retaken smaller instead, so
        timing it longer would buy nothing, unless it is the last attempt, which stands whatever it measured
        (on a sub-millisecond model with a latency cliff, confirming every overshoot cost 10 long timings, 19 s,
        in one digits run)."""
        return self._reaches(speedup) and (not self._beyond(low) or self.try_ >= RETRIES)

    def spread_ms(self, low: float, high: float) -> float:
        """How far apart the latencies a measurement cannot tell apart are: the width of its spread in ms."""
        return max(self.base.total_ms * (1.0 / low - 1.0 / high), 0.0) if low > 0 and high > 0 else 0.0

    def step(self, t: int) -> dict[str, Any]:
        # The share of the latency a MACs-targeted step of the same schedule removes (it cuts p of the units, and a
        # layer loses about 1-(1-p)^2 of its work as both its widths shrink), so both goals take equal steps; and
        # never less than the last measurement could resolve, or the loop would steer by timing noise (on a
        # sub-millisecond model a few units' saving is within it).
        self.t, self.try_ = t, 1
        p = step_fraction(self.cfg.p0, self.cfg.alpha, t, self.cfg.steps)
        scheduled = max((1.0 - (1.0 - p) ** 2) * self.current_ms, self.spread_ms(self.low, self.high))
        remaining = self.current_ms - self.target_ms
        # the last step aims at the target itself; every step's budget is corrected by the model's drift so far
        wanted = max(min(scheduled, remaining), 0.0)
        return {"budget_ms": wanted / self.drift.factor, "wanted_ms": wanted, "profile": self.profile,
                "scale": self.fit.factors(self.profile), "try": 1}

    def attempt(self, model: nn.Module, predicted: tuple[float, dict[str, float]] | None) -> dict[str, Any]:
        """Time the model as a step left it (latency does not depend on the weights: before recovery), briefly: a
        step only needs to know where it landed to within the step's size. A step that appears to reach the target
        is timed again for longer, so that the stage does not stop on a lucky reading. `predicted` is what the
        step was predicted to save, in all and per layer (uncorrected): both corrections learn from it, against
        the saving measured since the last timed model. A step far from the target after a timed one is not
        timed (UNTIMED_FAR): it is taken to land where the corrected latency model says."""
        predicted_ms = predicted[0] if predicted else None
        if predicted_ms and self._may_go_untimed(predicted_ms):
            return self._estimate(predicted_ms, predicted[1])
        profile, (speedup, low, high) = self.meter.measure(model, self.base_path, STEP_TIMING, self._confirm)
        doubt = self._doubt(model, profile, speedup)
        if doubt:  # a reading that would stop the stage must stand on a clean, plausible timing: take it again
            self.retimed.append({"step": self.t + 1, "speedup": speedup, "why": doubt})
            profile, (speedup, low, high) = self.meter.measure(model, self.base_path, FIRM_TIMING, fresh=True)
        now = self.base.total_ms / speedup
        since = self.anchor["ms"] - now
        if predicted_ms:
            self.drift.add(self.anchor["predicted_ms"] + predicted_ms, since, len(self.steps) + 1)
            self.fit.add(self.anchor["profile"], profile, _summed(self.anchor["layers"], predicted[1]))
        return {"profile": profile, "speedup": speedup, "low": low, "high": high, "predicted_ms": predicted_ms,
                "measured_ms": self.current_ms - now, "timed": True,
                "predicted_since_ms": self.anchor["predicted_ms"] + (predicted_ms or 0.0), "measured_since_ms": since,
                "steps_since": self.anchor["steps"] + 1, "contended": profile.contended}

    def _doubt(self, model: nn.Module, profile: Profile, speedup: float) -> str | None:
        """Why a timing that reaches the target (the stage may stop on it) must be taken again: it was taken on a
        busy machine, or it is more than PLAUSIBLE times the MACs ratio. None otherwise. (A speedup far below the
        MACs ratio is common on small models, where fixed per-op costs dominate, and cannot stop the stage early:
        it is not re-timed.)"""
        if not self._reaches(speedup):
            return None
        if profile.contended:
            return f"taken on a busy machine ({profile.contended})"
        macs_ratio = self.gflops0 / max(count_macs(model, self.spec)[0], 1e-12)
        if speedup > PLAUSIBLE * macs_ratio:
            return f"{speedup:.2f}x measured for {macs_ratio:.2f}x fewer MACs is implausible"
        return None

    def _may_go_untimed(self, predicted_ms: float) -> bool:
        """Far from the target, neither the first step nor the last, and the step before was timed."""
        if not self.steps or self.t >= self.cfg.steps - 1 or not self.steps[-1]["timed"]:
            return False
        return self.current_ms - predicted_ms * self.drift.factor >= UNTIMED_FAR * self.target_ms

    def _estimate(self, predicted_ms: float, layers: dict[str, float]) -> dict[str, Any]:
        """Where an untimed step is taken to land: each layer loses its prediction corrected by LayerFit and the
        drift so far (the profile the next step's costs come from); the end-to-end latency loses their sum."""
        factors, drift = self.fit.factors(self.profile), self.drift.factor
        after = {layer: max(ms - layers.get(layer, 0.0) * factors.get(layer, 1.0) * drift, 0.0)
                 for layer, ms in self.profile.layers.items()}
        total = max(self.current_ms - (sum(self.profile.layers.values()) - sum(after.values())), 1e-9)
        speedup = self.base.total_ms / total
        return {"profile": Profile(total, after, self.profile.other_ms), "speedup": speedup, "low": speedup,
                "high": speedup, "predicted_ms": predicted_ms, "measured_ms": None, "timed": False,
                "predicted_layers": layers}

    def retry(self, attempt: dict[str, Any], plan: dict[str, Any]) -> dict[str, Any] | None:
        """A corrected plan when the step saved far more than it asked for (the latency model underestimated what
        the removals save: beyond the target's tolerance, or twice the step's budget and 5% of the latency), else
        None. The step is then undone and retaken with the budget scaled by this attempt's own misprediction."""
        if plan["try"] >= RETRIES or not attempt["timed"] or not attempt["predicted_ms"] or attempt["measured_ms"] <= 0:
            return None
        # only what the measurement can tell from its own noise: the spread's low end beyond the target, or an
        # excess wider than the spread (a timing that merely wobbles is not a step to undo)
        beyond = self._beyond(attempt["low"])
        excess = attempt["measured_ms"] - plan["wanted_ms"]
        too_big = (attempt["measured_ms"] > 2.0 * plan["wanted_ms"] and excess > 0.05 * self.current_ms
                   and excess > self.spread_ms(attempt["low"], attempt["high"]))
        if not (beyond or too_big):
            return None
        ratio = attempt["measured_ms"] / attempt["predicted_ms"]
        self.try_ = plan["try"] + 1
        return {**plan, "budget_ms": plan["wanted_ms"] / ratio, "try": self.try_,
                "why": f"saved {attempt['measured_ms']:.3g} ms of {plan['wanted_ms']:.3g} ms wanted "
                       f"({attempt['speedup']:.2f}x)"}

    def observe(self, model: nn.Module, gflops: float, attempt: dict[str, Any]) -> dict[str, Any]:
        self._before.append((self.profile, self.anchor))
        self.profile = attempt["profile"]
        self.speedup, self.low, self.high = attempt["speedup"], attempt["low"], attempt["high"]
        row = {"predicted_ms": attempt["predicted_ms"], "measured_ms": attempt["measured_ms"],
               "latency_ms": self.current_ms, "speedup": self.speedup, "speedup_low": self.low,
               "speedup_high": self.high, "timed": attempt["timed"]}
        if attempt.get("contended"):
            row["contended"] = attempt["contended"]
        if attempt["timed"]:
            if attempt["steps_since"] > 1:  # this timing measured the untimed steps before it too
                row.update(predicted_since_ms=attempt["predicted_since_ms"],
                           measured_since_ms=attempt["measured_since_ms"], steps_since=attempt["steps_since"])
            self.anchor = {"ms": self.current_ms, "profile": self.profile, "predicted_ms": 0.0, "layers": {},
                           "steps": 0}
        else:
            self.anchor = {**self.anchor, "predicted_ms": self.anchor["predicted_ms"] + attempt["predicted_ms"],
                           "layers": _summed(self.anchor["layers"], attempt["predicted_layers"]),
                           "steps": self.anchor["steps"] + 1}
        self.steps.append(row)
        return row

    def undo(self, row: dict[str, Any]) -> None:
        self.steps.pop()
        last = self.steps[-1] if self.steps else {"speedup": 1.0, "speedup_low": 1.0, "speedup_high": 1.0}
        self.speedup, self.low, self.high = last["speedup"], last["speedup_low"], last["speedup_high"]
        if self._before:
            self.profile, self.anchor = self._before.pop()

    def done(self) -> float:
        return (1.0 - 1.0 / self.speedup) / (1.0 - 1.0 / self.cfg.target_speedup)

    def caveat(self) -> str:
        """What a stop on the last timing must say when that timing was taken on a busy machine ('' if clean)."""
        why = self.steps[-1].get("contended") if self.steps else None
        return (f"; the timing it stands on was taken while the machine was busy and stayed so after "
                f"{CONTENDED_RETRIES} retries ({why}): the speedup is uncertain, re-run on an idle machine"
                if why else "")

    def describe(self) -> str:
        return f"latency {self.current_ms:.3g} ms, {self.speedup:.2f}x (target {self.cfg.target_speedup:g}x)"

    def record(self) -> dict[str, Any]:
        return {"runtime": self.meter.runtime, "device": self.meter.device, "threads": self.meter.threads,
                "base_ms": self.base.total_ms, "target_ms": self.target_ms, "speedup": self.speedup,
                "speedup_low": self.low, "speedup_high": self.high, "steps": self.steps,
                "speedup_timed": self.steps[-1]["timed"] if self.steps else True,
                "untimed_steps": sum(not s["timed"] for s in self.steps),
                "layers_before": self.layers_before, "layers_after": dict(self.profile.layers),
                "other_ms_before": self.base.other_ms, "other_ms_after": self.profile.other_ms,
                "measure_seconds": round(self.meter.seconds, 2), "confirmations": self.meter.confirmations,
                "cache_hits": self.meter.hits,
                "cache_misses": self.meter.misses, "contended_timings": self.meter.contended,
                "retaken_busy": self.meter.retaken, "retimed": self.retimed, "drift": self.drift.factor,
                "layer_fit": round(self.fit.overall(), 3)}


def goal_for(ctx, model: nn.Module) -> MacsGoal | SpeedupGoal:
    return SpeedupGoal(ctx, model) if ctx.config.filter_prune.target_speedup else MacsGoal(ctx, model)
