"""One pruning step of filter_prune: score the units, plan the removal (a share, or a latency budget), apply it
through one dependency graph, and hold whole what would break the model."""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import torch
from torch import nn

from core.context import Context
from core.errors import UserInputError, did_you_mean
from core.models import clone
from stages._criteria import accumulate_gradients
from stages._flows import UnitStats, collect_unit_stats
from stages._goals import Plan, Removal
from stages._graph import build_graph, in_attention
from stages._latency import LatencyMeter, best_alignment, unit_costs
from stages._pruning import (
    apply_plan,
    classifier_layers,
    per_unit,
    plan_latency_step,
    plan_step,
    producers_of,
    score_groups,
    work_per_unit,
)
from stages._structure import (
    Held,
    every_attention,
    fill_shares,
    groups_of_found,
    module_macs,
    plan_breaks,
    prove,
    restore,
    runs,
)


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
        self.coupled: dict[str, list[str]] = {}  # residual root -> head roots, pruned as one (`Proof.coupled`)
        self.groups_now: dict[str, Any] = {}
        self.proof_cached = False
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
            broken = prove(model, self.example, [f[0] for f in found], build_graph,
                           groups_of=groups_of_found(model, found))
            self.proof_seconds = time.perf_counter() - t0
            self.proof_cached = prove.last_cached
            attention = every_attention(model)
            held = broken.held()  # a coupling's roots are pruned jointly (`score_groups`), not held
            for name, _, _, group in found:
                if name in held:
                    layers = producers_of(graph, group, model)
                    reason = f"removing some of its units breaks the model ({held[name]})"
                    self.held[name] = Held(name, in_attention(layers, attention, reason), "breaks forward", layers)
            found = [f for f in found if f[0] not in held]
            self.coupled = broken.coupled
            self.proved = True
        return self._hold_couplings(found)

    def _hold_couplings(self, found: list[tuple[str, nn.Module, Any, Any]]) -> list[tuple[str, nn.Module, Any, Any]]:
        """A coupling (`self.coupled`) shrinks only as a whole: where one of its roots is held (a later step's
        fallback, the criterion) or no longer found, the others are held too, with the reason."""
        present = {f[0] for f in found}
        for root, heads in self.coupled.items():
            roots = [root, *heads]
            gone = next((r for r in roots if r in self.held or r not in present), None)
            if gone is None:
                continue
            why = self.held[gone].reason if gone in self.held else "it is no longer prunable"
            for r in roots:
                self.held.setdefault(r, Held(r, f"its units shrink only together with {gone}'s, which are held "
                                                f"({why})", "breaks forward", [r]))
        found = [f for f in found if f[0] not in self.held]
        self.groups_now = {f[0]: f[3] for f in found}  # this step's groups by root path, for the step's fallback
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
        records = score_groups(self.prunable(model, graph), model, criterion, unscored, self.coupled)
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
        macs = module_macs(model, self.example)
        weights = work_per_unit(records, macs) if cfg.latency_weight == "work" else None
        unit_macs = {r.name: sum(per_unit(macs, r.members).values()) for r in records}
        max_macs = plan.macs_cap * macs.get("<total>", 0.0) if plan.macs_cap is not None else None
        chosen = plan_latency_step(records, self.originals, plan.budget_ms, self.round_to,
                                   cfg.max_layer_pruning_ratio, unit_ms, weights=weights, cap=plan.cap,
                                   unit_macs=unit_macs, max_macs=max_macs or None)
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
            # the records name the modules this step pruned, which restoring the snapshot replaces: by path
            where = {m: n for n, m in model.named_modules()}
            restore(model, snapshot)
            if retake:
                raise RuntimeError(f"a pruning step broke the model ({error}) even without the groups held for it")
            roots = {r.name: r for r in records if chosen.get(r.name)}
            paths = {name: where[r.module] for name, r in roots.items()}
            for name, err in plan_breaks(snapshot, self.example, roots, chosen, build_graph, paths).items():
                rec = roots[name]
                # every layer whose output the group prunes: held by its root alone, the group was derived again
                # from its next producer, under that name, and pruned again
                group = self.groups_now.get(paths[name], ())
                layers = sorted({where[d.target.module] for d, _ in group if d.target.module in where and
                                 graph.is_out_channel_pruning_fn(d.handler)} | {paths[name]})
                self.held[name] = Held(name, f"removing {len(chosen[name])} of its {rec.width} units breaks the "
                                             f"model ({err})", "breaks forward", layers)
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
