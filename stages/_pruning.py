"""One pruning step: one dependency graph, scored groups, aligned removals, applied root by root."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from stages._attention import attention_modules, layout, members, qkv_indices
from stages._criteria import Criterion
from stages._structure import channel_groups, grouped_channels, prune_group, remove_joint


@dataclass
class Joint:
    """The parts of a joint record (`GroupRecord.joint`): a residual width whose channels can only go with one
    head of every attention it feeds (`_structure.find_couplings`). Unit k is the k-th weakest block of head_dim
    residual channels together with the k-th weakest head of each attention, so the record's scores rise with k."""

    channels: list[int]  # the residual's channels, weakest first
    attentions: list[tuple[str, nn.Module, list[int]]]  # (path, attention, its heads weakest first)


@dataclass
class GroupRecord:
    """A prunable group: its root layer (by name), pruning function, current width and unit scores.

    For attention heads the root is the attention module's qkv, the width counts heads, `unit` is the
    head dimension (features per head) and `attention` the module whose attributes follow the weights. For a
    group that feeds grouped convolutions (`groups` > 1) the width counts channel positions: a unit is position
    j of each of the `groups` slices of the root's channels (`unit` == `groups` channels), so every convolution
    group keeps the same width.
    """

    name: str
    module: nn.Module
    handler: object
    width: int
    scores: torch.Tensor
    unit: int = 1
    attention: nn.Module | None = None
    # layer -> (its width on the side this group prunes, features one unit removes there): what a unit costs
    members: dict[str, tuple[int, int]] = field(default_factory=dict)
    groups: int = 1
    joint: Joint | None = None

    def align(self, round_to: int) -> int:
        """Width alignment of this record's chunks, in units: round_to channels, one whole head, or the positions
        that keep `groups` slices' channels a multiple of round_to."""
        if self.attention is not None:
            return 1
        return round_to // math.gcd(round_to, self.unit if self.joint is not None else self.groups)

    def features(self, units: list[int]) -> list[int]:
        """The root's output features (channels) that removing `units` removes."""
        if self.attention is not None:
            return qkv_indices(self.attention, units)
        if self.joint is not None:
            d = self.unit
            return sorted(c for u in units for c in self.joint.channels[u * d:(u + 1) * d])
        if self.groups > 1:
            return grouped_channels(units, self.width * self.groups, self.groups)
        return sorted(units)

    def heads(self, units: list[int]) -> list[tuple[str, nn.Module, list[int]]]:
        """A joint record's attentions with the heads that removing `units` removes from each."""
        return [(path, att, sorted(order[u] for u in units)) for path, att, order in self.joint.attentions]

    def remove(self, dg, module: nn.Module, units: list[int], model: nn.Module,
               attentions: list[nn.Module | None] | None = None) -> bool:
        """Remove `units` from `model` through `dg`, the root being `module` (of `model`, which may be a copy of
        the model the record was scored on; then `attentions` are the record's attention(s) in that copy)."""
        if self.joint is None:
            attention = self.attention if attentions is None else attentions[0]
            return prune_group(dg, module, self.handler, self.features(units), model, attention)
        parts = self.heads(units)
        atts = attentions if attentions is not None else [att for _, att, _ in parts]
        return remove_joint(dg, module, self.handler, self.features(units),
                            [(att, heads) for att, (_, _, heads) in zip(atts, parts, strict=True)], model)


def classifier_layers(model: nn.Module, num_classes: int, outputs: list[nn.Module] = ()) -> list[nn.Module]:
    """The output layer(s), whose outputs are never pruned: the model's classifier plus `outputs`, the layers
    whose output the model returns in training mode (auxiliary heads; `build_graph` records them)."""
    get = getattr(model, "get_classifier", None)
    head = get() if callable(get) else None
    found = [m for m in ([head] if isinstance(head, nn.Module) else []) if isinstance(m, (nn.Linear, nn.Conv2d))]
    if not found:
        found = [m for m in model.modules() if isinstance(m, nn.Linear) and m.out_features == num_classes]
        found = found[-1:]
    if not found:
        convs = [m for m in model.modules() if isinstance(m, nn.Conv2d) and m.out_channels == num_classes]
        found = convs[-1:]
    return found + [m for m in outputs if m not in found]


