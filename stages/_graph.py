"""The dependency graph of one pruning step: Torch-Pruning's, traced in training mode, with its index maps
guarded and its groups enumerated once each under a time budget, with every group it cannot prune held whole."""

from __future__ import annotations

import warnings
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch_pruning as tp
from torch import nn

from stages._attention import attention_modules, layout
from stages._structure import (
    GROUP_SECONDS,
    GroupTimeout,
    Held,
    along_channels,
    channel_groups,
    head_count_attr,
    inside_attention,
    splits_channels,
    time_limit,
    unrecognised_attention,
)
from stages._training import tracing_mode


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


_UNMAPPED = "_idap_unmapped"  # set on ops whose channel index mapping Torch-Pruning cannot derive
_MAPPINGS = ("update_concat_index_mapping", "update_split_index_mapping", "update_reshape_index_mapping",
             "update_unbind_index_mapping", "update_expand_index_mapping", "update_slice_index_mapping")


class IndexExplosion(RuntimeError):
    """An index map turned a group's channels into more indices than any layer of the model has."""


def _true_splits(graph) -> None:
    """Give every split Torch-Pruning's index maps read its true parts: the consumers in the order of the parts
    they read (`_order_split_outputs`) and the part sizes the tracing forward saw (`build_graph`'s split_owners;
    Torch-Pruning infers an equal-size split's parts from its consumers, and got 104, 26, 26, 26 for four parts
    of 26). A split whose parts cannot be told apart is marked unmapped: its groups are held."""
    owners = getattr(graph, "split_owners", {})
    for node in graph.module2node.values():
        if type(node.module).__name__ != "_SplitOp" or getattr(node.module, _UNMAPPED, False):
            continue
        if not _order_split_outputs(node):
            setattr(node.module, _UNMAPPED, True)
            continue
        found = owners.get(getattr(node, "grad_fn", None))
        # only a split Torch-Pruning maps as channels: another dimension's sizes would be read as channel counts
        # where a concatenation's widths are inferred
        if found is not None and splits_channels(node):
            sizes = list(found[1])
            node.module.split_sizes = sizes
            node.module.offsets = [sum(sizes[:k]) for k in range(len(sizes) + 1)]


def _map_concat(graph, node) -> bool:
    """Map a concatenation along the channels with the part widths its tracing forward saw (`build_graph`'s
    cat_sizes, kept true by `prune_group` as parts lose channels), each part's offset where it sits among all
    the parts (a part that carries no gradient takes its width too). Torch-Pruning infers the widths from the
    graph, which fails through slices (DPN's concatenation of a sum, a slice and a layer's output: 80, 416, 80
    for 64, 96, 16). False, leaving the concatenation to Torch-Pruning, when it was not recorded, is along
    another dimension, or one node feeds two parts (no one-to-one map)."""
    from torch_pruning import ops
    from torch_pruning.dependency.index_mapping import _ConcatIndexMapping

    if node.type != ops.OPTYPE.CONCAT:
        return False
    found = getattr(graph, "cat_sizes", {}).get(getattr(node, "grad_fn", None))
    if found is None:
        return False
    dim, sizes, fns = found
    if not along_channels(dim) or len(sizes) != len(fns):
        return False
    places = []
    for inp in node.inputs:
        at = [i for i, fn in enumerate(fns) if fn is not None and fn is getattr(inp, "grad_fn", None)]
        if len(at) != 1:
            return False
        places.append(at[0])
    offsets = [sum(sizes[:k]) for k in range(len(sizes) + 1)]
    node.module.concat_sizes = list(sizes)
    node.module.offsets = offsets
    if not node.enable_index_mapping:
        return True
    for inp, at in zip(node.inputs, places, strict=True):
        span = offsets[at: at + 2]
        for dep in node.dependencies:
            if dep.target is inp:
                dep.index_mapping[1] = _ConcatIndexMapping(offset=span, reverse=True)
        for dep in inp.dependencies:
            if dep.target is node:
                dep.index_mapping[1] = _ConcatIndexMapping(offset=span, reverse=False)
    return True


