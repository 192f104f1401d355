"""Attention heads as pruning units: recognise fused-qkv attention by structure, score heads, keep attributes true.

A module is a multi-head attention this project can prune by heads when it has integer `num_heads` and
`head_dim`, a child `qkv` (nn.Linear to 3 * num_heads * head_dim features, laid out q|k|v, each head-major)
and a child `proj` (nn.Linear from num_heads * head_dim). That is timm's `Attention` and the many models
built from it; recognition never looks at a class or model name. torch.nn.MultiheadAttention ties its
head space to the embedding width, so its heads cannot be removed without changing the residual width;
it is left whole.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


def is_head_attention(mod: nn.Module) -> bool:
    """True for a fused-qkv multi-head attention whose heads can be removed whole."""
    heads, dim = getattr(mod, "num_heads", None), getattr(mod, "head_dim", None)
    qkv, proj = getattr(mod, "qkv", None), getattr(mod, "proj", None)
    if not (isinstance(heads, int) and isinstance(dim, int) and heads > 0 and dim > 0):
        return False
    return (isinstance(qkv, nn.Linear) and isinstance(proj, nn.Linear)
            and qkv.out_features == 3 * heads * dim and proj.in_features == heads * dim)


def attention_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Name -> module of every head-prunable attention in the model."""
    return {n: m for n, m in model.named_modules() if is_head_attention(m)}


def count_heads(model: nn.Module) -> int:
    """Heads over every head-prunable attention of the model."""
    return sum(m.num_heads for m in attention_modules(model).values())


def qkv_indices(mod: nn.Module, heads: list[int]) -> list[int]:
    """The qkv output features of the given heads (q, k and v parts)."""
    width, d = mod.num_heads * mod.head_dim, mod.head_dim
    return sorted(part * width + h * d + j for part in range(3) for h in heads for j in range(d))


def sync_attributes(mod: nn.Module) -> None:
    """After qkv/proj lost whole heads, make num_heads (and attn_dim where present) match the weights."""
    heads, rest = divmod(mod.qkv.out_features, 3 * mod.head_dim)
    if rest or mod.proj.in_features != heads * mod.head_dim:
        raise RuntimeError(f"{type(mod).__name__}: qkv has {mod.qkv.out_features} and proj {mod.proj.in_features} "
                           f"features, not whole heads of {mod.head_dim}: a pruning step split a head")
    mod.num_heads = heads
    if isinstance(getattr(mod, "attn_dim", None), int):
        mod.attn_dim = heads * mod.head_dim


@torch.no_grad()
def head_output_norms(mod: nn.Module, heads_out: torch.Tensor) -> torch.Tensor:
    """Per head h: mean over samples of ||softmax(Q_h K_h^T / sqrt(d)) V_h||_F / n (docs/method.md section 2),
    from the module's own concatenated head outputs (proj's input, B x n x H*d): no attention is recomputed,
    and it is the signal as it leaves the heads (after any output norm or gate the module applies)."""
    b, n, _ = heads_out.shape
    per_head = heads_out.reshape(b, n, mod.num_heads, mod.head_dim).transpose(1, 2).flatten(2)
    return (per_head.norm(dim=2) / n).mean(0)


def head_weight_norms(mod: nn.Module) -> torch.Tensor:
    """Per head: ||W_Q^h||_F + ||W_K^h||_F + ||W_V^h||_F."""
    w = mod.qkv.weight.detach().reshape(3, mod.num_heads, mod.head_dim, -1)
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

        return [m.proj.register_forward_pre_hook(hook(n, m)) for n, m in attention_modules(model).items()]

    def result(self) -> dict[str, dict[str, Any]]:
        n = max(self.batches, 1)
        return {k: {"head_norm": v / n} for k, v in self.sums.items()}