def score_groups(found: list[tuple[str, nn.Module, Any, Any]], model: nn.Module, criterion: Criterion,
                 unscored: list[tuple[str, str]] | None = None,
                 coupled: dict[str, list[str]] | None = None) -> list[GroupRecord]:
    """Score the prunable groups (`_Graph.groups`) with the criterion: channels per unit, attention per head, and
    each coupling (`coupled`: residual root -> the head roots it shrinks with) as one joint record.
    Groups the criterion cannot score consistently go to `unscored` as (root, why)."""
    unscored = unscored if unscored is not None else []
    coupled = coupled or {}
    heads = {layout(m).root: (n, m) for n, m in attention_modules(model).items()}
    names = {m: n for n, m in model.named_modules()}
    by_name = {f[0]: f for f in found}
    joint_roots = {r for root, hs in coupled.items() for r in (root, *hs)}
    records = []
    for name, root, handler, group in found:
        if name in joint_roots:
            if name in coupled and all(h in by_name for h in coupled[name]):
                rec = _joint_record(by_name[name], [by_name[h] for h in coupled[name]], heads, names, criterion)
                if isinstance(rec, str):
                    unscored.append((name, rec))
                else:
                    records.append(rec)
            continue
        if root in heads:
            att_name, attention = heads[root]
            scores = criterion.heads(att_name, attention, group)
            lay = layout(attention)
            h = getattr(attention, lay.heads_attr)
            if scores is not None and h > 1:
                records.append(GroupRecord(att_name, root, handler, h, scores.detach().float().cpu(),
                                           unit=lay.head_dim, attention=attention, members=members(lay, att_name)))
            continue
        scores = criterion(group)
        if scores is None:
            continue
        if len(scores) != len(group[0].idxs):  # a criterion that counts the group's units otherwise
            unscored.append((name, f"the criterion gave {len(scores)} scores for its {len(group[0].idxs)} units"))
            continue
        groups = channel_groups(group) or 1
        scores = scores.detach().float().cpu()
        if groups > 1:  # a position's score: its channels' mean over the convolution groups
            scores = scores.view(groups, -1).mean(0)
        records.append(GroupRecord(name, root, handler, len(scores), scores, members=_members(group, names, groups),
                                   unit=groups, groups=groups))
    return records


def _normalised(scores: torch.Tensor) -> torch.Tensor:
    scores = torch.nan_to_num(scores.detach().float().cpu(), nan=0.0)
    return scores / scores.mean().clamp(min=1e-12)


def _joint_record(residual: tuple, attentions: list[tuple], heads: dict, names: dict,
                  criterion: Criterion) -> GroupRecord | str:
    """One record for a residual group and the attention head groups it shrinks with (or why it cannot be
    scored). Unit k: the k-th weakest block of head_dim residual channels (by their mean score) and the k-th
    weakest head of each attention; its score is the mean of the block's and the heads' scores (each normalised
    to mean 1), so weak channels and weak heads go first, together, and scores rise with k. The members are
    the residual's and the attentions' layers, one unit removing head_dim channels of the one and a head of the
    others (a layer in both counts both shares)."""
    name, root, handler, group = residual
    channel = criterion(group)
    if channel is None or len(channel) != len(group[0].idxs):
        return "the criterion cannot score the residual channels its attention heads are tied to"
    channel = _normalised(channel)
    parts, head_scores, tied = [], [], []
    d = 1
    for _, head_root, _, head_group in attentions:
        att_name, attention = heads[head_root]
        lay = layout(attention)
        scores = criterion.heads(att_name, attention, head_group)
        if scores is None:
            return f"the criterion cannot score the heads of {att_name}, which shrink with these channels"
        d = lay.head_dim
        if len(scores) * d != len(channel):
            return f"{att_name} has {len(scores)} heads of {d}, not the {len(channel)} channels it is tied to"
        scores = _normalised(scores)
        order = torch.argsort(scores, stable=True).tolist()
        parts.append((att_name, attention, order))
        head_scores.append(scores[order])
        tied.append(members(lay, att_name))
    joined = _members(group, names, d)  # a unit is d residual channels
    for layer, (w2, f2) in ((k, v) for m in tied for k, v in m.items()):
        if layer in joined:  # both sides of one layer shrink: the shares add (first order)
            w1, f1 = joined[layer]
            joined[layer] = (w1 * w2, f1 * w2 + f2 * w1)
        else:
            joined[layer] = (w2, f2)
    channels = torch.argsort(channel, stable=True).tolist()
    blocks = channel[channels].view(-1, d).mean(1)
    scores = 0.5 * blocks + 0.5 * torch.stack(head_scores).mean(0)
    return GroupRecord(name, root, handler, len(scores), scores, unit=d, members=joined,
                       joint=Joint(channels, parts))


