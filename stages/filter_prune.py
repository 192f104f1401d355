"""Stage `filter_prune`: IDAP++ divergence-aware iterative filter pruning (docs/method.md section 2)."""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator
from torch import nn

from core._progress import eta
from core.config import Section
from core.context import STAGES, Context, StageResult
from core.models import clone, count_macs, structure_of
from core.records import FIGURES, ReportSection, RunRecords, Table, dynamics_row, f4
from core.rundir import atomic_torch_save
from stages._attention import count_heads
from stages._criteria import CRITERIA
from stages._goals import Decision, Goal, goal_for
from stages._latency import LatencyMeter
from stages._pruner import Pruner, alignment
from stages._recovery import Budget, Outcome, recover
from stages._structure import (
    restore,
)
from stages._training import evaluate, teacher_and_reference


class FilterPruneConfig(Section):
    """IDAP++ divergence-aware filter pruning (docs/method.md section 2)."""

    @model_validator(mode="before")
    @classmethod
    def _target_list(cls, data: Any) -> Any:
        """A list target (`target_speedup: [1.5, 2, 3]`) asks for a frontier: its points, in order, become
        `frontier`, and the target the trajectory prunes to is the largest. One value is today's single target."""
        if not isinstance(data, dict):
            return data
        for key in ("target_speedup", "target_flops_reduction"):
            value = data.get(key)
            if isinstance(value, list | tuple):
                if not value or not all(isinstance(v, int | float) and not isinstance(v, bool) for v in value):
                    raise ValueError(f"filter_prune.{key} as a list takes numbers, e.g. [1.5, 2, 3]; got {value!r}")
                if data.get("frontier") is not None:
                    raise ValueError(f"set the frontier once: filter_prune.{key} as a list, or filter_prune.frontier "
                                     f"with one {key}, not both")
                points = sorted(set(float(v) for v in value))
                data = {**data, key: points[-1], "frontier": points if len(points) > 1 else None}
        return data

    @model_validator(mode="after")
    def _one_target(self) -> FilterPruneConfig:
        if self.target_flops_reduction is not None and self.target_speedup is not None:
            raise ValueError("set one target: filter_prune.target_flops_reduction (a share of the MACs) or "
                             "filter_prune.target_speedup (a measured speedup), not both; remove the other (on the "
                             "command line: --set filter_prune.target_flops_reduction=null)")
        if self.target_flops_reduction is None and self.target_speedup is None:
            object.__setattr__(self, "target_flops_reduction", 0.5)
        if self.frontier is not None:
            target = self.target_speedup or self.target_flops_reduction
            bad = [p for p in self.frontier if not (p > 1.0 if self.target_speedup else 0.0 < p < 1.0)]
            if bad:
                raise ValueError(f"frontier point(s) {bad} out of range: a speedup must be above 1, a MACs reduction "
                                 f"between 0 and 1")
            if target not in self.frontier:
                raise ValueError(f"the target {target:g} is not one of the frontier's points {self.frontier}")
            object.__setattr__(self, "frontier", sorted(self.frontier))
        return self

    def points(self) -> list[float]:
        """The targets this run's trajectory stops at, in order: the frontier's points up to the target (a
        frontier point's own run stops at its point), or the one target."""
        target = self.target_speedup or self.target_flops_reduction
        return [p for p in self.frontier if p <= target] if self.frontier else [target]

    @field_validator("round_to")
    @classmethod
    def _round_to(cls, value: int | str) -> int | str:  # a field validator, so it is reported with the other keys
        if isinstance(value, int) and value < 1:
            raise ValueError("must be at least 1 (or auto)")
        return value

    enabled: bool = Field(True, description="run filter pruning")
    criterion: str = Field("divergence_taylor", description="importance criterion; `compress criteria` lists them")
    target_flops_reduction: float | None = Field(None, gt=0.0, lt=1.0, description="fraction of MACs to remove "
                                                 "(0.5 when target_speedup is unset too); a list asks for a "
                                                 "frontier of them")
    target_speedup: float | None = Field(None, gt=1.0, description="instead of a MACs target: the batch latency "
                                         "speedup over the base to reach on the validation runtime (e.g. 2.0); a "
                                         "list (e.g. [1.5, 2, 3, 4]) asks for a frontier of them")
    speedup_tolerance: float = Field(0.03, ge=0.0, lt=0.5, description="a measured speedup this close below the "
                                     "target counts as reaching it")
    steps: int = Field(20, ge=1, description="T, the maximum number of pruning steps")
    p0: float = Field(0.05, gt=0.0, lt=1.0, description="first step's fraction of remaining units")
    alpha: float = Field(1.5, ge=0.0, description="growth of the step fraction: p_t = p0 (1 + t/T)^alpha")
    round_to: int | Literal["auto"] = Field(8, description="channel counts are kept at multiples of this; auto: "
                                            "the multiple the validation runtime rewards, measured (8, 16 or 32)")
    ranking: Literal["global", "per_layer"] = Field("global", description="one ranking over all layers, or the "
                                                   "same share from each layer")
    latency_weight: Literal["work", "none"] = Field("work", description="under target_speedup, what a unit's "
                                                    "score is weighed by against the milliseconds it saves: the "
                                                    "MACs it carries (work), or nothing (none: importance per "
                                                    "millisecond alone, HALP's formulation); docs/latency.md")
    steering: Literal["planned", "readings"] = Field("planned", description="under target_speedup, what sets each "
                                                     "step's latency budget and its units' costs: the latency "
                                                     "model alone (planned: the base's profile less what earlier "
                                                     "steps were predicted to save: while the schedule's step is the "
                                                     "larger, a run prunes the same units whatever its timings "
                                                     "read; the readings decide how much is left to the target and "
                                                     "when to stop), or the model corrected by every reading "
                                                     "(readings); docs/latency.md")
    max_layer_pruning_ratio: float = Field(0.9, gt=0.0, lt=1.0, description="cap per layer vs original width")
    max_accuracy_drop: float = Field(5.0, ge=0.0, le=100.0, description="top-1 points below the stage start")
    recovery_steps: int = Field(30, ge=0, description="training steps per recovery round after each step")
    recovery_rounds: int = Field(1, ge=1, description="most recovery rounds after each step (recovery.stopping)")
    recovery_lr: float = Field(0.01, gt=0.0, description="peak learning rate of those recoveries")
    ignore: list[str] = Field(default_factory=list, description="module names never pruned")
    flops_tolerance: float = Field(0.005, ge=0.0, lt=0.1, description="stop when this close to the target")
    frontier: list[float] | None = Field(None, description="set by a list target (target_speedup: [1.5, 2, 3, 4] "
                                         "or target_flops_reduction: [0.3, 0.5, 0.7]): one pruning trajectory "
                                         "stops at each point, and each is finished, exported and validated under "
                                         "frontier/<point>/ (docs/frontier.md)")
    select: Literal["fastest_within_drop", "most_accurate", "largest_target"] = Field(
        "fastest_within_drop", description="which frontier point the top-level model.onnx and summary.json are: "
        "the fastest whose top-1 drop is within validate.gates.max_top1_drop (the most accurate when none is), "
        "the most accurate, or the largest target's")


