"""Attention heads as pruning units: recognise multi-head attention by structure, score heads, keep attributes true.

A module is a multi-head attention this project can prune by heads when it holds its head count in an integer
attribute (any of HEAD_ATTRS, the spellings libraries use for it), and its direct children include either
- fused projections: an nn.Linear to 3 * H * d features laid out q|k|v, each head-major (timm's `qkv`), or
- separate projections: three nn.Linear of the same shape to H * d features each, head-major (q, k and v, in
  that order of registration: Hugging Face's `q_proj`/`k_proj`/`v_proj` or `query`/`key`/`value`),
and, after them, an nn.Linear from H * d features (the output projection). The head dim d is what the widths
say. Recognition never looks at a class or model name, nor at the children's names. The heads' q, k, v and output
features form one Torch-Pruning group rooted at the first projection; removing a head removes its d features
from each. torch.nn.MultiheadAttention ties its head space to the embedding width (its q, k, v are one
parameter, not layers), so its heads cannot be removed without changing the residual width; it is left whole.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

HEAD_ATTRS = ("num_heads", "num_attention_heads", "n_heads", "heads", "nhead")


@dataclass(frozen=True)
class Layout:
    """Where an attention module's heads live: `inputs` (the fused qkv projection, or q, k and v), `out` (the
    output projection), the attribute holding the head count, and the head dim. `names` are the children's."""

    inputs: tuple[nn.Linear, ...]
    out: nn.Linear
    heads_attr: str
    head_dim: int
    names: tuple[str, ...]  # of inputs, then out

    @property
    def root(self) -> nn.Linear:
        """The projection whose output-channel group holds every head's features."""
        return self.inputs[0]

    @property
    def parts(self) -> int:
        """Blocks of H * d features in the root's output: 3 for a fused qkv, 1 for a separate q."""
        return 3 if len(self.inputs) == 1 else 1


