"""One pruning step: one dependency graph, scored groups, aligned removals, applied root by root."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch_pruning as tp
from torch import nn

from stages._criteria import Criterion


@dataclass
class GroupRecord:
    """A prunable group: its root layer (by name), pruning function, current width and unit scores."""

    name: str
    module: nn.Module
    handler: object
    width: int
    scores: torch.Tensor


def classifier_layers(model: nn.Module, num_classes: int) -> list[nn.Module]:
    """The output layer(s), whose outputs are never pruned."""
    get = getattr(model, "get_classifier", None)
    head = get() if callable(get) else None
    found = [m for m in ([head] if isinstance(head, nn.Module) else []) if isinstance(m, (nn.Linear, nn.Conv2d))]
    if not found:
        found = [m for m in model.modules() if isinstance(m, nn.Linear) and m.out_features == num_classes]
        found = found[-1:]
    if not found:
        convs = [m for m in model.modules() if isinstance(m, nn.Conv2d) and m.out_channels == num_classes]
        found = convs[-1:]
    return found


def build_graph(model: nn.Module, example: torch.Tensor) -> tp.DependencyGraph:
    """The step's single dependency graph."""
    return tp.DependencyGraph().build_dependency(model, example_inputs=example)


def score_groups(dg: tp.DependencyGraph, model: nn.Module, criterion: Criterion,
                 ignored: list[nn.Module]) -> list[GroupRecord]:
    """Score every prunable group of the graph with the criterion."""
    names = {m: n for n, m in model.named_modules()}
    records = []
    for group in dg.get_all_groups(ignored_layers=ignored, root_module_types=(nn.Conv2d, nn.Linear)):
        root = group[0].dep.target.module
        handler = group[0].dep.handler
        if not dg.is_out_channel_pruning_fn(handler):
            continue
        if isinstance(root, nn.Conv2d) and root.groups > 1 and root.groups != root.out_channels:
            continue  # grouped (non-depthwise) convs need per-group alignment; left whole for now
        scores = criterion(group)
        if scores is None:
            continue
        records.append(GroupRecord(names[root], root, handler, len(scores), scores.detach().float().cpu()))
    return records


def _min_keep(width: int, original: int, round_to: int, max_ratio: float) -> int:
    floor = max(1, math.ceil((1.0 - max_ratio) * original))
    floor = math.ceil(floor / round_to) * round_to
    return min(width, max(floor, round_to))


def _chunks(rec: GroupRecord, keep_floor: int, round_to: int) -> list[tuple[float, list[int]]]:
    """Removal chunks of one layer, weakest first, each leaving a width that is a multiple of round_to."""
    order = torch.argsort(rec.scores, stable=True).tolist()
    out, start, width = [], 0, rec.width
    first = width % round_to or round_to
    size = first
    while width - size >= keep_floor and start + size <= len(order):
        idx = order[start:start + size]
        out.append((float(rec.scores[idx].mean()), idx))
        start += size
        width -= size
        size = round_to
    return out


def plan_step(records: list[GroupRecord], originals: dict[str, int], fraction: float, round_to: int,
              max_ratio: float, ranking: str, cumulative_keep: float) -> dict[str, list[int]]:
    """Choose unit indices to remove per root layer.

    global: remove ceil(fraction * all units) in aligned chunks, lowest chunk score first across layers
    (scores are normalised per layer, so they compare). per_layer: each layer goes to
    round(original * cumulative_keep) units, aligned, lowest scores first.
    """
    plan: dict[str, list[int]] = {}
    chunks = {r.name: _chunks(r, _min_keep(r.width, originals.get(r.name, r.width), round_to, max_ratio), round_to)
              for r in records}
    if ranking == "per_layer":
        for r in records:
            target = round(originals.get(r.name, r.width) * cumulative_keep / round_to) * round_to
            removed: list[int] = []
            for _, idx in chunks[r.name]:
                if r.width - len(removed) <= target:
                    break
                removed += idx
            if removed:
                plan[r.name] = removed
        return plan
    want = math.ceil(fraction * sum(r.width for r in records))
    pool = sorted(((score, k, name, idx) for name, cs in chunks.items() for k, (score, idx) in enumerate(cs)),
                  key=lambda c: (c[0], c[1], c[2]))
    taken = 0
    for _, _, name, idx in pool:
        if taken >= want:
            break
        plan.setdefault(name, []).extend(idx)
        taken += len(idx)
    return plan


def apply_plan(dg: tp.DependencyGraph, records: list[GroupRecord], plan: dict[str, list[int]]) -> int:
    """Prune each planned root through the graph (groups re-derived from the root, so no stale indices)."""
    removed = 0
    for rec in records:
        idxs = plan.get(rec.name)
        if not idxs:
            continue
        group = dg.get_pruning_group(rec.module, rec.handler, idxs=sorted(idxs))
        if dg.check_pruning_group(group):
            group.prune()
            removed += len(idxs)
    return removed