def _concat_then_split(graph) -> None:
    """Where a split's part feeds a concatenation directly, the edge from the concatenation back to the split
    carries both maps, and Torch-Pruning applies the split's first: the concatenation's indices were shifted by
    the part's offset in the split, then filtered and shifted by its offset in the concatenation. The two
    offsets agree while the widths before that part are equal in both (so every first step came out right); once
    one of them changed, a concatenation's channel went to another channel of the split (Res2Net's last part,
    after the convolutions' outputs before it were pruned). On that edge the concatenation's map goes first."""
    for node in graph.module2node.values():
        if type(node.module).__name__ != "_ConcatOp":
            continue
        for dep in node.dependencies:
            if type(dep.target.module).__name__ == "_SplitOp" and all(m is not None for m in dep.index_mapping):
                first, second = dep.index_mapping
                if getattr(first, "reverse", False) and type(first).__name__ == "_SplitIndexMapping":
                    dep.index_mapping = [second, first]


def _order_split_outputs(node) -> bool:
    """Put a split's consumers in the order of the split's outputs they read, which Torch-Pruning's split index
    map assumes (it gives the i-th consumer found the i-th part: found in another order, the channels of one
    part were mapped into the layers of another). The order is read from autograd: each consumer's node lists
    the split's node with the output number it reads. False when that cannot be told for every part (a consumer
    of several parts, a part nobody reads): the split is then treated as unmapped and its groups held."""
    if getattr(node, "grad_fn", None) is None or "Split" not in type(node.grad_fn).__name__:
        return True  # not a split by sizes (or nothing to order by): as Torch-Pruning does it
    numbers = []
    for out in node.outputs:
        nrs = {nr for fn, nr in (getattr(out.grad_fn, "next_functions", None) or ()) if fn is node.grad_fn}
        if len(nrs) != 1:
            return False
        numbers.append(nrs.pop())
    if sorted(numbers) != list(range(len(numbers))):
        return False
    node.outputs = [out for _, out in sorted(zip(numbers, node.outputs, strict=True), key=lambda p: p[0])]
    return True


@contextmanager
def _guarded_index_maps(limit: int = 0):
    """Torch-Pruning derives channel index maps through reshapes, concatenations, splits and slices by shape
    arithmetic, which fails on channel shuffles (view to groups, transpose, view back), window partitions and
    index ops of unknown size (it raises ZeroDivisionError, TypeError, IndexError). Such an op is marked instead
    of failing the build, and every group that passes through it is held whole (`crosses_unmapped`)."""
    from torch_pruning.dependency import index_mapping

    originals = {name: getattr(index_mapping, name) for name in _MAPPINGS if hasattr(index_mapping, name)}

    def guard(original):
        def guarded(graph, node) -> None:
            if _is_channel_shuffle(node) or getattr(node.module, _UNMAPPED, False):
                setattr(node.module, _UNMAPPED, True)
                return
            if _folds_for_matmul(node):
                return  # the channels stay the last dimension: index for index, no map
            if _map_concat(graph, node):
                return  # the parts' widths as the tracing forward saw them
            try:
                original(graph, node)
            except (ZeroDivisionError, TypeError, IndexError, ValueError, RuntimeError, AttributeError):
                setattr(node.module, _UNMAPPED, True)

        return guarded

    flatten = index_mapping._FlattenIndexMapping.__call__

    def bounded(mapping, idxs):
        # A spatial reshape (a window partition) taken for a channel flatten expands each index by the stride;
        # through a chain of them the index lists grow without bound and deriving the group never ends.
        if limit and not mapping.reverse and len(idxs) * mapping._stride > limit:
            raise IndexExplosion(f"an index map through a reshape would give {len(idxs) * mapping._stride} channel "
                                 f"indices, more than the widest layer's {limit}")
        return flatten(mapping, idxs)

    # Channel counts are inferred by walking the graph recursively, again for every reshape of every index-map
    # pass (632k calls in 3 steps of MaxViT): remembered for the length of one pass, when no width changes.
    from torch_pruning.dependency import shape_infer

    infer = {"infer_in_channels_recursively": shape_infer.infer_in_channels_recursively,
             "infer_out_channels_recursively": shape_infer.infer_out_channels_recursively}
    memo: dict[tuple[str, int], Any] = {}

    def remembered(kind: str):
        def call(graph, node, recursive_depth):
            key = (kind, id(node))
            if key not in memo:
                memo[key] = infer[kind](graph, node, recursive_depth)
            return memo[key]

        return call

    whole_pass = index_mapping.update_index_mapping

    def one_pass(graph) -> None:
        memo.clear()
        _true_splits(graph)
        try:
            whole_pass(graph)
            _concat_then_split(graph)
        finally:
            memo.clear()

    for name, original in originals.items():
        setattr(index_mapping, name, guard(original))
    index_mapping._FlattenIndexMapping.__call__ = bounded
    for name in infer:
        setattr(shape_infer, name, remembered(name))
    index_mapping.update_index_mapping = one_pass
    try:
        yield
    finally:
        for name, original in originals.items():
            setattr(index_mapping, name, original)
        index_mapping._FlattenIndexMapping.__call__ = flatten
        for name, original in infer.items():
            setattr(shape_infer, name, original)
        index_mapping.update_index_mapping = whole_pass