def _head_count(mod: nn.Module) -> tuple[str, int] | None:
    for attr in HEAD_ATTRS:
        value = getattr(mod, attr, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return attr, value
    return None


def layout(mod: nn.Module) -> Layout | None:
    """The module's head layout, or None when it is not a head-prunable attention (see the module docstring)."""
    count = _head_count(mod)
    if count is None:
        return None
    attr, heads = count
    linears = [(n, c) for n, c in mod.named_children() if isinstance(c, nn.Linear)]
    for i, (name, cand) in enumerate(linears):  # fused: one projection to 3 * H * d
        dim, rest = divmod(cand.out_features, 3 * heads)
        if rest == 0 and dim > 0:
            out = next(((n, c) for n, c in linears[i + 1:] if c.in_features == heads * dim), None)
            if out is not None:
                return Layout((cand,), out[1], attr, dim, (name, out[0]))
    for i, (_, cand) in enumerate(linears):  # separate: three projections of one shape to H * d each
        dim, rest = divmod(cand.out_features, heads)
        if rest or dim == 0:
            continue
        same = [(n, c) for n, c in linears[i:] if (c.in_features, c.out_features) ==
                (cand.in_features, cand.out_features)][:3]
        if len(same) < 3:
            continue
        after = linears[linears.index(same[-1]) + 1:]
        out = next(((n, c) for n, c in after if c.in_features == heads * dim), None)
        if out is not None:
            return Layout(tuple(c for _, c in same), out[1], attr, dim, (*(n for n, _ in same), out[0]))
    return None


def is_head_attention(mod: nn.Module) -> bool:
    """True for a multi-head attention whose heads can be removed whole."""
    return layout(mod) is not None


def attention_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Name -> module of every head-prunable attention in the model."""
    return {n: m for n, m in model.named_modules() if is_head_attention(m)}


def heads_of(mod: nn.Module) -> int:
    """The attention module's head count, as its own attribute states it."""
    return getattr(mod, layout(mod).heads_attr)


def count_heads(model: nn.Module) -> int:
    """Heads over every head-prunable attention of the model."""
    return sum(heads_of(m) for m in attention_modules(model).values())


def qkv_indices(mod: nn.Module, heads: list[int]) -> list[int]:
    """The root projection's output features of the given heads (its q, k and v parts when fused)."""
    lay = layout(mod)
    d = lay.head_dim
    width = getattr(mod, lay.heads_attr) * d
    return sorted(part * width + h * d + j for part in range(lay.parts) for h in heads for j in range(d))


def members(lay: Layout, prefix: str) -> dict[str, tuple[int, int]]:
    """Each projection of the heads' group by name, with its width on the pruned side and the features per head."""
    d, inputs = lay.head_dim, lay.names[:-1]
    width = lay.root.out_features // lay.parts
    out = {f"{prefix}.{n}": (lay.parts * width, lay.parts * d) for n in inputs}
    out[f"{prefix}.{lay.names[-1]}"] = (width, d)
    return out


def sync_attributes(mod: nn.Module, before: Layout) -> None:
    """After the projections lost whole heads, make the head count (and any attribute that spelled the heads'
    total width, timm's attn_dim, Hugging Face's all_head_size) match the weights. `before` is the layout taken
    before the pruning."""
    d = before.head_dim
    old = getattr(mod, before.heads_attr)
    heads, rest = divmod(before.root.out_features, before.parts * d)
    widths = {c.out_features for c in before.inputs} | {before.out.in_features * before.parts}
    if rest or widths != {before.parts * heads * d}:
        raise RuntimeError(f"{type(mod).__name__}: its projections have {sorted(widths)} features, not whole heads "
                           f"of {d}: a pruning step split a head")
    setattr(mod, before.heads_attr, heads)
    for key, value in list(vars(mod).items()):
        if key != before.heads_attr and not key.startswith("_") and type(value) is int and value == old * d \
                and old != heads:
            setattr(mod, key, heads * d)


@torch.no_grad()
def head_output_norms(mod: nn.Module, heads_out: torch.Tensor) -> torch.Tensor:
    """Per head h: mean over samples of ||softmax(Q_h K_h^T / sqrt(d)) V_h||_F / n (docs/method.md section 2),
    from the module's own concatenated head outputs (proj's input, B x n x H*d): no attention is recomputed,
    and it is the signal as it leaves the heads (after any output norm or gate the module applies)."""
    b, n, _ = heads_out.shape
    lay = layout(mod)
    per_head = heads_out.reshape(b, n, getattr(mod, lay.heads_attr), lay.head_dim).transpose(1, 2).flatten(2)
    return (per_head.norm(dim=2) / n).mean(0)


def head_weight_norms(mod: nn.Module) -> torch.Tensor:
    """Per head: ||W_Q^h||_F + ||W_K^h||_F + ||W_V^h||_F."""
    lay = layout(mod)
    w = torch.cat([p.weight.detach() for p in lay.inputs]).reshape(3, getattr(mod, lay.heads_attr), lay.head_dim, -1)
    return w.flatten(2).norm(dim=2).sum(0)


class HeadStats:
    """Calibration collector: per attention module, the per-head output norms and the batch count."""

    def __init__(self) -> None:
        self.sums: dict[str, torch.Tensor] = {}
        self.batches = 0

    def attach(self, model: nn.Module) -> list:
        def hook(name: str, attention: nn.Module):
            def fn(proj: nn.Module, args: tuple) -> None:
                if args and isinstance(args[0], torch.Tensor) and args[0].dim() == 3:
                    norms = head_output_norms(attention, args[0].detach().float()).cpu()
                    self.sums[name] = self.sums.get(name, 0.0) + norms

            return fn

        return [layout(m).out.register_forward_pre_hook(hook(n, m)) for n, m in attention_modules(model).items()]

    def result(self) -> dict[str, dict[str, Any]]:
        n = max(self.batches, 1)
        return {k: {"head_norm": v / n} for k, v in self.sums.items()}
