"""Stage `filter_prune`: IDAP++ divergence-aware iterative filter pruning (docs/method.md section 2)."""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from pipeline._progress import eta
from pipeline.context import STAGES, Context, StageResult
from pipeline.errors import UserInputError, did_you_mean
from pipeline.models import clone, count_macs
from stages._attention import count_heads
from stages._criteria import CRITERIA, accumulate_gradients
from stages._flows import UnitStats, collect_unit_stats
from stages._goals import Decision, Goal, Plan, Removal, goal_for
from stages._graph import in_attention
from stages._latency import LatencyMeter, best_alignment, unit_costs
from stages._pruning import (
    apply_plan,
    build_graph,
    classifier_layers,
    per_unit,
    plan_latency_step,
    plan_step,
    producers_of,
    score_groups,
    work_per_unit,
)
from stages._recovery import Budget, Outcome, recover
from stages._structure import (
    Held,
    every_attention,
    fill_shares,
    module_macs,
    plan_breaks,
    prove,
    restore,
    runs,
)
from stages._training import evaluate, teacher_and_reference


def ignored_modules(model: nn.Module, ctx: Context, outputs: list[nn.Module] = ()) -> list[nn.Module]:
    cfg = ctx.config.filter_prune
    ignored = classifier_layers(model, ctx.config.model.num_classes, outputs)
    names = dict(model.named_modules())
    for name in cfg.ignore:
        if name not in names:
            raise UserInputError(f"filter_prune.ignore names {name!r}, which is not a module of the model."
                                 f"{did_you_mean(name, names)} Use names as model.named_modules() gives them.")
        ignored.append(names[name])
    return ignored


class Pruner:
    """One pruning step at a time: measure what the criterion needs, one dependency graph, aligned plan, apply.

    Keeps what spans steps: every group's original width (for the per-layer cap), the kept share of units,
    the groups held whole (found once, proved on a copy at the first step, never derived again), and the
    graph-build count and time. The stage and the benchmarks prune through it alike. `round_to` is the channel
    multiple (the configuration's unless given; `alignment` resolves "auto" by measuring).
    """

    def __init__(self, criterion, ctx: Context, round_to: int | None = None) -> None:
        spec = ctx.config.model
        self.criterion, self.ctx = criterion, ctx
        self.example = torch.zeros(1, spec.in_chans, *spec.input_size, device=ctx.device)
        self.originals: dict[str, int] = {}
        self.held: dict[str, Held] = {}
        self.proved = False
        self.keep, self.graph_builds, self.score_seconds, self.proof_seconds = 1.0, 0, 0.0, 0.0
        self.round_to = round_to if round_to is not None else ctx.config.filter_prune.round_to
        if not isinstance(self.round_to, int):
            raise ValueError("round_to 'auto' is measured: pass alignment(config, meter) as round_to")

    def prunable(self, model: nn.Module, graph) -> list[tuple[str, nn.Module, Any, Any]]:
        """The groups this step may prune; groups found (or proved) unprunable join `held`, with the reason."""
        found, new = graph.groups(model, ignored_modules(model, self.ctx, graph.output_layers), self.held)
        for h in new:
            self.held.setdefault(h.root, h)
        if not self.proved:
            t0 = time.perf_counter()
            broken = prove(model, self.example, [f[0] for f in found], build_graph)
            self.proof_seconds = time.perf_counter() - t0
            attention = every_attention(model)
            for name, _, _, group in found:
                if name in broken:
                    layers = producers_of(graph, group, model)
                    reason = f"removing some of its units breaks the model ({broken[name]})"
                    self.held[name] = Held(name, in_attention(layers, attention, reason), "breaks forward", layers)
            found = [f for f in found if f[0] not in broken]
            self.proved = True
        return found

    def _scores(self, model: nn.Module, stats: dict[str, Any] | None, description: str):
        """The criterion's measurements (the unit statistics when `stats` is None and it needs them), one graph, and
        every prunable group's scored record."""
        ctx, criterion = self.ctx, self.criterion
        if criterion.needs_grad:
            # one pass: the gradient pass also measures the unit statistics when they must be measured again
            units = UnitStats() if criterion.needs_stats and stats is None else None
            accumulate_gradients(model, ctx, [units] if units else [])
            if units:
                stats = units.result()
        elif criterion.needs_stats and stats is None:
            stats = collect_unit_stats(model, ctx, description)
        criterion.prepare(model, ctx, stats)
        t0 = time.perf_counter()
        graph = build_graph(model, self.example)
        self.graph_builds += 1
        unscored: list[tuple[str, str]] = []
        records = score_groups(self.prunable(model, graph), model, criterion, unscored)
        for name, why in unscored:
            self.held.setdefault(name, Held(name, why, "criterion", [name]))
        self.score_seconds += time.perf_counter() - t0
        for r in records:
            self.originals.setdefault(r.name, r.width)
        return stats, graph, records

    def _choose(self, model: nn.Module, records, plan: Plan, keep: float) -> tuple[dict[str, list[int]], Removal]:
        """Which units of which group go, and (for a budgeted plan) the latency they are predicted to save."""
        cfg = self.ctx.config.filter_prune
        if plan.budget_ms is None:
            return plan_step(records, self.originals, plan.share, self.round_to, cfg.max_layer_pruning_ratio,
                             cfg.ranking, keep), Removal(0)
        unit_ms = {r.name: unit_costs(plan.profile, r.members, plan.scale) for r in records}
        weights = work_per_unit(records, module_macs(model, self.example))
        chosen = plan_latency_step(records, self.originals, plan.budget_ms, self.round_to,
                                   cfg.max_layer_pruning_ratio, unit_ms, weights=weights)
        layers: dict[str, float] = {}
        for r in records:
            removing = len(chosen.get(r.name, ()))
            for layer, ms in per_unit(plan.profile.layers, r.members).items():
                layers[layer] = layers.get(layer, 0.0) + ms * removing
        return chosen, Removal(0, sum(len(idx) * unit_ms[name] for name, idx in chosen.items()), layers)

    def apply(self, model: nn.Module, plan: Plan, stats: dict[str, Any] | None = None,
              snapshot: nn.Module | None = None) -> Removal:
        """Take `plan` on `model`, in place: remove its share of the remaining units, or the least important units
        whose predicted saving reaches its latency budget. A step whose real removals break the model although the
        proof passed (a coupling that fails only for some index sets) is undone, the groups whose removals break it
        are held, and it is taken once more without them. `snapshot`, a copy of the model before the step, saves
        one copy when the caller has it."""
        for retake in (False, True):
            stats, graph, records = self._scores(model, stats, f"flows, step {plan.step + 1}")
            keep = self.keep * (1.0 - plan.share) if plan.budget_ms is None else self.keep
            chosen, removal = self._choose(model, records, plan, keep)
            snapshot = snapshot if snapshot is not None else clone(model)
            removed = apply_plan(graph, records, chosen, model)
            model.zero_grad(set_to_none=True)
            error = runs(model, self.example)
            if error is None:
                self.keep = keep
                return dataclasses.replace(removal, units=removed)
            restore(model, snapshot)
            if retake:
                raise RuntimeError(f"a pruning step broke the model ({error}) even without the groups held for it")
            roots = {r.name: r for r in records if chosen.get(r.name)}
            for name, err in plan_breaks(snapshot, self.example, roots, chosen, build_graph).items():
                rec = roots[name]
                self.held[name] = Held(name, f"removing {len(chosen[name])} of its {rec.width} units breaks the "
                                             f"model ({err})", "breaks forward",
                                       [n for n, m in model.named_modules() if m is rec.module])
            snapshot = None
        raise AssertionError("unreachable")

    def held_records(self, model: nn.Module) -> list[dict[str, Any]]:
        """Every group held whole, with its reason and share of the model's MACs (as the model is now)."""
        held = list(self.held.values())
        fill_shares(held, module_macs(model, self.example))
        return [h.record() for h in sorted(held, key=lambda h: -h.macs_share)]