def _members(group, names: dict[nn.Module, str], groups: int = 1) -> dict[str, tuple[int, int]]:
    """Each conv/linear layer a channel group touches, with its width on the touched side (out for producers,
    in for consumers; a depthwise conv once) and the features one unit removes there (`groups` channels when
    units are positions in every convolution group)."""
    import torch_pruning as tp

    out: dict[str, tuple[int, int]] = {}
    for dep, _ in group:
        mod = dep.target.module
        if not isinstance(mod, (nn.Conv2d, nn.Linear)) or mod not in names:
            continue
        name = names[mod]
        conv = isinstance(mod, nn.Conv2d)
        if dep.handler in (tp.prune_conv_out_channels, tp.prune_linear_out_channels,
                           tp.prune_depthwise_conv_out_channels):
            out[name] = (mod.out_channels if conv else mod.out_features, groups)
        elif name not in out:
            width = (mod.in_channels if conv else mod.in_features)
            if conv and mod.groups > 1 and mod.groups == mod.in_channels:
                width = mod.out_channels
            out[name] = (width, groups)
    return out


def producers_of(dg, group, model: nn.Module) -> list[str]:
    """Names of the layers whose output channels a group prunes."""
    names = {m: n for n, m in model.named_modules()}
    return sorted({names[dep.target.module] for dep, _ in group if dg.is_out_channel_pruning_fn(dep.handler)
                   and dep.target.module in names})


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

    global: remove ceil(fraction * all channels) in aligned chunks, lowest chunk score first across layers
    (scores are normalised per layer, so they compare), and likewise ceil(fraction * all heads) across the
    attention modules. per_layer: each layer (attention: its heads) goes to round(original * cumulative_keep)
    units, aligned, lowest scores first.
    """
    plan: dict[str, list[int]] = {}
    align = {r.name: r.align(round_to) for r in records}
    chunks = {r.name: _chunks(r, _min_keep(r.width, originals.get(r.name, r.width), align[r.name], max_ratio),
                              align[r.name]) for r in records}
    if ranking == "per_layer":
        for r in records:
            target = round(originals.get(r.name, r.width) * cumulative_keep / align[r.name]) * align[r.name]
            removed: list[int] = []
            for _, idx in chunks[r.name]:
                if r.width - len(removed) <= target:
                    break
                removed += idx
            if removed:
                plan[r.name] = removed
        return plan
    # Channels and heads are ranked in separate pools: a head is a block of head_dim features, and the lowest
    # mean of 8 channels out of hundreds would always undercut the weakest of a dozen heads.
    # A channel pool counts channels (a position of a grouped record is `groups` of them), the head pool heads.
    for kind in (False, True):
        pool_records = [r for r in records if (r.attention is not None) == kind]
        size = {r.name: 1 if kind else r.unit for r in pool_records}
        want = math.ceil(fraction * sum(r.width * size[r.name] for r in pool_records))
        pool = sorted(((score, k, r.name, idx) for r in pool_records for k, (score, idx) in enumerate(chunks[r.name])),
                      key=lambda c: (c[0], c[1], c[2]))
        taken = 0
        for _, _, name, idx in pool:
            if taken >= want:
                break
            plan.setdefault(name, []).extend(idx)
            taken += len(idx) * size[name]
    return plan


def apply_plan(dg, records: list[GroupRecord], plan: dict[str, list[int]], model: nn.Module) -> int:
    """Prune each planned root through the graph (groups re-derived from the root, so no stale indices), keeping
    derived attributes (head counts, layer-scale shapes) true."""
    removed = 0
    for rec in records:
        idxs = plan.get(rec.name)
        if not idxs:
            continue
        if rec.remove(dg, rec.module, idxs, model):
            removed += len(idxs) * rec.unit
    return removed


# The knapsack counts a unit's importance times (model keep / layer keep) ** KEEP_POWER where a layer has been cut
# deeper than the model as a whole (keep: current over original width; the model's over all groups), 1 elsewhere.
# Scores are normalised per layer over the units it has left, so a layer cut to an eighth of its width weighed an
# eighth of what it did, and the knapsack, which sees milliseconds, kept cutting the same layers down to their
# floor: on the demo with 4 recovery steps per step (1 thread), layer2's residual width went 128 -> 16 where
# Torch-Pruning's recipe kept 56, and top-1 fell to 16 on the way (57.8 at -91.7% MACs, against 93.6 for the
# MACs-targeted global ranking at -92.1%). Weighed by (original / current width) ** 2 instead, top-1 stayed at 93.1
# to -82.2% of the MACs (one run), but every layer cut at all grew dearer, and latency efficiency on the ten
# architectures at 2x fell from a median 0.94 to 0.84: the knapsack no longer bought the dear milliseconds that
# latency-targeted pruning is for. Relative to the model's own keep, only a layer cut deeper than the rest pays
# (median efficiency 0.89, BENCHMARKS.md latency targets; on the short-recovery demo neither form closed the gap
# to Torch-Pruning's recipe: docs/latency.md).
KEEP_POWER = 2.0
BISECTIONS = 7  # solves that find the largest budget within a step's MACs bound (to 1/128 of the budget)


def plan_latency_step(records: list[GroupRecord], originals: dict[str, int], budget_ms: float, round_to: int,
                      max_ratio: float, unit_ms: dict[str, float], bins: int = 400,
                      weights: dict[str, float] | None = None, cap: float | None = None,
                      unit_macs: dict[str, float] | None = None, max_macs: float | None = None,
                      ) -> dict[str, list[int]]:
    """Choose unit indices to remove so that the predicted saving reaches `budget_ms` at the least importance.

    A multiple-choice knapsack solved exactly over discretised milliseconds: each layer either keeps its width or
    loses its k weakest aligned chunks (chunks of a layer cost the same, so the weakest go first), for a saving
    of k chunks' predicted milliseconds (`unit_ms`: what one unit saves, from the latency model) and an
    importance of their units' scores (per layer normalised, features per unit counted, so that a head and its
    head_dim channels weigh alike) times the group's `weights` (1 when not given; filter_prune passes the work a
    unit does, `work_per_unit`) and, for a layer cut deeper than the model as a whole, times (model keep / layer
    keep) ** KEEP_POWER, so that no layer is cut to its floor for its milliseconds alone. `cap`, when given, is
    the most of each layer's current width this step may remove (at least one aligned chunk, so that narrow
    layers still prune). When the budget cannot be met within the caps, everything the caps allow is taken.
    `max_macs`, when given, bounds the MACs the whole step removes (`unit_macs`: the MACs one unit of each group
    carries): a plan beyond it is replaced by the plan of the largest budget that fits (the saving then falls
    short of the budget, and the next step asks for the rest).
    """
    layers: list[tuple[GroupRecord, list[tuple[float, float, list[int]]]]] = []
    originals_of = {r.name: originals.get(r.name, r.width) for r in records}
    model_keep = sum(r.width * r.unit for r in records) / max(sum(originals_of[r.name] * r.unit for r in records), 1)
    for r in records:
        cost = unit_ms.get(r.name, 0.0)
        if cost <= 0:
            continue
        align = r.align(round_to)
        floor = _min_keep(r.width, originals.get(r.name, r.width), align, max_ratio)
        if cap is not None:
            first = r.width % align or align
            floor = max(floor, r.width - max(math.floor(cap * r.width), first))
        choices, ms, lost, idx = [(0.0, 0.0, [])], 0.0, 0.0, []
        deeper = max(model_keep * originals_of[r.name] / r.width, 1.0)  # model keep / this layer's keep, at least 1
        weight = (weights or {}).get(r.name, 1.0) * deeper ** KEEP_POWER
        for _, chunk in _chunks(r, floor, align):
            idx = idx + chunk
            ms += cost * len(chunk)
            lost += float(r.scores[chunk].sum()) * r.unit * weight
            choices.append((ms, lost, list(idx)))
        if len(choices) > 1:
            layers.append((r, choices))
    if not layers or budget_ms <= 0:
        return {}
    budget_ms = min(budget_ms, sum(choices[-1][0] for _, choices in layers))  # beyond it: everything allowed
    plan = _knapsack(layers, budget_ms, bins)
    if max_macs is None or unit_macs is None:
        return plan

    def fits(p: dict[str, list[int]]) -> bool:
        return sum(len(idx) * unit_macs.get(name, 0.0) for name, idx in p.items()) <= max_macs * (1.0 + 1e-9)

    if fits(plan):
        return plan
    # the largest budget whose plan fits, by bisection (MACs grow with the budget, not strictly: the best fit seen)
    lo, hi, best, over = 0.0, budget_ms, {}, plan
    for _ in range(BISECTIONS):
        mid = (lo + hi) / 2
        trial = _knapsack(layers, mid, bins)
        if fits(trial):
            lo, best = mid, trial
        else:
            hi, over = mid, trial
    return best or over  # nothing fits (one chunk is more than the bound): the least that does not


def _knapsack(layers: list[tuple[GroupRecord, list[tuple[float, float, list[int]]]]], budget_ms: float,
              bins: int) -> dict[str, list[int]]:
    """`plan_latency_step`'s knapsack: per layer, the choice (saving ms, importance lost, units) that reaches
    `budget_ms` in all at the least importance lost; everything allowed when the budget cannot be met."""
    step = budget_ms / bins
    inf = float("inf")
    best = [0.0] + [inf] * bins  # best[b]: least importance lost for a saving of at least b steps
    picks: list[list[int]] = []
    for _, choices in layers:
        new, choice = [inf] * (bins + 1), [0] * (bins + 1)
        for b in range(bins + 1):
            for k, (ms, lost, _) in enumerate(choices):
                prev = max(0, b - int(ms / step))
                if best[prev] + lost < new[b]:
                    new[b], choice[b] = best[prev] + lost, k
        best = new
        picks.append(choice)
    if best[bins] == inf:
        return {r.name: choices[-1][2] for r, choices in layers}
    plan: dict[str, list[int]] = {}
    b = bins
    for (r, choices), choice in reversed(list(zip(layers, picks, strict=True))):
        ms, _, idx = choices[choice[b]]
        if idx:
            plan[r.name] = idx
        b = max(0, b - int(ms / step))
    return plan


def per_unit(per_layer: dict[str, float], members: dict[str, tuple[int, int]]) -> dict[str, float]:
    """What one unit of a group carries of a per-layer quantity (milliseconds, MACs) in each member layer: the
    layer's value times the share of its width on the pruned side that one unit is (1 channel of `width`, or a
    head's features)."""
    return {layer: per_layer.get(layer, 0.0) * features / width for layer, (width, features) in members.items()
            if width > 0}


def work_per_unit(records: list[GroupRecord], macs: dict[str, float]) -> dict[str, float]:
    """The MACs one unit of each group carries (its member layers' MACs times the share of their width one unit
    is), relative to the groups' mean: the latency knapsack's weight on a unit's score.

    Scores normalised per layer say which units of a layer matter, not how a unit of one layer weighs against
    one of another; counted per unit, a channel of a 64-wide layer weighed as much as one of a 512-wide layer
    although it is eight times the share of its layer's work. Narrow high-resolution layers also have the most
    milliseconds per channel, so a knapsack buying milliseconds per unit of score stripped them first (timm
    ResNet-50 at 2x: layer1 and layer2 cut to their cap while layer4 kept every channel; 2.28x fewer MACs for
    2.0x, latency efficiency 0.88). Weighed by the work it does, a unit is cheap to remove where its
    milliseconds are expensive per MAC, which is what latency-targeted pruning is for (the same run: 1.89x fewer
    MACs for 1.98x, efficiency 1.05)."""
    work = {r.name: sum(per_unit(macs, r.members).values()) for r in records}
    mean = sum(work.values()) / len(work) if work else 0.0
    return {name: w / mean for name, w in work.items()} if mean > 0 else {}