def take_step(pruner: Pruner, goal: Goal, model: nn.Module, t: int, stats: dict[str, Any] | None,
              snapshot: nn.Module, log=None) -> Decision:
    """One step towards the goal, as the goal decided it. A step that saved far more latency than it asked for is
    undone and retaken with the goal's corrected plan, so that neither a step nor the last one overshoots by the
    latency model's error; a decision whose removal is empty means nothing was left to remove."""
    plan = goal.plan(t)
    while True:
        removal = pruner.apply(model, plan, stats, snapshot)
        if removal.units == 0:
            return Decision(plan, removal)
        decision = goal.judge(plan, removal, goal.measure(model, plan, removal))
        if decision.retake is None:
            return decision
        plan = decision.retake
        if log:
            log(f"filter_prune step {t + 1}: {plan.why}; retaking it with a {plan.budget_ms:.3g} ms budget "
                f"(attempt {plan.attempt})")
        restore(model, clone(snapshot))  # a copy: restore shares the snapshot's modules, which may be needed again


@dataclass(frozen=True)
class StepRecord:
    """One entry of the stage's decision log: the step's decision and the model after recovery (step 0 is the
    model the stage started from). The checkpoint's `dynamics`, the log lines, the report and summary.json read
    it; `row()` is its form there."""

    step: int
    gflops: float
    params_m: float
    scores: dict[str, float]
    accepted: bool = True
    decision: Decision | None = None
    recovery: Outcome | None = None

    def row(self) -> dict[str, Any]:
        out = {"step": self.step, "fraction": 0.0, "units_removed": 0, "params_m": self.params_m,
               "gflops": self.gflops, **self.scores}
        if self.decision is not None:
            d = self.decision
            out.update(fraction=d.plan.share, units_removed=d.removal.units, recovery_rounds=self.recovery.rounds,
                       recovery_stop=self.recovery.stopped_by, attempts=d.plan.attempt, **d.measured.latency_fields())
        out["accepted"] = self.accepted
        return out