@contextmanager
def _index_maps_once():
    """Within the block, Torch-Pruning's per-group re-derivation of every index map in the graph runs once: it
    is only needed again after something was pruned, and on large graphs it dominated enumerating groups."""
    from torch_pruning.dependency import index_mapping

    original = index_mapping.update_index_mapping
    done: list[bool] = []

    def once(graph) -> None:
        if not done:
            original(graph)
            done.append(True)

    index_mapping.update_index_mapping = once
    try:
        yield
    finally:
        index_mapping.update_index_mapping = original


def _kind(node) -> str:
    return type(getattr(node, "grad_fn", None)).__name__


def _folds_for_matmul(node) -> bool:
    """A reshape that folds the leading dimensions of a channels-last tensor into one for a matrix multiply (a
    Linear layer on a B x H x W x C input: view to (B*H*W) x C, then mm): its last dimension, the channels, is the
    multiply's. Torch-Pruning takes every reshape of a 4-d tensor for a flatten of B x C x H x W and maps channel
    c to c // k, which coupled unrelated channels of MambaOut's gated blocks."""
    from torch_pruning import ops

    if node.type != ops.OPTYPE.RESHAPE:
        return False
    fn = getattr(node, "grad_fn", None)
    sizes = getattr(fn, "_saved_self_sym_sizes", None) or getattr(fn, "_saved_self_sizes", None)
    if not sizes or len(sizes) < 3 or not node.outputs:
        return False
    for out in node.outputs:
        mm = getattr(out, "grad_fn", None)
        folded = getattr(mm, "_saved_mat1_sym_sizes", None) if _kind(out) == "AddmmBackward0" else \
            getattr(mm, "_saved_self_sym_sizes", None) if _kind(out) == "MmBackward0" else None
        if not folded or len(folded) != 2 or int(folded[1]) != int(sizes[-1]):
            return False
    return True


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


# Most times one layer may come back, with another set of channel indices, while Torch-Pruning derives one group.
# The densest coupling measured (DPN's dual-path concatenations) revisits a layer 26 times; a partial-channel
# residual (`x[:, :C] += shortcut`, ReXNet) makes the index sets multiply without end (21,986 visits of one layer
# in 3 s), which held each such group only when its 20 s budget ran out.
REVISITS = 1000