def alignment(config, meter: LatencyMeter | None) -> int:
    """filter_prune.round_to, with "auto" measured on the deployment target (the multiple the runtime rewards;
    cached per machine)."""
    round_to = config.filter_prune.round_to
    return best_alignment(meter or LatencyMeter(config)) if round_to == "auto" else round_to


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
        for t in ctx.track(range(cfg.steps), "pruning steps", total=cfg.steps):
            if goal.reached():
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
        if goal.reached():
            stop = goal.reached_because()
        return self._result(ctx, model, pruner, goal, log, stop, heads0)

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

    @staticmethod
    def _result(ctx: Context, model: nn.Module, pruner: Pruner, goal: Goal, log: list[StepRecord], stop: str,
                heads0: int) -> StageResult:
        """The stage's metrics and checkpoint state, read off the decision log."""
        cfg = ctx.config.filter_prune
        start, final = log[0], [r for r in log if r.accepted][-1]
        ctx.log.info(f"filter_prune stopped: {stop}")
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
        for h in held:
            coupled = f" and {len(h['layers']) - 1} coupled layer(s)" if len(h["layers"]) > 1 else ""
            ctx.log.warning(f"filter_prune held whole: {h['root']}{coupled}, {h['macs_share']:.1%} of the MACs: "
                            f"{h['reason']}")
        metrics.update({"held_whole": len(held), "held_macs_share": round(sum(h["macs_share"] for h in held), 4),
                        "proof_seconds": round(pruner.proof_seconds, 3)})
        state = {"dynamics": [r.row() for r in log], "stop_reason": stop, "held_whole": held}
        if latency:
            state["latency"] = latency
        return StageResult(model=model, metrics=metrics, state=state)


def unreachable(goal, cfg) -> str:
    """Why a step removed nothing: every prunable layer is at its cap (the rest is held whole)."""
    what = (f"the speedup target {cfg.target_speedup:g}x cannot be reached" if goal.name == "speedup" else
            "no unit left to prune")
    return (f"{what}: every prunable layer is at its minimum width (filter_prune.max_layer_pruning_ratio "
            f"{cfg.max_layer_pruning_ratio:g}) and the rest is held whole; raise the cap, add layer truncation, or "
            f"lower the target")