@STAGES.register("filter_prune")
class FilterPrune:
    description = "iterative divergence-aware filter pruning to the target FLOPs, with rollback"

    @staticmethod
    def off(config) -> str | None:
        return None if config.filter_prune.enabled else "filter_prune.enabled is false"

    @staticmethod
    def dynamics(rec: RunRecords, before: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """The report's dynamics rows: the start, then every step after its recovery, rolled back or kept."""
        return [dynamics_row("filter_prune", "start" if d["step"] == 0 else f"step {d['step']}", d["params_m"],
                             d["gflops"], d["top1"], d["top5"], d["accepted"], d.get("recovery_rounds"),
                             d.get("recovery_stop")) for d in rec.states.get("filter_prune", {}).get("dynamics", [])]

    @staticmethod
    def report(rec: RunRecords) -> list[ReportSection]:
        """With a speedup target: each step's predicted and measured saving (the latency model at work)."""
        lat = rec.states.get("filter_prune", {}).get("latency")
        if not lat:
            return []
        steps = lat.get("steps", [])

        def measured(s: dict[str, Any]) -> str:
            if not s.get("timed", True):
                return "not timed (far from the target)"
            if s.get("steps_since", 1) > 1:  # the timing covers the untimed steps before it
                return (f"{f4(s['measured_since_ms'])} over the last {s['steps_since']} steps (predicted "
                        f"{f4(s['predicted_since_ms'])})")
            return f4(s["measured_ms"])

        def timed(s: dict[str, Any], text: str, untimed: str = " (predicted)") -> str:
            return text + ("" if s.get("timed", True) else untimed)

        t = Table(["step", "predicted saving (ms)", "measured saving (ms)", "latency (ms)", "speedup", "spread"],
                  [[str(i + 1), f4(s["predicted_ms"]), measured(s), timed(s, f4(s["latency_ms"])),
                    timed(s, f"{s['speedup']:.2f}x"),
                    f"{s['speedup_low']:.2f}-{s['speedup_high']:.2f}" if s.get("timed", True) else "-"]
                   for i, s in enumerate(steps)])
        untimed = sum(not s.get("timed", True) for s in steps)
        return [ReportSection("Latency model", [
            f"Pruned to a measured speedup on {lat['runtime']} ({lat['threads']} threads, {lat['device']}): base "
            f"{lat['base_ms']:.4g} ms, target {lat['target_ms']:.4g} ms, reached {lat['speedup']:.2f}x in the stage "
            f"(validated figure above). Each step's budget is spent by a knapsack over the groups' predicted "
            f"savings (per-layer times from ONNX Runtime's profiler), then the model is timed against the base and "
            f"the misprediction corrects the next budget (drift {lat['drift']:.2f})"
            + (f"; {untimed} step(s) far from the target were not timed, the timing after each measured it with the "
               f"step before" if untimed else "") + f". Measuring took {lat['measure_seconds']:.1f} s "
            f"({lat['cache_hits']} measurements from the cache, {lat['cache_misses']} new)."], [t],
            [(f"{FIGURES}/latency_model.png", "predicted vs measured saving per step; ms per layer before/after")],
            {"latency_model.png": lat})]

    def run(self, model: nn.Module | None, ctx: Context) -> StageResult:
        cfg = ctx.config.filter_prune
        if not cfg.enabled:
            return StageResult(status="skipped", metrics={"reason": "filter_prune.enabled is false"})
        spec = ctx.config.model
        stats: dict[str, Any] | None = ctx.stage_state("calibrate")["unit_stats"]  # step 0 uses the calibration pass
        meter = LatencyMeter(ctx.config, ctx.target) if cfg.target_speedup or cfg.round_to == "auto" else None
        pruner = Pruner(CRITERIA.get(cfg.criterion)(), ctx, alignment(ctx.config, meter))
        heads0 = count_heads(model)
        teacher, reference = teacher_and_reference(model, ctx)
        budget = Budget(rounds=cfg.recovery_rounds, steps=cfg.recovery_steps, lr=cfg.recovery_lr,
                        lr_key="filter_prune.recovery_lr")
        goal = goal_for(ctx, model, meter)
        start = StepRecord(0, *count_macs(model, spec), evaluate(model, ctx))
        log = [start]  # the decision log: every step taken, accepted or rolled back
        for key in ("params_m", "gflops", "top1", "top5"):
            ctx.metric(f"prune/{key}", start.row()[key], step=0)
        stop = f"took all {cfg.steps} step{'' if cfg.steps == 1 else 's'} (filter_prune.steps)"
        started = time.monotonic()
        points: list[dict[str, Any]] = []  # a frontier run: the model and records at each point reached

        def passed() -> bool:
            """Keep every point the model has reached; True once the last one is."""
            while goal.reached():
                if cfg.frontier:
                    points.append(self._point(ctx, model, pruner, goal, log, heads0, goal.reached_because()))
                if not goal.advance():
                    return True
            return False

        for t in ctx.track(range(cfg.steps), "pruning steps", total=cfg.steps):
            if passed():
                break
            snapshot = clone(model)
            decision = take_step(pruner, goal, model, t, stats, snapshot, ctx.log.info)
            if decision.removal.units == 0:
                stop = unreachable(goal, cfg)
                break
            model, outcome = recover(model, ctx, budget, teacher, reference, f"recovery {t + 1}", seed=100 + t)
            stats = None  # the model changed: later steps measure flows again
            record = StepRecord(t + 1, *count_macs(model, spec), evaluate(model, ctx), decision=decision,
                                recovery=outcome)
            goal.accept(decision)
            drop = start.scores["top1"] - record.scores["top1"]
            if drop > cfg.max_accuracy_drop:
                record = dataclasses.replace(record, accepted=False)
            log.append(record)
            self._report_step(ctx, record, log, goal, started)
            if not record.accepted:
                model = snapshot
                goal.undo()
                stop = (f"step {t + 1} dropped top-1 by {drop:.2f} > max_accuracy_drop {cfg.max_accuracy_drop}; "
                        f"rolled back")
                break
        else:
            passed()  # the last step may have reached points
        if goal.reached():
            stop = goal.reached_because()
        elif cfg.frontier:  # the first point not reached gets where the trajectory stopped, with why; under a
            # speedup target so does every later one, since truncation then aims at each point's own target (a
            # MACs-targeted truncation does not aim at one: later points would be the same model)
            while True:
                points.append(self._point(ctx, model, pruner, goal, log, heads0, stop, reached=False))
                if goal.name != "speedup" or not goal.advance():
                    break
        result = self._result(ctx, model, pruner, goal, log, stop, heads0)
        if cfg.frontier:
            result.state["points"] = points
            result.files += [ctx.stage_dir / p["file"] for p in points]
        return result

    @classmethod
    def _point(cls, ctx: Context, model: nn.Module, pruner: Pruner, goal: Goal, log: list[StepRecord], heads0: int,
               stop: str, reached: bool = True) -> dict[str, Any]:
        """A frontier point: the model as the trajectory reached it (or stopped short of it), saved as a stage
        checkpoint of its own (frontier/<point>/ starts from it), and its records."""
        value = goal.points.value
        label = f"{value:g}x" if goal.name == "speedup" else f"macs-{100 * value:g}"
        metrics, state = cls._records(ctx, model, pruner, goal, log, stop if reached else f"not reached: {stop}",
                                      heads0)
        rel = f"points/{label}.pt"
        (ctx.stage_dir / "points").mkdir(parents=True, exist_ok=True)
        atomic_torch_save(ctx.stage_dir / rel, {
            "state": state, "model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
            "structure": structure_of(model, ctx.config.model)})
        ctx.log.info(f"filter_prune: frontier point {label} {'reached' if reached else 'NOT reached'} at step "
                     f"{log[-1].step}: GMACs {metrics['gflops']:.4g}, top-1 {metrics['top1']:.2f}"
                     + (f", {metrics['speedup']:.2f}x" if "speedup" in metrics else ""))
        return {"point": value, "label": label, "file": rel, "reached": reached, "step": log[-1].step,
                "metrics": metrics}

    @staticmethod
    def _report_step(ctx: Context, record: StepRecord, log: list[StepRecord], goal: Goal, started: float) -> None:
        """A step's metrics and its milestone line, from its record in the decision log."""
        cfg, row, start = ctx.config.filter_prune, record.row(), log[0]
        for key in ("params_m", "gflops", "top1", "top5", "fraction", "units_removed", "speedup"):
            if key in row:
                ctx.metric(f"prune/{key}", row[key], step=record.step)
        done = max(record.step / cfg.steps, goal.progress())
        ctx.milestone(f"filter_prune step {record.step}/{cfg.steps}: GMACs {record.gflops:.4g} "
                      f"({record.gflops / start.gflops - 1:+.1%}), {goal.describe()}, params {record.params_m:.3g}M, "
                      f"top-1 {record.scores['top1']:.2f} (start {start.scores['top1']:.2f}), "
                      f"{record.decision.removal.units} units removed, "
                      + (f"kept (ETA {eta(started, done, 1.0)})" if record.accepted else "ROLLED BACK (top-1 budget)"))

    @classmethod
    def _result(cls, ctx: Context, model: nn.Module, pruner: Pruner, goal: Goal, log: list[StepRecord], stop: str,
                heads0: int) -> StageResult:
        """The stage's result, with what it held whole said once."""
        ctx.log.info(f"filter_prune stopped: {stop}")
        metrics, state = cls._records(ctx, model, pruner, goal, log, stop, heads0)
        for h in state["held_whole"]:
            coupled = f" and {len(h['layers']) - 1} coupled layer(s)" if len(h["layers"]) > 1 else ""
            ctx.log.warning(f"filter_prune held whole: {h['root']}{coupled}, {h['macs_share']:.1%} of the MACs: "
                            f"{h['reason']}")
        return StageResult(model=model, metrics=metrics, state=state)

    @staticmethod
    def _records(ctx: Context, model: nn.Module, pruner: Pruner, goal: Goal, log: list[StepRecord], stop: str,
                 heads0: int) -> tuple[dict[str, Any], dict[str, Any]]:
        """The stage's metrics and checkpoint state, read off the decision log."""
        cfg = ctx.config.filter_prune
        start, final = log[0], [r for r in log if r.accepted][-1]
        metrics = {"criterion": cfg.criterion, "goal": goal.name, "steps_taken": len(log) - 1,
                   "stop_reason": stop, "gflops_before": start.gflops, "gflops": final.gflops,
                   "params_m": final.params_m, "flops_reduction": 1.0 - final.gflops / start.gflops,
                   "top1_start": start.scores["top1"], "top1": final.scores["top1"], "top5": final.scores["top5"],
                   "graph_builds": pruner.graph_builds, "scoring_seconds": round(pruner.score_seconds, 3),
                   "round_to": pruner.round_to}
        latency = goal.record([r.decision.measured for r in log[1:] if r.accepted])
        if latency:
            metrics.update({"speedup": latency["speedup"], "latency_runtime": latency["runtime"],
                            "latency_seconds": latency["measure_seconds"],
                            "latency_cache_hits": latency["cache_hits"],
                            "latency_cache_misses": latency["cache_misses"]})
        if heads0:
            metrics.update({"heads_before": heads0, "heads": count_heads(model)})
        held = pruner.held_records(model)
        metrics.update({"held_whole": len(held), "held_macs_share": round(sum(h["macs_share"] for h in held), 4),
                        "proof_seconds": round(pruner.proof_seconds, 3),
                        "proof_cached": pruner.proof_cached})
        state = {"dynamics": [r.row() for r in log], "stop_reason": stop, "held_whole": held}
        if latency:
            state["latency"] = latency
        return metrics, state


def unreachable(goal, cfg) -> str:
    """Why a step removed nothing: every prunable layer is at its cap (the rest is held whole)."""
    what = (f"the speedup target {goal.target_speedup:g}x cannot be reached" if goal.name == "speedup" else
            "no unit left to prune")
    return (f"{what}: every prunable layer is at its minimum width (filter_prune.max_layer_pruning_ratio "
            f"{cfg.max_layer_pruning_ratio:g}) and the rest is held whole; raise the cap, add layer truncation, or "
            f"lower the target")
