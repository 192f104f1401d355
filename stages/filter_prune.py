"""Stage `filter_prune`: IDAP++ divergence-aware iterative filter pruning (docs/method.md section 2)."""

from __future__ import annotations

import time
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
from stages._goals import goal_for
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
from stages._recovery import Budget, recover
from stages._structure import (
    Held,
    fill_shares,
    module_macs,
    plan_breaks,
    prove,
    restore,
    runs,
    unrecognised_attention,
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
    graph-build count and time. The stage and the benchmarks prune through it alike.
    """

    def __init__(self, criterion, ctx: Context) -> None:
        spec = ctx.config.model
        self.criterion, self.ctx = criterion, ctx
        self.example = torch.zeros(1, spec.in_chans, *spec.input_size, device=ctx.device)
        self.originals: dict[str, int] = {}
        self.held: dict[str, Held] = {}
        self.proved = False
        self.keep, self.graph_builds, self.score_seconds, self.proof_seconds = 1.0, 0, 0.0, 0.0
        self.predicted_ms = 0.0  # what the last latency-budgeted step was predicted to save
        self.predicted_layers: dict[str, float] = {}  # the same per layer, uncorrected (for LayerFit)
        cfg = ctx.config.filter_prune
        # round_to: auto measures the channel multiple the validation runtime rewards (cached per machine)
        self.round_to = best_alignment(LatencyMeter(ctx.config, ctx.target)) if cfg.round_to == "auto" else cfg.round_to

    def prunable(self, model: nn.Module, graph) -> list[tuple[str, nn.Module, Any, Any]]:
        """The groups this step may prune; groups found (or proved) unprunable join `held`, with the reason."""
        found, new = graph.groups(model, ignored_modules(model, self.ctx, graph.output_layers), self.held)
        for h in new:
            self.held.setdefault(h.root, h)
        if not self.proved:
            t0 = time.perf_counter()
            broken = prove(model, self.example, [f[0] for f in found], build_graph)
            self.proof_seconds = time.perf_counter() - t0
            attention = unrecognised_attention(model)
            for name, _, _, group in found:
                if name in broken:
                    layers = producers_of(graph, group, model)
                    reason = f"removing some of its units breaks the model ({broken[name]})"
                    self.held[name] = Held(name, in_attention(layers, attention, reason), "breaks forward", layers)
            found = [f for f in found if f[0] not in broken]
            self.proved = True
        return found

    def step(self, model: nn.Module, p: float = 0.0, stats: dict[str, Any] | None = None,
             description: str = "flows", budget_ms: float | None = None, profile=None,
             snapshot: nn.Module | None = None, scale: dict[str, float] | None = None, _retry: bool = False) -> int:
        """Remove the share `p` of the remaining units, or (with `budget_ms` and the latency `profile`) the least
        important units whose predicted saving (each layer's corrected by `scale`) reaches the budget; returns how
        many were removed. The model is changed in place; a step whose removals would break it is undone and taken
        again without the offending groups (`snapshot`, a copy of the model before the step, saves one copy when
        the caller has it)."""
        cfg, ctx, criterion = self.ctx.config.filter_prune, self.ctx, self.criterion
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
        found = self.prunable(model, graph)
        unscored: list[tuple[str, str]] = []
        records = score_groups(found, model, criterion, unscored)
        for name, why in unscored:
            self.held.setdefault(name, Held(name, why, "criterion", [name]))
        self.score_seconds += time.perf_counter() - t0
        for r in records:
            self.originals.setdefault(r.name, r.width)
        if budget_ms is not None:
            unit_ms = {r.name: unit_costs(profile, r.members, scale) for r in records}
            weights = work_per_unit(records, module_macs(model, self.example))
            plan = plan_latency_step(records, self.originals, budget_ms, self.round_to, cfg.max_layer_pruning_ratio,
                                     unit_ms, weights=weights)
            self.predicted_ms = sum(len(idx) * unit_ms[name] for name, idx in plan.items())
            self.predicted_layers = {}
            for r in records:
                removing = len(plan.get(r.name, ()))
                for layer, ms in per_unit(profile.layers, r.members).items():
                    self.predicted_layers[layer] = self.predicted_layers.get(layer, 0.0) + ms * removing
        else:
            self.keep *= 1.0 - p
            plan = plan_step(records, self.originals, p, self.round_to, cfg.max_layer_pruning_ratio, cfg.ranking,
                             self.keep)
        snapshot = snapshot if snapshot is not None else clone(model)
        removed = apply_plan(graph, records, plan, model)
        model.zero_grad(set_to_none=True)
        error = runs(model, self.example)
        if error is None:
            return removed
        # The step's real removals broke the model although the proof passed (a coupling that fails only for
        # some index sets): undo it, hold the groups whose removals break it, and take the step without them.
        restore(model, snapshot)
        if budget_ms is None:
            self.keep /= 1.0 - p
        if _retry:
            raise RuntimeError(f"a pruning step broke the model ({error}) even without the groups held for it")
        roots = {r.name: r for r in records if plan.get(r.name)}
        for name, err in plan_breaks(snapshot, self.example, roots, plan, build_graph).items():
            rec = roots[name]
            self.held[name] = Held(name, f"removing {len(plan[name])} of its {rec.width} units breaks the model "
                                         f"({err})", "breaks forward", [n for n, m in model.named_modules()
                                                                        if m is rec.module])
        return self.step(model, p, stats, description, budget_ms, profile, scale=scale, _retry=True)

    def held_records(self, model: nn.Module) -> list[dict[str, Any]]:
        """Every group held whole, with its reason and share of the model's MACs (as the model is now)."""
        held = list(self.held.values())
        fill_shares(held, module_macs(model, self.example))
        return [h.record() for h in sorted(held, key=lambda h: -h.macs_share)]


def take_step(pruner: Pruner, goal, model: nn.Module, t: int, stats: dict[str, Any] | None, snapshot: nn.Module,
              log=None) -> tuple[int, dict[str, Any], dict[str, Any]]:
    """One step towards the goal: (units removed, the plan taken, the goal's measurement of the result). A step
    that saved far more latency than it asked for is undone and retaken with a corrected budget (`goal.retry`),
    so that neither a step nor the last one overshoots by the latency model's error."""
    plan = goal.step(t)
    while True:
        removed = pruner.step(model, plan.get("p", 0.0), stats, f"flows, step {t + 1}", plan.get("budget_ms"),
                              plan.get("profile"), snapshot, plan.get("scale"))
        if removed == 0:
            return 0, plan, {}
        attempt = goal.attempt(model, (pruner.predicted_ms, pruner.predicted_layers) if "budget_ms" in plan else None)
        again = goal.retry(attempt, plan)
        if again is None:
            return removed, plan, attempt
        if log:
            log(f"filter_prune step {t + 1}: {again['why']}; retaking it with a {again['budget_ms']:.3g} ms budget "
                f"(attempt {again['try']})")
        restore(model, clone(snapshot))  # a copy: restore shares the snapshot's modules, which may be needed again
        plan = again


@STAGES.register("filter_prune")
class FilterPrune:
    name = "filter_prune"
    description = "iterative divergence-aware filter pruning to the target FLOPs, with rollback"

    @staticmethod
    def off(config) -> str | None:
        return None if config.filter_prune.enabled else "filter_prune.enabled is false"

    def run(self, model: nn.Module | None, ctx: Context) -> StageResult:
        cfg = ctx.config.filter_prune
        if not cfg.enabled:
            return StageResult(status="skipped", metrics={"reason": "filter_prune.enabled is false"})
        spec = ctx.config.model
        calib = ctx.stage_state("calibrate")
        stats: dict[str, Any] | None = calib["unit_stats"]  # step 0 uses the calibration pass
        pruner = Pruner(CRITERIA.get(cfg.criterion)(), ctx)
        gflops0, params0 = count_macs(model, spec)
        heads0 = count_heads(model)
        start = evaluate(model, ctx)
        teacher, reference = teacher_and_reference(model, ctx)
        budget = Budget(rounds=cfg.recovery_rounds, steps=cfg.recovery_steps, lr=cfg.recovery_lr,
                        lr_key="filter_prune.recovery_lr")
        goal = goal_for(ctx, model)
        dynamics = [{"step": 0, "fraction": 0.0, "units_removed": 0, "params_m": params0, "gflops": gflops0,
                     **start, "accepted": True}]
        for key in ("params_m", "gflops", "top1", "top5"):
            ctx.metric(f"prune/{key}", dynamics[0][key], step=0)
        stop = f"took all {cfg.steps} step{'' if cfg.steps == 1 else 's'} (filter_prune.steps)"
        started = time.monotonic()
        for t in ctx.track(range(cfg.steps), "pruning steps", total=cfg.steps):
            if goal.reached():
                stop = f"reached the {'speedup' if goal.name == 'speedup' else 'FLOPs'} target{goal.caveat()}"
                break
            snapshot = clone(model)
            removed, plan, attempt = take_step(pruner, goal, model, t, stats, snapshot, ctx.log.info)
            if removed == 0:
                stop = unreachable(goal, cfg)
                break
            model, outcome = recover(model, ctx, budget, teacher, reference, f"recovery {t + 1}", seed=100 + t)
            gflops, params = count_macs(model, spec)
            row = {"step": t + 1, "fraction": plan.get("p", 0.0), "units_removed": removed, "params_m": params,
                   "gflops": gflops, **evaluate(model, ctx), "recovery_rounds": outcome.rounds,
                   "recovery_stop": outcome.stopped_by, "attempts": plan.get("try", 1)}
            row.update(goal.observe(model, gflops, attempt))
            stats = None  # the model changed: later steps measure flows again
            for key in ("params_m", "gflops", "top1", "top5", "fraction", "units_removed", "speedup"):
                if key in row:
                    ctx.metric(f"prune/{key}", row[key], step=t + 1)
            rejected = start["top1"] - row["top1"] > cfg.max_accuracy_drop
            done = max((t + 1) / cfg.steps, goal.done())
            ctx.milestone(f"filter_prune step {t + 1}/{cfg.steps}: GMACs {gflops:.4g} ({gflops / gflops0 - 1:+.1%}), "
                          f"{goal.describe()}, params {params:.3g}M, top-1 {row['top1']:.2f} (start "
                          f"{start['top1']:.2f}), {removed} units removed, "
                          + ("ROLLED BACK (top-1 budget)" if rejected else f"kept (ETA {eta(started, done, 1.0)})"))
            if rejected:
                dynamics.append({**row, "accepted": False})
                model = snapshot
                goal.undo(dynamics[-2])
                stop = (f"step {t + 1} dropped top-1 by {start['top1'] - row['top1']:.2f} > "
                        f"max_accuracy_drop {cfg.max_accuracy_drop}; rolled back")
                break
            dynamics.append({**row, "accepted": True})
        else:
            if goal.reached():
                stop = f"reached the {'speedup' if goal.name == 'speedup' else 'FLOPs'} target{goal.caveat()}"
        final = [d for d in dynamics if d["accepted"]][-1]
        ctx.log.info(f"filter_prune stopped: {stop}")
        metrics = {"criterion": cfg.criterion, "goal": goal.name, "steps_taken": len(dynamics) - 1,
                   "stop_reason": stop, "gflops_before": gflops0, "gflops": final["gflops"],
                   "params_m": final["params_m"], "flops_reduction": 1.0 - final["gflops"] / gflops0,
                   "top1_start": start["top1"], "top1": final["top1"], "top5": final["top5"],
                   "graph_builds": pruner.graph_builds, "scoring_seconds": round(pruner.score_seconds, 3),
                   "round_to": pruner.round_to}
        latency = goal.record()
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
        state = {"dynamics": dynamics, "stop_reason": stop, "held_whole": held}
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
