"""What of a model can be pruned and what is held whole, and why: found from its graph, proved on a copy.

Every model goes through the same three checks, whatever its name:
- deriving a group's coupled channels may fail or not finish (Torch-Pruning on shifted windows, index maps
  through roll/partition reshapes, very large graphs): the group is held whole, with the error or the time
  budget as the reason;
- some couplings cannot shrink evenly (channel shuffles, attention whose head layout is not recognised,
  grouped convolutions reached through a concatenation or with group counts that do not nest): held whole,
  each with its reason. A grouped convolution whose channels are the group's own shrinks alike in every group:
  its units are channel positions, each removed from every group at once (`channel_groups`);
- the rest is proved: one unit of every group is removed on a copy of the model, which must still run and
  return logits of the same shape. Groups whose removal breaks the forward (attributes derived from a width,
  reshapes that need a multiple) are found by bisection and held whole with the error.
Held groups are listed with their share of the model's MACs in the filter_prune result, the log and the report.
"""

from __future__ import annotations

import copy
import functools
import hashlib
import json
import signal
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from stages._attention import HEAD_ATTRS, attention_modules, layout, qkv_indices, sync_attributes

GROUP_SECONDS = 20.0  # most time Torch-Pruning may take to derive one group before it is held whole


@dataclass
class Held:
    """A group kept at full width: its root layer, every conv/linear layer in it, why, and its MACs."""

    root: str
    reason: str
    kind: str
    layers: list[str] = field(default_factory=list)
    macs_share: float = 0.0

    def record(self) -> dict[str, Any]:
        out = asdict(self)
        out["layers"] = out["layers"][:12] + ([f"... {len(self.layers) - 12} more"] if len(self.layers) > 12 else [])
        return out


class GroupTimeout(Exception):
    """Deriving one group took longer than its budget."""


