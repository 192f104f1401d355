"""One pruning step: one dependency graph, scored groups, aligned removals, applied root by root."""

from __future__ import annotations

import math
import warnings
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch_pruning as tp
from torch import nn

from stages._attention import attention_modules, qkv_indices, sync_attributes
from stages._criteria import Criterion
from stages._training import tracing_mode


@dataclass
class GroupRecord:
    """A prunable group: its root layer (by name), pruning function, current width and unit scores.

    For attention heads the root is the attention module's qkv, the width counts heads, `unit` is the
    head dimension (features per head) and `attention` the module whose attributes follow the weights.
    """

    name: str
    module: nn.Module
    handler: object
    width: int
    scores: torch.Tensor
    unit: int = 1
    attention: nn.Module | None = None

    def align(self, round_to: int) -> int:
        """Width alignment of this record's chunks: round_to channels, or one whole head."""
        return 1 if self.attention is not None else round_to


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


@contextmanager
def _recording_output_layers(model: nn.Module, found: list[nn.Module]):
    """Collect into `found` the conv/linear layers whose output tensor (or a view of it) the forward returns."""
    produced: list[tuple[nn.Module, torch.Tensor]] = []
    handles = [m.register_forward_hook(lambda mod, i, out: produced.append((mod, out)))
               for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    returned: list[torch.Tensor] = []
    try:
        yield returned
    finally:
        for h in handles:
            h.remove()
    ptrs = {(t.untyped_storage().data_ptr(), t.numel()) for t in returned}
    found += [m for m, t in produced if (t.untyped_storage().data_ptr(), t.numel()) in ptrs]


_UNMAPPED = "_idap_unmapped"  # set on reshape ops whose channel index mapping Torch-Pruning cannot derive


@contextmanager
def _marking_unmapped_reshapes():
    """Torch-Pruning derives channel index maps through reshapes by shape arithmetic, which fails on channel
    shuffles (view to groups, transpose, view back). Such a reshape is marked instead of failing the build,
    and every group that passes through it is left unpruned (`crosses_unmapped`)."""
    from torch_pruning.dependency import index_mapping

    original = index_mapping.update_reshape_index_mapping

    def guarded(graph, node) -> None:
        if _is_channel_shuffle(node):
            setattr(node.module, _UNMAPPED, True)
            return
        try:
            original(graph, node)
        except ZeroDivisionError:
            setattr(node.module, _UNMAPPED, True)

    index_mapping.update_reshape_index_mapping = guarded
    try:
        yield
    finally:
        index_mapping.update_reshape_index_mapping = original


def _kind(node) -> str:
    return type(getattr(node, "grad_fn", None)).__name__


def _is_channel_shuffle(node) -> bool:
    """A reshape at either end of reshape -> transpose/permute (-> copies) -> reshape: the channels come out
    interleaved, so no 1:1 index map exists through it."""
    from torch_pruning import ops

    if node.type != ops.OPTYPE.RESHAPE:
        return False

    def reaches(n, side: str, transposed: bool, depth: int) -> bool:
        for nxt in getattr(n, side):
            if nxt.type == ops.OPTYPE.RESHAPE:
                if transposed:
                    return True
                continue
            kind = _kind(nxt)
            is_t = kind.startswith(("TransposeBackward", "PermuteBackward"))
            if depth < 3 and (is_t or kind.startswith(("CloneBackward", "ContiguousBackward"))):
                if reaches(nxt, side, transposed or is_t, depth + 1):
                    return True
        return False

    return reaches(node, "outputs", False, 0) or reaches(node, "inputs", False, 0)


def crosses_unmapped(group) -> bool:
    """True when the group's channels pass a reshape whose index mapping is unknown (e.g. a channel shuffle)."""
    return any(getattr(dep.target.module, _UNMAPPED, False) or getattr(dep.source.module, _UNMAPPED, False)
               for dep, _ in group)


def touches_grouped_conv(group) -> bool:
    """True when a member is a grouped conv that is not depthwise: its channels may only shrink by the same
    count in every group, which Torch-Pruning's graph does not do, so such groups keep their width."""
    return any(isinstance(m, nn.Conv2d) and m.groups > 1 and not (m.groups == m.in_channels == m.out_channels)
               for m in (dep.target.module for dep, _ in group))


class _Graph(tp.DependencyGraph):
    """Torch-Pruning's graph; index maps (re-derived on every group request) mark unmapped reshapes."""

    def build_dependency(self, *args, **kwargs):
        with _marking_unmapped_reshapes():
            return super().build_dependency(*args, **kwargs)

    def get_pruning_group(self, *args, **kwargs):
        with _marking_unmapped_reshapes():
            return super().get_pruning_group(*args, **kwargs)

    def get_all_groups(self, ignored_layers=(), root_module_types=(nn.Conv2d, nn.Linear)):
        """Every group with full indices, once each, rooted at its first producer. A root whose index maps
        Torch-Pruning cannot derive (channels routed through chunk + shuffle) is skipped, not fatal."""
        ignored = set(ignored_layers) | set(self.IGNORED_LAYERS_IN_TRACING)
        covered: set[nn.Module] = set()
        for module in list(self.module2node):
            if module in ignored or module in covered or not isinstance(module, tuple(root_module_types)):
                continue
            pruner = self.get_pruner_of_module(module)
            width = pruner.get_out_channels(module) if pruner is not None else None
            if width is None:
                continue
            try:
                group = self.get_pruning_group(module, pruner.prune_out_channels, list(range(width)))
            except (IndexError, ZeroDivisionError):
                covered.add(module)
                continue
            producers = [dep.target.module for dep, _ in group if self.is_out_channel_pruning_fn(dep.handler)]
            covered.update(producers)
            if not ignored.intersection(producers):
                yield group


def build_graph(model: nn.Module, example: torch.Tensor) -> tp.DependencyGraph:
    """The step's single dependency graph, traced in training mode (auxiliary heads included). Its
    `output_layers` are the layers whose output the model returns, found in the same forward pass."""
    graph = _Graph()
    graph.output_layers = []

    def forward(m: nn.Module, x: torch.Tensor):
        # Torch-Pruning switches the model to eval mode before calling this
        with tracing_mode(m), _recording_output_layers(m, graph.output_layers) as returned:
            out = m(x)
            returned += [out] if isinstance(out, torch.Tensor) else [t for t in out if isinstance(t, torch.Tensor)]
        return out

    with tracing_mode(model), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*[Uu]nwrapped parameters.*")
        return graph.build_dependency(model, example_inputs=example, forward_fn=forward)


def score_groups(dg: tp.DependencyGraph, model: nn.Module, criterion: Criterion,
                 ignored: list[nn.Module]) -> list[GroupRecord]:
    """Score every prunable group of the graph with the criterion."""
    names = {m: n for n, m in model.named_modules()}
    heads = {m.qkv: (n, m) for n, m in attention_modules(model).items()}
    records = []
    for group in dg.get_all_groups(ignored_layers=ignored, root_module_types=(nn.Conv2d, nn.Linear)):
        root = group[0].dep.target.module
        handler = group[0].dep.handler
        if not dg.is_out_channel_pruning_fn(handler) or crosses_unmapped(group) or touches_grouped_conv(group):
            continue
        if root in heads:
            name, attention = heads[root]
            scores = criterion.heads(name, attention, group)
            if scores is not None and attention.num_heads > 1:
                records.append(GroupRecord(name, root, handler, attention.num_heads, scores.detach().float().cpu(),
                                           unit=attention.head_dim, attention=attention))
            continue
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
    for kind in (False, True):
        pool_records = [r for r in records if (r.attention is not None) == kind]
        want = math.ceil(fraction * sum(r.width for r in pool_records))
        pool = sorted(((score, k, r.name, idx) for r in pool_records for k, (score, idx) in enumerate(chunks[r.name])),
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
        features = qkv_indices(rec.attention, idxs) if rec.attention is not None else sorted(idxs)
        group = dg.get_pruning_group(rec.module, rec.handler, idxs=features)
        if dg.check_pruning_group(group):
            group.prune()
            removed += len(idxs) * rec.unit
            if rec.attention is not None:
                sync_attributes(rec.attention)
    return removed