def _op_key(dep, idxs) -> tuple:
    return id(dep.target), dep.handler, tuple(idxs)


@contextmanager
def _indexed_groups(revisits: int = REVISITS):
    """Within the block, Torch-Pruning's groups keep a set of the (layer, handler, indices) they hold, so that its
    check for one already there, made for every dependency it follows, is a lookup instead of a scan of the whole
    group (quadratic in the group's size); the groups built are the same (a group edited by other means than
    add_dep falls back to the scan). A layer that comes back more than `revisits` times raises IndexExplosion:
    the derivation would not end, and the group is held at once instead of after its time budget."""
    from torch_pruning.dependency.group import Group

    add, has = Group.add_dep, Group.has_pruning_op

    def add_dep(self, dep, idxs):
        add(self, dep, idxs)
        state = self.__dict__.setdefault("_index", {"ops": set(), "added": 0, "visits": Counter()})
        visits = state["visits"]
        visits[id(dep.target)] += 1
        if visits[id(dep.target)] > revisits:
            layer = dep.target.name.split(" (")[0]
            raise IndexExplosion(f"deriving its coupled channels came back to {layer} more than {revisits} "
                                 f"times with other channel indices (an index map that multiplies, as "
                                 f"through a residual added to part of the channels)")
        try:
            state["ops"].add(_op_key(dep, idxs))
            state["added"] += 1
        except TypeError:  # indices that cannot be hashed: this group is scanned
            state["added"] = -1

    def has_pruning_op(self, dep, idxs):
        state = self.__dict__.get("_index")
        if state is None or state["added"] != len(self._group):
            return has(self, dep, idxs)
        try:
            return _op_key(dep, idxs) in state["ops"]
        except TypeError:
            return has(self, dep, idxs)

    Group.add_dep, Group.has_pruning_op = add_dep, has_pruning_op
    try:
        yield
    finally:
        Group.add_dep, Group.has_pruning_op = add, has


class _Graph(tp.DependencyGraph):
    """Torch-Pruning's graph; its index maps are guarded, its groups enumerated with a time budget each."""

    widest = 0  # the largest width of any conv/linear layer: no group can map to more channel indices

    def build_dependency(self, model, *args, **kwargs):
        self.widest = max([d for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear, nn.Conv1d))
                           for d in ((m.in_channels, m.out_channels) if not isinstance(m, nn.Linear)
                                     else (m.in_features, m.out_features))], default=0)
        with _guarded_index_maps(self.widest):
            return super().build_dependency(model, *args, **kwargs)

    def get_pruning_group(self, *args, **kwargs):
        with _guarded_index_maps(self.widest), _indexed_groups():
            return super().get_pruning_group(*args, **kwargs)

    def groups(self, model: nn.Module, ignored: list[nn.Module], held: dict[str, Held],
               seconds: float = GROUP_SECONDS) -> tuple[list[tuple[str, nn.Module, Any, Any]], list[Held]]:
        """Every prunable group once, rooted at its first producer, as (root name, root, handler, group); and the
        groups newly found to be held whole. Roots of groups already held (`held`, by any of their layers) are
        not derived again."""
        names = {m: n for n, m in model.named_modules()}
        attention = unrecognised_attention(model)
        # a recognised attention's heads are removed whole, which maps through the reshapes that split them; its
        # group is rooted at its first projection, whichever of its projections the graph reaches first
        head_roots = {p: lay.root for lay in map(layout, attention_modules(model).values()) for p in lay.inputs}
        skip = set(ignored) | set(self.IGNORED_LAYERS_IN_TRACING)
        held_layers = {layer for h in held.values() for layer in h.layers}
        covered: set[nn.Module] = set()
        found, new = [], []
        with _index_maps_once():
            for module in list(self.module2node):
                module = head_roots.get(module, module)
                name = names.get(module)
                if module in skip or module in covered or not isinstance(module, (nn.Conv2d, nn.Linear)) \
                        or name is None or name in held_layers:
                    continue
                pruner = self.get_pruner_of_module(module)
                width = pruner.get_out_channels(module) if pruner is not None else None
                if width is None:
                    continue
                try:
                    with time_limit(seconds):
                        group = self.get_pruning_group(module, pruner.prune_out_channels, list(range(width)))
                except GroupTimeout as exc:
                    new.append(Held(name, f"Torch-Pruning could not derive its coupled channels: it {exc}",
                                    "time budget", [name]))
                    covered.add(module)
                    continue
                except Exception as exc:  # noqa: BLE001 - a coupling it cannot trace is held, not fatal
                    text = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else ""
                    new.append(Held(name, f"Torch-Pruning could not derive its coupled channels "
                                          f"({type(exc).__name__}: {text})", "graph", [name]))
                    covered.add(module)
                    continue
                producers = [dep.target.module for dep, _ in group if self.is_out_channel_pruning_fn(dep.handler)]
                covered.update(producers)
                if skip.intersection(producers) or not self.is_out_channel_pruning_fn(group[0].dep.handler):
                    continue
                layers = sorted({names[m] for m in producers if m in names})
                reason = None if module in head_roots else _held_reason(group, layers, attention)
                if reason:
                    new.append(Held(name, reason[1], reason[0], layers))
                else:
                    found.append((name, module, group[0].dep.handler, group))
        return found, new