@contextmanager
def time_limit(seconds: float) -> Iterator[None]:
    """Raise GroupTimeout after `seconds` of the block (main thread only; elsewhere no limit is enforced)."""
    if threading.current_thread() is not threading.main_thread() or seconds <= 0:
        yield
        return

    def expire(signum: int, frame: Any) -> None:
        raise GroupTimeout(f"took more than {seconds:g} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def head_count_attr(mod: nn.Module) -> str | None:
    """The attribute that holds a module's head count, if it has one (any attention implementation)."""
    return next((a for a in HEAD_ATTRS if isinstance(getattr(mod, a, None), int) and getattr(mod, a) > 1), None)


def unrecognised_attention(model: nn.Module) -> dict[str, nn.Module]:
    """Modules with a head count whose heads this project cannot prune (not timm's fused-qkv layout)."""
    known = set(attention_modules(model).values())
    return {n: m for n, m in model.named_modules()
            if m not in known and not isinstance(m, nn.MultiheadAttention) and head_count_attr(m)
            and any(isinstance(c, (nn.Linear, nn.Conv2d, nn.Conv1d)) for c in m.modules())}


def every_attention(model: nn.Module) -> dict[str, nn.Module]:
    """Every module with a head count holding layers: the head-prunable ones and the rest (for reasons)."""
    return {**unrecognised_attention(model), **attention_modules(model)}


def inside_attention(producers: list[str], attention: dict[str, nn.Module]) -> str | None:
    """The unrecognised attention module that holds every producer of a group (its q/k/v widths), if any."""
    for name in attention:
        prefix = name + "."
        if producers and all(p.startswith(prefix) for p in producers):
            return name
    return None


def is_grouped(mod: nn.Module) -> bool:
    """A grouped convolution that is not depthwise: its channels may only shrink by the same positions in every
    group."""
    return isinstance(mod, nn.Conv2d | nn.Conv1d) and mod.groups > 1 and not (
        mod.groups == mod.in_channels == mod.out_channels)


def channel_groups(group) -> int | None:
    """How many channel groups a group's units come in: 1 when no member is a grouped convolution or a split into
    equal parts by one size (`torch.split(x, width, 1)`, `chunk`: the forward splits by one size again, so every
    part must keep the same width); G when every such member sees the group's channels as they are (no
    concatenation or slice between: its width on the pruned side is the root's, index for index) and every
    group or part count divides the largest, G; then removing position j of every one of G equal slices of the
    root's channels removes the same positions in each convolution group and each part, whichever of the nested
    counts a member has. None when the channels cannot shrink alike."""
    import torch_pruning as tp

    root = list(group[0].idxs)
    counts = set()
    for i, (dep, idxs) in enumerate(group):
        mod = dep.target.module
        if is_grouped(mod):
            out = dep.handler == tp.prune_conv_out_channels
            width, count = (mod.out_channels if out else mod.in_channels), mod.groups
        elif type(mod).__name__ == "_SplitOp" and (parts := split_parts(dep.target)) is not None:
            width, count = parts
        else:
            continue
        if width != len(root) or list(idxs) != list(group[i].root_idxs) or sorted(idxs) != list(range(width)):
            return None
        counts.add(count)
    if not counts:
        return 1
    largest = max(counts)
    return largest if all(largest % c == 0 for c in counts) and len(root) % largest == 0 else None


def grouped_channels(positions: list[int], width: int, groups: int) -> list[int]:
    """The channels of `width` that removing `positions` in each of `groups` equal slices removes."""
    size = width // groups
    return sorted(g * size + j for g in range(groups) for j in positions)


def module_macs(model: nn.Module, example: torch.Tensor) -> dict[str, float]:
    """MACs per module name (every level of nesting), from one forward of `example`."""
    from torch.utils.flop_counter import FlopCounterMode

    was = model.training
    model.eval()
    try:
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            model(example)
    finally:
        model.train(was)
    out = {}
    for key, ops in counter.get_flop_counts().items():
        name = key.partition(".")[2] if "." in key else ("" if key != "Global" else "<total>")
        out[name] = sum(ops.values()) / 2
    return out


def fill_shares(held: list[Held], macs: dict[str, float]) -> None:
    """Each held group's share of the model's MACs: the MACs of its layers."""
    total = macs.get("<total>") or 1.0
    for h in held:
        h.macs_share = round(sum(macs.get(layer, 0.0) for layer in h.layers) / total, 4)


# ------------------------------------------------------------------------------------------- unit removal


def owners_of_parameters(model: nn.Module) -> dict[int, tuple[nn.Module, str]]:
    """id(parameter) -> (the module that holds it directly, its attribute name)."""
    return {id(p): (m, n) for m in model.modules() for n, p in m.named_parameters(recurse=False)}


def sync_derived_attributes(changed_params: list[tuple[nn.Module, str, tuple]]) -> None:
    """After a group was pruned, a parameter outside any layer Torch-Pruning knows (a layer scale, a learned
    table) has fewer entries; plain attributes of its module that spelled the old width (a view shape) are
    updated to the new one, so that the module stays consistent with its weights. `changed_params` holds
    (module, attribute, shape before pruning) of each such parameter."""
    for mod, attr, old in changed_params:
        new = tuple(getattr(mod, attr).shape)  # pruning replaced the Parameter object
        if old == new:
            continue
        changed = {o: n for o, n in zip(old, new, strict=False) if o != n}
        for key, value in list(vars(mod).items()):
            if key.startswith("_") or isinstance(value, bool):
                continue
            if isinstance(value, int) and value in changed:
                setattr(mod, key, changed[value])
            elif isinstance(value, tuple | list) and any(isinstance(v, int) and v in changed for v in value):
                fixed = [changed.get(v, v) if isinstance(v, int) and not isinstance(v, bool) else v for v in value]
                setattr(mod, key, type(value)(fixed))


def _per_output_tensors(dg, group) -> list[tuple[nn.Module, int, list[int], list[str]]]:
    """The layers whose output channels a group removes, each with its width, the channels removed and the names
    of its own parameters and buffers other than weight and bias that hold one entry per output channel (a
    weight-standardised convolution's gain): Torch-Pruning cuts weight and bias only."""
    out = []
    for dep, idxs in group:
        mod = dep.target.module
        if not isinstance(mod, nn.Conv2d | nn.Conv1d | nn.Linear) or not dg.is_out_channel_pruning_fn(dep.handler):
            continue
        width = mod.out_channels if isinstance(mod, nn.Conv2d | nn.Conv1d) else mod.out_features
        names = [n for n, t in [*mod.named_parameters(recurse=False), *mod.named_buffers(recurse=False)]
                 if n not in ("weight", "bias") and t is not None and t.dim() >= 1 and t.shape[0] == width]
        if names:
            out.append((mod, width, sorted({int(i) for i in idxs}), names))
    return out


def _follow_outputs(extras: list[tuple[nn.Module, int, list[int], list[str]]]) -> None:
    """Cut each per-output-channel tensor of `_per_output_tensors` where its layer's outputs were cut."""
    for mod, width, removed, names in extras:
        now = mod.out_channels if isinstance(mod, nn.Conv2d | nn.Conv1d) else mod.out_features
        if now != width - len(removed):
            continue  # the layer was not cut as recorded: leave its tensors to the proof
        gone = set(removed)
        keep = torch.tensor([i for i in range(width) if i not in gone], dtype=torch.long)
        for name in names:
            old = getattr(mod, name)
            new = old.detach().index_select(0, keep.to(old.device)).clone()
            if isinstance(old, nn.Parameter):
                setattr(mod, name, nn.Parameter(new, requires_grad=old.requires_grad))
            else:
                mod.register_buffer(name, new, persistent=name not in mod._non_persistent_buffers_set)


def split_dim(node) -> int | None:
    """The dimension a split node of Torch-Pruning's graph split along, as its autograd record says: negative when
    the forward counted it from the end (autograd records it unsigned); None when the record does not say."""
    dim = getattr(getattr(node, "grad_fn", None), "_saved_dim", None)
    if not isinstance(dim, int):
        return None
    if dim >= 2**63:
        dim -= 2**64
    return dim if -64 < dim < 64 else None


def along_channels(dim: int | None) -> bool:
    """Whether Torch-Pruning maps indices through a split or concatenation along `dim` as channel indices:
    dimension 1, or one counted from the end (-1 on a channels-last tensor: the features a Linear layer reads).
    Where the dimension is not the channels after all, the proof finds the break."""
    return dim is not None and (dim == 1 or dim < 0)


def splits_channels(node) -> bool:
    """Whether a split node's indices are channel indices (`along_channels`): its part sizes must then follow
    the pruning."""
    return along_channels(split_dim(node))


def split_parts(node) -> tuple[int, int] | None:
    """The width a split by one size (`torch.split(x, n, dim)`, `chunk`) cut along the channels and into how many
    equal parts, which pruning must keep equal (the forward splits by one size again); None for any other split."""
    fn = getattr(node, "grad_fn", None)
    if fn is None or type(fn).__name__ != "SplitBackward0" or not splits_channels(node):
        return None
    sizes, part = getattr(fn, "_saved_self_sym_sizes", None), getattr(fn, "_saved_split_size", None)
    dim = split_dim(node)
    if not sizes or not isinstance(part, int) or part <= 0:
        return None
    width = int(sizes[dim])
    return (width, width // part) if width % part == 0 and width // part > 1 else None


def _removed_at(group, kind: str) -> dict[Any, tuple[Any, set[int]]]:
    """For each op of Torch-Pruning's kind `kind` ("_SplitOp", "_ConcatOp") the group's channels pass: its
    autograd node -> (its graph node, the indices the group removes there, over every dependency that reaches
    it). For both kinds they are indices of the full, unsplit or concatenated, tensor."""
    out: dict[Any, tuple[Any, set[int]]] = {}
    for dep, idxs in group:
        if type(dep.target.module).__name__ == kind:
            key = getattr(dep.target, "grad_fn", None)
            out.setdefault(key, (dep.target, set()))[1].update(int(i) for i in idxs)
    return out


def _parts_after(sizes: tuple[int, ...], removed: set[int]) -> tuple[int, ...]:
    """Each part's width once the removed indices (of the whole tensor) that fall in it are gone."""
    bounds = [sum(sizes[:k]) for k in range(len(sizes) + 1)]
    return tuple(size - sum(bounds[k] <= i < bounds[k + 1] for i in removed) for k, size in enumerate(sizes))


def _split_sizes_after(dg, group) -> list[tuple[Any, nn.Module, tuple[int, ...], tuple[int, ...], bool]]:
    """For each split by sizes the group's channels pass: its autograd node (the graph's key for it), the module
    whose forward splits, the sizes before and after the removal (each part loses the removed channels that fall
    in it), and whether it split by one size."""
    owners = getattr(dg, "split_owners", {})
    out = []
    for key, (node, removed) in _removed_at(group, "_SplitOp").items():
        owner = owners.get(key)
        if owner is None or not splits_channels(node):
            continue  # only a split along the channels: the group's indices there are channel indices
        mod, sizes = owner
        after = _parts_after(sizes, removed)
        if after != sizes:
            out.append((key, mod, sizes, after, split_parts(node) is not None))
    return out


def _concat_sizes_after(dg, group) -> list[tuple[Any, tuple[int, tuple[int, ...], tuple[Any, ...]]]]:
    """For each recorded concatenation the group's channels pass: its autograd node and its record with the part
    widths after the removal (see stages._graph._map_concat, which maps through them)."""
    cats = getattr(dg, "cat_sizes", {})
    out = []
    for key, (_, removed) in _removed_at(group, "_ConcatOp").items():
        if key in cats:
            dim, sizes, fns = cats[key]
            out.append((key, (dim, _parts_after(sizes, removed), fns)))
    return out


def _follow_split_sizes(dg, splits: list[tuple[Any, nn.Module, tuple[int, ...], tuple[int, ...], bool]]) -> None:
    """Set each splitting module's stored sizes to the sizes after the removal: a tuple or list of integers equal
    to the sizes it split by, or, for a split by one size into parts that stay equal (`channel_groups` removes the
    same positions from every part), an integer equal to the part size. Sizes the forward computes from other
    attributes are left to the proof. The graph's record of the split follows too, so that a later group of the
    same step maps its channels through the parts as they now are."""
    for key, mod, before, after, one in splits:
        dg.split_owners[key] = (mod, after)
        equal = one and len(set(before)) == 1 and len(set(after)) == 1
        for name, value in list(vars(mod).items()):
            if name.startswith("_") or isinstance(value, bool):
                continue
            if equal and isinstance(value, int) and value == before[0]:
                setattr(mod, name, after[0])
            elif (isinstance(value, tuple | list) and len(value) == len(before) and tuple(value) == before
                  and all(isinstance(v, int) and not isinstance(v, bool) for v in value)):
                setattr(mod, name, type(value)(after))


_UNBOUNDED = 2**62  # a slice's end past every width (x[:, a:] is recorded with end 2**63 - 1)


def _slice_moves(dg, group) -> list[tuple[Any, int, int, int, int]]:
    """(slice op, start, end, new start, new end) for every slice along the channels whose input tensor loses
    channels in the group, reached by the group or not (DPN's `x[:, self.num_1x1_c:]` beside `x[:, :self.num_1x1_c]`
    whose channels the group removes): each bound moves down by the removed channels before it."""
    removed: dict[Any, set[int]] = {}
    for dep, idxs in group:
        if dg.is_out_channel_pruning_fn(dep.handler):
            removed.setdefault(dep.target, set()).update(int(i) for i in idxs)
    if not hasattr(dg, "channel_slices"):  # once per graph: every group of a step scans them
        dg.channel_slices = [(op, node) for op, node in dg.module2node.items()
                             if type(op).__name__ == "_SliceOp" and op.dim == 1 and op.step == 1 and node.inputs]
    moves = []
    for op, node in dg.channel_slices:
        gone = removed.get(node.inputs[0])
        if not gone or op.start < 0 or op.end < 0:
            continue
        start = op.start - sum(i < op.start for i in gone)
        end = op.end - sum(i < op.end for i in gone) if op.end < _UNBOUNDED else op.end
        if (start, end) != (op.start, op.end):
            moves.append((op, op.start, op.end, start, end))
    return moves


def _follow_slices(dg, moves: list[tuple[Any, int, int, int, int]]) -> None:
    """Set each moved slice's bounds in the graph (Torch-Pruning's own update reads the removed indices in the
    slice's output frame as its input's), and each integer attribute of the module whose forward sliced that
    equals a bound that moved to where the bound moved (none where one module's bound of one value moved to two
    places: the proof finds that). Bounds the forward computes from other attributes are left to the proof."""
    owners = getattr(dg, "slice_owners", {})
    changes: dict[int, tuple[nn.Module, dict[int, int], set[int]]] = {}
    for op, start, end, new_start, new_end in moves:
        op.start, op.end = new_start, new_end
        mod = owners.get(op.grad_fn)
        if mod is None:
            continue
        _, moved, clash = changes.setdefault(id(mod), (mod, {}, set()))
        for old, new in ((start, new_start), (end, new_end)):
            if old != new and 0 < old < _UNBOUNDED:
                if moved.get(old, new) != new:
                    clash.add(old)
                moved[old] = new
    for mod, moved, clash in changes.values():
        for key, value in list(vars(mod).items()):
            if (not key.startswith("_") and isinstance(value, int) and not isinstance(value, bool)
                    and value in moved and value not in clash):
                setattr(mod, key, moved[value])


def prune_group(dg, module: nn.Module, handler, idxs: list[int], model: nn.Module,
                attention: nn.Module | None = None) -> bool:
    """Prune `idxs` of the group rooted at `module` (fresh from the graph, so never stale); keep derived
    attributes true (head counts, layer-scale view shapes). Returns whether the group was pruned."""
    group = dg.get_pruning_group(module, handler, idxs=idxs)
    if not dg.check_pruning_group(group):
        return False
    before = layout(attention) if attention is not None else None
    owners = owners_of_parameters(model)
    loose = [(*owners[id(dep.target.module)], tuple(dep.target.module.shape)) for dep, _ in group
             if isinstance(dep.target.module, nn.Parameter) and id(dep.target.module) in owners]
    extras = _per_output_tensors(dg, group)
    splits = _split_sizes_after(dg, group)
    cats = _concat_sizes_after(dg, group)
    slices = _slice_moves(dg, group)
    group.prune()
    if cats:
        dg.cat_sizes.update(cats)
    _follow_slices(dg, slices)
    _follow_outputs(extras)
    _follow_split_sizes(dg, splits)
    sync_derived_attributes(loose)
    if before is not None:
        sync_attributes(attention, before)
    return True


# ------------------------------------------------------------------------------------------- the proof


def spread_units(width: int) -> list[int]:
    """A few units to remove from a width: a contiguous run at the start plus units spread to the end, odd and
    even. An index map that is wrong through a reshape, slice or concatenation shows with such a set, where a
    single index at 0 (or only even ones) often maps right by luck."""
    units = {0, 1, 2, width // 3, width // 2 + 1, width - 1} if width > 8 else {0}
    return sorted(u for u in units if u < width - 1 or width > 8)


def _logits(out: Any) -> torch.Tensor:
    return out if isinstance(out, torch.Tensor) else next(t for t in out if isinstance(t, torch.Tensor))


def groups_by_root(model: nn.Module, dg, roots: list[str]) -> dict[str, int]:
    """Each root's channel groups (see channel_groups; 1 where none) in `model` as `dg` was built on it, before any
    removal: a grouped convolution that loses output positions can become depthwise, and the graph's handlers (and
    a count taken then) would not know. Empty when the model has no grouped convolution and no split into equal
    parts."""
    if not any(is_grouped(m) for m in model.modules()) and not any(
            type(op).__name__ == "_SplitOp" and split_parts(node) for op, node in dg.module2node.items()):
        return {}
    modules = dict(model.named_modules())
    found = []
    for name in roots:
        mod = modules[name]
        pruner = dg.get_pruner_of_module(mod)
        if pruner is not None and (width := pruner.get_out_channels(mod)) > 1:
            found.append((name, mod, None, dg.get_pruning_group(mod, pruner.prune_out_channels, list(range(width)))))
    return groups_of_found(model, found)


def groups_of_found(model: nn.Module, found: list[tuple[str, nn.Module, Any, Any]]) -> dict[str, int]:
    """groups_by_root from the full-width groups a graph's `groups` already derived (no graph work)."""
    if not any(is_grouped(m) for m in model.modules()) and not any(
            type(dep.target.module).__name__ == "_SplitOp" and split_parts(dep.target)
            for _, _, _, group in found for dep, _ in group):
        return {}
    heads = {layout(m).root for m in attention_modules(model).values()}
    return {name: channel_groups(group) or 1 for name, module, _, group in found
            if module not in heads and len(group[0].idxs) > 1}


def spread_copy(model: nn.Module, example: torch.Tensor, roots: list[str], build_graph,
                groups_of: dict[str, int] | None = None) -> nn.Module:
    """A copy of the model with a few spread units (one head) of each named group removed: what the proof runs
    and `compress inspect` exports. `groups_of` is groups_by_root of the model (computed here when not given: the
    proof computes it once for all its trials)."""
    trial = copy.deepcopy(model).eval()
    dg = build_graph(trial, example)
    if groups_of is None:
        groups_of = groups_by_root(trial, dg, roots)
    remove_spread(trial, dg, roots, groups_of)
    return trial


def remove_spread(trial: nn.Module, dg, roots: list[str], groups_of: dict[str, int],
                  coupled: dict[str, list[str]] | None = None) -> None:
    """Remove a few spread units (one head) of each named group of `trial`, in place, through `dg` (its graph).
    A root in `coupled` loses one joint unit with the head roots it names (`remove_joint_unit`); those head roots
    are not removed from alone."""
    modules = dict(trial.named_modules())
    heads = {layout(m).root: m for m in attention_modules(trial).values()}
    coupled = coupled or {}
    with_residual = {h for hs in coupled.values() for h in hs}
    for name in roots:
        if name in with_residual:
            continue
        if name in coupled:
            remove_joint_unit(trial, dg, name, coupled[name])
            continue
        mod = modules[name]
        pruner = dg.get_pruner_of_module(mod)
        if mod in heads:
            attention = heads[mod]
            if getattr(attention, layout(attention).heads_attr) > 1:
                prune_group(dg, mod, pruner.prune_out_channels, qkv_indices(attention, [0]), trial, attention)
        elif (width := pruner.get_out_channels(mod)) > 1:
            groups = groups_of.get(name, 1)  # remove the same positions of every convolution group
            units = grouped_channels(spread_units(width // groups), width, groups) if groups > 1 else \
                spread_units(width)
            prune_group(dg, mod, pruner.prune_out_channels, units, trial)


# ------------------------------------------------------------------------------ widths that shrink only together
#
# An attention can tie its heads to the residual width it is fed: MetaFormer's reshapes its heads' output to
# (B, N, C) with C read from its input, so removing heads alone, or residual channels alone, breaks the forward,
# and the proof holds both. They can still shrink together: head_dim channels of the residual and one head of
# every attention it feeds (all of them have heads x head_dim == the residual's width). Such a joint unit is
# proved on a copy like any other (one removed must still run), and the groups are then pruned as one record
# (`_pruning.GroupRecord.joint`): scored, planned and applied together, never one without the others.


def joint_channels(width: int, head_dim: int) -> list[int]:
    """One joint unit's residual channels for a trial: head_dim channels spread over the width."""
    step = width / head_dim
    return sorted({int(i * step) for i in range(head_dim)})


def remove_joint(dg, module: nn.Module, handler, channels: list[int],
                 attentions: list[tuple[nn.Module, list[int]]], model: nn.Module) -> bool:
    """Remove `channels` of the residual group rooted at `module` and, through the same graph, the given heads of
    each attention it feeds. False (nothing removed) when the residual group cannot lose those channels."""
    if not prune_group(dg, module, handler, channels, model):
        return False
    for attention, heads in attentions:
        root = layout(attention).root
        if not prune_group(dg, root, dg.get_pruner_of_module(root).prune_out_channels,
                           qkv_indices(attention, heads), model, attention):
            raise RuntimeError(f"{type(attention).__name__}: removing heads {heads} of its "
                               f"{getattr(attention, layout(attention).heads_attr)} was refused after the "
                               "residual channels they are tied to were removed")
    return True


def remove_joint_unit(model: nn.Module, dg, root: str, head_roots: list[str]) -> None:
    """Remove one joint unit (head_dim spread channels of the residual group at `root`, the middle head of each
    attention whose head group is rooted at one of `head_roots`) from `model`, in place, through `dg`."""
    names = {m: n for n, m in model.named_modules()}
    by_root = {names.get(layout(a).root): a for a in attention_modules(model).values()}
    attentions = [by_root[h] for h in head_roots]
    mod = model.get_submodule(root)
    pruner = dg.get_pruner_of_module(mod)
    d = layout(attentions[0]).head_dim
    remove_joint(dg, mod, pruner.prune_out_channels, joint_channels(pruner.get_out_channels(mod), d),
                 [(a, [getattr(a, layout(a).heads_attr) // 2]) for a in attentions], model)


def _fed_heads(model: nn.Module, dg, root: str, heads: dict[str, nn.Module]) -> list[str] | None:
    """The head roots (of `heads`: root path -> attention) whose attentions read the residual group at `root`,
    when one joint unit can be defined for them: one head dim d, each with more than one head, and
    heads x d equal to the residual's width. None otherwise."""
    mod = model.get_submodule(root)
    pruner = dg.get_pruner_of_module(mod)
    width = pruner.get_out_channels(mod) if pruner is not None else None
    if not width:
        return None
    try:
        group = dg.get_pruning_group(mod, pruner.prune_out_channels, list(range(width)))
    except Exception:  # noqa: BLE001 - a group the graph cannot derive stays held
        return None
    readers = {dep.target.module for dep, _ in group if not dg.is_out_channel_pruning_fn(dep.handler)}
    fed = [h for h, a in heads.items() if readers.intersection(layout(a).inputs)]
    if not fed:
        return None
    dims = {layout(heads[h]).head_dim for h in fed}
    counts = [getattr(heads[h], layout(heads[h]).heads_attr) for h in fed]
    if len(dims) != 1 or min(counts) < 2 or any(c * next(iter(dims)) != width for c in counts):
        return None
    return fed


def find_couplings(model: nn.Module, example: torch.Tensor, broken: dict[str, str], build_graph,
                   expected: tuple) -> dict[str, list[str]]:
    """Residual root -> the head roots it can shrink with, among the groups the proof held (`broken`): for each
    held residual group that feeds held attention heads whose count times head dim is its width, one joint unit
    is removed on a copy, which must still run and return logits of `expected` shape."""
    if not broken:
        return {}
    names = {m: n for n, m in model.named_modules()}
    attentions = {names.get(layout(a).root): a for a in attention_modules(model).values()}
    held_heads = [h for h in broken if h in attentions]
    residual = [r for r in broken if r not in attentions]
    if not held_heads or not residual:
        return {}
    work = copy.deepcopy(model).eval()
    dg = build_graph(work, example)
    work_names = {m: n for n, m in work.named_modules()}
    heads = {work_names[layout(a).root]: a for a in attention_modules(work).values()
             if work_names[layout(a).root] in held_heads}
    found: dict[str, list[str]] = {}
    for root in residual:
        fed = _fed_heads(work, dg, root, heads)
        if fed is None:
            continue
        try:
            trial = copy.deepcopy(model).eval()
            remove_joint_unit(trial, build_graph(trial, example), root, fed)
            with torch.no_grad():
                out = _logits(trial(example))
        except Exception:  # noqa: BLE001 - a joint unit that breaks the model leaves both held, as proved
            continue
        if tuple(out.shape) == expected:
            found[root] = fed
            for h in fed:
                heads.pop(h)
    return found


_CONTAINERS = (list, dict, set)  # copied with their own .copy() (an OrderedDict stays one)


def _module_state(mod: nn.Module) -> tuple[dict[str, Any], list[tuple[torch.Tensor, torch.Tensor]]]:
    """What pruning can change on one module: its attributes (containers copied: a list of split sizes can be
    edited in place) and the data of its parameters and buffers (a loose parameter is cut by replacing .data)."""
    attrs = {k: v.copy() if isinstance(v, _CONTAINERS) else v for k, v in vars(mod).items()}
    tensors = [(t, t.data) for t in [*mod._parameters.values(), *mod._buffers.values()] if t is not None]
    return attrs, tensors


def _structure_print(modules: list[nn.Module]) -> list[Any]:
    """Every module's parameter and buffer shapes and plain attributes, in their order: what must be the same
    after an undo."""
    out = []
    for mod in modules:
        shapes = [(n, t.shape) for n, t in [*mod._parameters.items(), *mod._buffers.items()] if t is not None]
        attrs = [(k, p) for k, v in vars(mod).items() if not k.startswith("_") and (p := _plain(v)) is not None]
        out.append((type(mod), shapes, attrs, list(mod._modules)))
    return out


class _Bench:
    """One working copy of the model and one graph traced on it, for all the trials of a proof: each trial removes
    its units from the copy in place and is then undone (every module's attributes, including the graph's own
    split and concatenation records and the split sizes it traced, the graph's nodes of loose parameters, and
    the data of every parameter and buffer put back). A fresh deep copy and
    trace per trial cost two thirds of the proof. After each undo the copy's structure is compared with the
    first; on any difference (something an undo does not reach) the bench is given up and the remaining trials
    take fresh copies."""

    def __init__(self, model: nn.Module, example: torch.Tensor, build_graph) -> None:
        self.model = copy.deepcopy(model)
        self.dg = build_graph(self.model, example)
        self.model.eval()
        mods = list(self.model.modules())
        seen = {id(m) for m in mods}
        mods += [m for m in self.dg.module2node if isinstance(m, nn.Module) and id(m) not in seen]
        self.modules = mods
        self.saved = [_module_state(m) for m in mods]
        self.owners = dict(getattr(self.dg, "split_owners", {}))
        self.cats = dict(getattr(self.dg, "cat_sizes", {}))
        # pruning a loose parameter (a layer scale) replaces it with a new one in the graph too: its node, and
        # the graph's maps from module to node and from parameter to name, point to the pruned one after
        self.nodes = dict(self.dg.module2node)
        self.node_modules = [(node, node.module) for node in self.dg.module2node.values()]
        self.param_names = dict(getattr(self.dg, "_param_to_name", {}))
        self.print = _structure_print(mods)
        self.sound = True

    def undo(self) -> None:
        for mod, (attrs, tensors) in zip(self.modules, self.saved, strict=True):
            state = mod.__dict__
            state.clear()
            state.update({k: v.copy() if isinstance(v, _CONTAINERS) else v for k, v in attrs.items()})
            for t, data in tensors:
                if t.data is not data:
                    t.data = data
                t.grad = None
        for node, module in self.node_modules:
            node.module = module
        for records, saved in ((getattr(self.dg, "split_owners", None), self.owners),
                               (getattr(self.dg, "cat_sizes", None), self.cats),
                               (self.dg.module2node, self.nodes),
                               (getattr(self.dg, "_param_to_name", None), self.param_names)):
            if records is not None:
                records.clear()
                records.update(saved)
        self.sound = _structure_print(self.modules) == self.print


def _trial(model: nn.Module, example: torch.Tensor, roots: list[str], build_graph, expected: tuple,
           groups_of: dict[str, int] | None = None, bench: _Bench | None = None) -> str | None:
    """None when the spread copy still runs with an output of the same shape, else the error. With a sound
    `bench`, the units are removed from its copy and undone after; else from a fresh copy."""
    try:
        if bench is not None and bench.sound:
            try:
                remove_spread(bench.model, bench.dg, roots, groups_of or {})
                with torch.no_grad():
                    out = _logits(bench.model(example))
            finally:
                bench.undo()
        else:
            trial = spread_copy(model, example, roots, build_graph, groups_of)
            with torch.no_grad():
                out = _logits(trial(example))
    except Exception as exc:  # noqa: BLE001 - any failure of the pruned copy is what this looks for
        text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        return f"{type(exc).__name__}: {text}"[:240]
    if tuple(out.shape) != expected:
        return f"the output changed shape from {list(expected)} to {list(out.shape)}"
    return None


# Bumped whenever what a proof entry means changes (the key also covers this package's pruning code).
PROOF_CACHE_VERSION = 2


class Proof(dict):
    """`prove`'s outcome: root name -> the error, for every group whose removal alone breaks the model; and
    `coupled`, residual root -> the head roots it can shrink with (`find_couplings`). The roots of a coupling are
    in the dict too (none of them can shrink alone): a caller that prunes jointly takes them out."""

    def __init__(self, broken: dict[str, str], coupled: dict[str, list[str]] | None = None) -> None:
        super().__init__(broken)
        self.coupled = {k: list(v) for k, v in (coupled or {}).items()}

    def held(self) -> dict[str, str]:
        """The roots to hold whole: the broken ones outside every coupling."""
        joint = {n for root, heads in self.coupled.items() for n in (root, *heads)}
        return {k: v for k, v in self.items() if k not in joint}


_PRIMITIVE = (bool, int, float, str, type(None))


def _plain(value: Any) -> Any:
    """An attribute as the key sees it: numbers, strings and tuples or lists of them; anything else is left out
    (an object's repr can carry a memory address, which would make every key new)."""
    if isinstance(value, _PRIMITIVE):
        return value
    if isinstance(value, (tuple, list)) and all(isinstance(v, _PRIMITIVE) for v in value):
        return list(value)
    return None


@functools.cache
def _code_digest() -> str:
    """sha256 of this package's pruning code (every stages/*.py): a proof made by other code is never reused."""
    from pathlib import Path

    h = hashlib.sha256()
    for path in sorted(Path(__file__).parent.glob("*.py")):
        h.update(path.name.encode() + path.read_bytes())
    return h.hexdigest()


@functools.cache
def _distributions() -> dict[str, list[str]]:
    """Top-level import name -> the installed distributions that provide it, as importlib's
    packages_distributions() gives, read from each distribution's top_level.txt or the .py paths of its RECORD
    (packages_distributions builds a path object for every installed file: seconds of every proof's key)."""
    from importlib import metadata

    out: dict[str, set[str]] = {}
    for dist in metadata.distributions():
        name = dist.metadata["Name"]
        text = dist.read_text("top_level.txt")
        if text is not None:
            tops = set(text.split())
        else:
            tops = set()
            for line in (dist.read_text("RECORD") or "").splitlines():
                path = line.split(",", 1)[0]
                if path.endswith(".py"):
                    parts = path.split("/")
                    tops.add(parts[0] if len(parts) > 1 else parts[0][:-3])
        for top in tops:
            out.setdefault(top, set()).add(name)
    return {top: sorted(names) for top, names in out.items()}


def proof_key(model: nn.Module, example: torch.Tensor, roots: list[str]) -> str | None:
    """What a proof's outcome depends on, digested: the module tree and every module's class (with its source
    file and its package's version), methods replaced on an instance, plain attributes (stored widths, split sizes,
    head counts), parameter and buffer shapes, the input's shape, type and device, the roots tried, and the
    versions of torch, Torch-Pruning and this package's pruning code. None (nothing is cached) when a source cannot
    be read or a module has forward hooks."""
    import inspect
    from importlib import metadata

    h = hashlib.sha256(f"v{PROOF_CACHE_VERSION}|{_code_digest()}|{tuple(example.shape)}|{example.dtype}|"
                       f"{example.device.type}|{roots}".encode())
    for dist in ("torch", "torch-pruning"):
        h.update(f"{dist}={metadata.version(dist)}|".encode())
    files: dict[str, str] = {}

    def source(obj: Any) -> str | None:
        """sha256 of the whole file that defines obj (its helper functions too), with its package's version."""
        where = getattr(obj, "__module__", None)
        if where not in files:
            try:
                text = inspect.getsource(sys.modules[where])
            except (KeyError, OSError, TypeError):
                return None
            top = where.split(".")[0]
            dists = _distributions().get(top, [])
            versions = ",".join(f"{d}={metadata.version(d)}" for d in sorted(set(dists)))
            files[where] = hashlib.sha256(f"{versions}|{text}".encode()).hexdigest()
        return files[where]

    for name, module in model.named_modules():
        if module._forward_hooks or module._forward_pre_hooks:  # a hook can change what the forward does
            return None
        cls = type(module)
        code = source(cls)
        if code is None:
            return None
        attrs, own = {}, []
        for k, v in sorted(vars(module).items()):
            if callable(v) and not isinstance(v, nn.Module):  # a method replaced on the instance
                code_of = source(v)
                if code_of is None:
                    return None
                own.append([k, getattr(v, "__qualname__", type(v).__qualname__), code_of])
            elif not k.startswith("_") and k != "training" and _plain(v) is not None:
                attrs[k] = _plain(v)
        h.update(json.dumps([name, cls.__module__, cls.__qualname__, code, attrs, own]).encode())
        for pname, tensor in [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]:
            if tensor is not None:
                h.update(f"{pname}:{tuple(tensor.shape)}:{tensor.dtype}|".encode())
    return h.hexdigest()


def _proof_path(key: str):
    from core.cache import cache_root

    return cache_root() / "structure" / f"{key[:40]}.json"


def _cached_proof(key: str | None) -> dict[str, str] | None:
    if key is None:
        return None
    try:
        data = json.loads(_proof_path(key).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or data.get("key") != key or not isinstance(data.get("broken"), dict) \
            or not isinstance(data.get("coupled"), dict):
        return None
    return Proof(data["broken"], data["coupled"])


def _store_proof(key: str | None, broken: Proof, seconds: float) -> None:
    if key is None:
        return
    from core.rundir import atomic_json

    try:
        atomic_json(_proof_path(key), {"key": key, "broken": dict(broken), "coupled": broken.coupled,
                                       "seconds": round(seconds, 2)})
    except Exception:  # noqa: BLE001 - a cache that cannot be written only costs the next run the proof again
        pass


def prove(model: nn.Module, example: torch.Tensor, roots: list[str], build_graph,
          budget_s: float = 600.0, groups_of: dict[str, int] | None = None) -> Proof:
    """Root name -> the error, for every group whose one-unit removal breaks the model (bisection on copies),
    with the couplings among them that shrink jointly (`Proof.coupled`, `find_couplings`).

    The outcome is kept in the cache ($COMPRESS_CACHE_DIR/structure) under proof_key, so that `compress inspect`
    and the run's first pruning step share one proof; a proof cut short by its time budget is not kept.
    `prove.last_cached` says whether the last call's outcome came from the cache."""
    key = proof_key(model, example, roots)
    hit = _cached_proof(key)
    prove.last_cached = hit is not None
    if hit is not None:
        return hit
    t0 = time.monotonic()
    broken = _prove(model, example, roots, build_graph, budget_s, groups_of)
    if broken and time.monotonic() - t0 < budget_s:
        with torch.no_grad():
            expected = tuple(_logits(model.eval()(example)).shape)
        broken = Proof(broken, find_couplings(model, example, broken, build_graph, expected))
    else:
        broken = Proof(broken)
    if time.monotonic() - t0 < budget_s:
        _store_proof(key, broken, time.monotonic() - t0)
    return broken


prove.last_cached = False


def _prove(model: nn.Module, example: torch.Tensor, roots: list[str], build_graph, budget_s: float,
           groups_of: dict[str, int] | None) -> dict[str, str]:
    with torch.no_grad():
        expected = tuple(_logits(model.eval()(example)).shape)
    broken: dict[str, str] = {}
    deadline = time.monotonic() + budget_s
    try:
        bench = _Bench(model, example, build_graph)
    except Exception:  # noqa: BLE001 - the trials take fresh copies, and the first says what fails
        bench = None
    if groups_of is None:  # once for every trial below (empty at once where nothing is grouped or split equally)
        groups_of = groups_by_root(bench.model, bench.dg, roots) if bench is not None else \
            groups_by_root(model, build_graph(model, example), roots)

    def search(names: list[str], known_error: str | None = None) -> None:
        if not names:
            return
        error = known_error or _trial(model, example, names, build_graph, expected, groups_of, bench)
        if error is None:
            return
        if len(names) == 1 or time.monotonic() > deadline:
            for n in names:  # past the budget, the rest of a failing half is held together
                broken[n] = error
            return
        half = len(names) // 2
        search(names[:half])
        search(names[half:])

    search(list(roots))
    return broken


def runs(model: nn.Module, example: torch.Tensor) -> str | None:
    """None when the model runs on `example`, else the error (one line)."""
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(example)
    except Exception as exc:  # noqa: BLE001
        return f"{type(exc).__name__}: {str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ''}"
    finally:
        model.train(was)
    return None


def restore(model: nn.Module, snapshot: nn.Module) -> None:
    """Make `model` (the same object the caller holds) what `snapshot` was: every submodule, parameter, buffer and
    attribute, the root module's included."""
    model.__dict__.clear()
    model.__dict__.update(snapshot.__dict__)


def plan_breaks(model: nn.Module, example: torch.Tensor, records: dict[str, Any], plan: dict[str, list[int]],
                build_graph, paths: dict[str, str]) -> dict[str, str]:
    """Which planned roots break `model` when their planned units are removed (bisection on copies). `paths` gives
    each record's root module path in `model` (the records may hold modules of another copy)."""

    def trial(subset: list[str]) -> str | None:
        copy_ = copy.deepcopy(model).eval()
        dg = build_graph(copy_, example)
        for name in subset:
            rec = records[name]
            module = copy_.get_submodule(paths[name])
            if rec.joint is not None:
                attentions = [copy_.get_submodule(path) for path, _, _ in rec.joint.attentions]
            else:
                attentions = [copy_.get_submodule(name) if rec.attention is not None else None]
            rec.remove(dg, module, plan[name], copy_, attentions)
        return runs(copy_, example)

    broken: dict[str, str] = {}

    def search(subset: list[str]) -> None:
        error = trial(subset) if subset else None
        if error is None:
            return
        if len(subset) == 1:
            broken[subset[0]] = error
            return
        search(subset[: len(subset) // 2])
        search(subset[len(subset) // 2:])

    search(list(records))
    return broken