def _held_reason(group, layers: list[str], attention: dict[str, nn.Module]) -> tuple[str, str] | None:
    """(kind, reason) when a group cannot be pruned evenly; where its layers sit in an attention module whose
    heads are not recognised, the reason says so."""
    if crosses_unmapped(group):
        kind, reason = "index map", ("its channels pass a reshape, concatenation, split or slice whose channel "
                                     "mapping Torch-Pruning cannot derive (a channel shuffle, a window partition, "
                                     "a roll)")
    elif (groups := channel_groups(group)) is None:
        kind, reason = "grouped conv", ("it feeds a grouped convolution (groups > 1, not depthwise) or a split "
                                        "into equal parts through a concatenation or slice, or ones whose group "
                                        "or part counts do not nest: no removal leaves every group the same "
                                        "width")
    elif groups > 1 and len(group[0].idxs) // groups < 2:
        kind, reason = "grouped conv", (f"its {len(group[0].idxs)} channels feed a grouped convolution with "
                                        f"{groups} groups (or a split into {groups} equal parts), one channel "
                                        f"each: only whole groups could go, and removing whole groups is not "
                                        f"supported")
    else:
        return None
    return kind, in_attention(layers, attention, reason)


def in_attention(layers: list[str], attention: dict[str, nn.Module], reason: str) -> str:
    """`reason`, prefixed with the attention module holding the layers when its heads are not recognised."""
    where = inside_attention(layers, attention)
    if not where:
        return reason
    mod = attention[where]
    lay = layout(mod)
    attr = lay.heads_attr if lay else head_count_attr(mod)
    what = ("whose heads were recognised and removed whole, yet its forward does not follow (it derives a head "
            "size from another width)" if lay else "whose head layout is not recognised for head pruning")
    return f"inside attention `{where}` ({type(mod).__name__}, {attr}={getattr(mod, attr)}), {what}: {reason}"


class _SplitOwners(torch.overrides.TorchFunctionMode):
    """Records, during the tracing forward, which module's forward made each split into sizes and each slice (a
    slice's bounds may be a stored width, DPN's `x[:, :self.num_1x1_c]`): the split's
    autograd node (Torch-Pruning's graph node for the split holds the same object) -> (module, sizes). A module
    that splits by sizes it stores (a tuple of integers summing to a pruned width) must have them follow the
    pruning (`prune_group` in stages._structure does it). Each concatenation is recorded too: its autograd node
    -> (dimension, the sizes of its parts along it, each part's autograd node), the widths Torch-Pruning infers
    from the graph instead (and got wrong where a part is a slice: DPN's dual paths)."""

    _CATS = (torch.cat, torch.concat, torch.concatenate)

    def __init__(self, owners: dict[Any, tuple[nn.Module, tuple[int, ...]]],
                 cats: dict[Any, tuple[int, tuple[int, ...], tuple[Any, ...]]] | None = None,
                 slices: dict[Any, nn.Module] | None = None) -> None:
        super().__init__()
        self.owners, self.stack = owners, []
        self.cats = cats if cats is not None else {}
        self.slices = slices if slices is not None else {}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if self.stack and isinstance(out, tuple | list) and len(out) > 1 and all(isinstance(t, torch.Tensor)
                                                                                 for t in out):
            fn = out[0].grad_fn
            if fn is not None and "Split" in type(fn).__name__ and fn not in self.owners:
                dim = next((a for a in [*args[2:3], (kwargs or {}).get("dim")] if isinstance(a, int)), 0)
                self.owners[fn] = (self.stack[-1], tuple(int(t.shape[dim]) for t in out))
        elif func in self._CATS and isinstance(out, torch.Tensor) and type(out.grad_fn).__name__ == "CatBackward0":
            parts = args[0] if args else (kwargs or {}).get("tensors")
            dim = next((a for a in [*args[1:2], (kwargs or {}).get("dim")] if isinstance(a, int)), 0)
            if isinstance(parts, tuple | list) and all(isinstance(t, torch.Tensor) for t in parts):
                self.cats[out.grad_fn] = (dim, tuple(int(t.shape[dim]) for t in parts),
                                          tuple(t.grad_fn for t in parts))
        elif self.stack and func is torch.Tensor.__getitem__ and isinstance(out, torch.Tensor):
            fn = out.grad_fn  # x[:, a:b]: one slice node per sliced dimension, the last one the output's
            while type(fn).__name__ == "SliceBackward0" and fn not in self.slices:
                self.slices[fn] = self.stack[-1]
                fn = fn.next_functions[0][0] if fn.next_functions else None
        return out

    @contextmanager
    def active(self) -> Iterator[None]:
        """The mode, with the module whose forward runs kept on a stack."""
        from torch.nn.modules.module import register_module_forward_hook, register_module_forward_pre_hook

        def enter(mod: nn.Module, args: Any) -> None:
            self.stack.append(mod)

        def leave(mod: nn.Module, args: Any, out: Any) -> None:  # returns None: the output stays as it is
            if self.stack:
                self.stack.pop()

        pre, post = register_module_forward_pre_hook(enter), register_module_forward_hook(leave)
        try:
            with self:
                yield
        finally:
            pre.remove()
            post.remove()


def build_graph(model: nn.Module, example: torch.Tensor) -> tp.DependencyGraph:
    """The step's single dependency graph, traced in training mode (auxiliary heads included). Its
    `output_layers` are the layers whose output the model returns, found in the same forward pass, and its
    `split_owners` the modules that split a tensor by sizes (see _SplitOwners)."""
    graph = _Graph()
    graph.output_layers = []
    graph.split_owners = {}
    graph.cat_sizes = {}
    graph.slice_owners = {}

    def forward(m: nn.Module, x: torch.Tensor):
        # Torch-Pruning switches the model to eval mode before calling this
        with tracing_mode(m), _recording_output_layers(m, graph.output_layers) as returned, \
                _SplitOwners(graph.split_owners, graph.cat_sizes, graph.slice_owners).active():
            out = m(x)
            returned += [out] if isinstance(out, torch.Tensor) else [t for t in out if isinstance(t, torch.Tensor)]
        return out

    with tracing_mode(model), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*[Uu]nwrapped parameters.*")
        return graph.build_dependency(model, example_inputs=example, forward_fn=forward)


