"""Importance criteria, selectable by name: IDAP++ divergence variants and Torch-Pruning's baselines.

A criterion is a small object: `prepare(model, ctx, stats)` once per pruning step, then
`__call__(group)` returns one score per unit of the group's root (low = pruned first), and
`heads(name, attention, group)` one score per attention head (the group is the one rooted at its qkv).
"""

from __future__ import annotations

from typing import Any

import torch
import torch_pruning as tp
from torch import nn

from core.context import Context
from core.registry import Registry
from stages._attention import head_weight_norms, heads_of, qkv_indices

CRITERIA: Registry[type[Criterion]] = Registry("criterion")

_OUT = (tp.prune_conv_out_channels, tp.prune_linear_out_channels)
_IN = (tp.prune_conv_in_channels, tp.prune_linear_in_channels)


class Criterion:
    """Base: scores units of a dependency group."""

    needs_stats = False  # wants collect_unit_stats of the current model
    needs_grad = False  # wants .grad of the weights from the calibration batches

    def prepare(self, model: nn.Module, ctx: Context, stats: dict[str, Any] | None) -> None:
        self.names = {m: n for n, m in model.named_modules()}
        self.stats = stats or {}

    def __call__(self, group: tp.Dependency) -> torch.Tensor | None:
        raise NotImplementedError

    def heads(self, name: str, attention: nn.Module, group) -> torch.Tensor | None:
        """Per-head scores; by default the mean of the unit scores over each head's q, k and v features."""
        return _per_head(self(group), attention)


def _per_head(units: torch.Tensor | None, attention: nn.Module) -> torch.Tensor | None:
    if units is None:
        return None
    units = torch.nan_to_num(units.detach().float().cpu(), nan=0.0)
    return torch.stack([units[qkv_indices(attention, [h])].mean() for h in range(heads_of(attention))])


def _members(group, fns) -> list[tuple[nn.Module, list[int], list[int]]]:
    out = []
    for i, (dep, idxs) in enumerate(group):
        if dep.handler in fns and isinstance(dep.target.module, (nn.Conv2d, nn.Linear)):
            out.append((dep.target.module, list(idxs), list(group[i].root_idxs)))
    return out


def _scatter_mean(n: int, parts: list[tuple[torch.Tensor, list[int]]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Average per-member values onto root indices; returns (mean, count)."""
    total, count = torch.zeros(n), torch.zeros(n)
    for vals, root in parts:
        idx = torch.tensor(root, dtype=torch.long)
        total.scatter_add_(0, idx, vals.float().cpu())
        count.scatter_add_(0, idx, torch.ones(len(root)))
    return total / count.clamp(min=1), count


def _in_weight_norm(layer: nn.Module, idxs: list[int]) -> torch.Tensor:
    """L2 norm of the consumer weights that read each input channel."""
    w = layer.weight.detach()
    if isinstance(layer, nn.Linear) or layer.groups == 1:
        return w.transpose(0, 1).flatten(1).norm(dim=1)[idxs]
    per_group_in = layer.in_channels // layer.groups
    per_group_out = layer.out_channels // layer.groups
    idx = torch.tensor(idxs)
    g, j = idx // per_group_in, idx % per_group_in
    rows = w.view(layer.groups, per_group_out, per_group_in, -1)
    return rows[g, :, j].flatten(1).norm(dim=1)


class _Divergence(Criterion):
    """IDAP++ divergence D_c = ||phi(Y_c)|| * ||W_c|| / (C*H*W), normalised per layer, averaged over the group."""

    needs_stats = True
    consumer_signal = True  # measure phi(Y) where the signal leaves the layer (consumers' input)
    flow_weighted = False  # multiply by the consumers' input-weight norms

    def _signal(self, group, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        parts = []
        for layer, idxs, root in _members(group, _IN):
            st = self.stats.get(self.names.get(layer, ""))
            if st is None or None in root:
                continue
            vals = st["in_norm"][idxs]
            if self.flow_weighted:
                vals = vals * _in_weight_norm(layer, idxs).cpu()
            parts.append((vals, root))
        return _scatter_mean(n, parts)

    @torch.no_grad()
    def __call__(self, group) -> torch.Tensor | None:
        n = len(group[0].idxs)
        producers = [m for m in _members(group, _OUT) if None not in m[2]]
        if not producers:
            return None
        signal, count = self._signal(group, n) if self.consumer_signal else (torch.zeros(n), torch.zeros(n))
        scores = []
        for layer, idxs, root in producers:
            st = self.stats.get(self.names.get(layer, ""))
            if st is None:
                continue
            root_t = torch.tensor(root)
            own = st["out_relu_norm"][idxs]
            act = torch.where(count[root_t] > 0, signal[root_t], own) if self.consumer_signal else own
            w = layer.weight.detach()[idxs].flatten(1).norm(dim=1).cpu()
            d = act * w / st["out_numel"]
            d = d / d.mean().clamp(min=1e-12)
            scores.append((d, root))
        if not scores:
            return None
        return _scatter_mean(n, scores)[0]

    @torch.no_grad()
    def heads(self, name: str, attention: nn.Module, group) -> torch.Tensor | None:
        """D_h = ||softmax(Q_h K_h^T / sqrt(d)) V_h||_F / n * sum of the head's Q, K, V weight norms."""
        st = self.stats.get(name)
        if st is None or "head_norm" not in st or len(st["head_norm"]) != heads_of(attention):
            return None
        d = st["head_norm"] * head_weight_norms(attention).cpu()
        return d / d.mean().clamp(min=1e-12)


@CRITERIA.register("divergence")
class Divergence(_Divergence):
    """phi(Y) measured after the layer's normalisation and activation, at its consumers' input."""


@CRITERIA.register("divergence_published")
class DivergencePublished(_Divergence):
    """The published code's form: ReLU of the raw conv output (before BatchNorm)."""

    consumer_signal = False


@CRITERIA.register("divergence_flow")
class DivergenceFlow(_Divergence):
    """Divergence times the norm of the consumers' input weights: the information that flows on."""

    flow_weighted = True


@CRITERIA.register("divergence_taylor")
class DivergenceTaylor(_Divergence):
    """Divergence weighted by first-order Taylor importance (the loss change), both normalised per layer."""

    needs_grad = True

    def prepare(self, model: nn.Module, ctx: Context, stats: dict[str, Any] | None) -> None:
        super().prepare(model, ctx, stats)
        self.taylor = tp.importance.GroupTaylorImportance()

    def __call__(self, group) -> torch.Tensor | None:
        d = super().__call__(group)
        if d is None:
            return None
        t = self.taylor(group)
        if t is None or t.shape != d.shape:
            # Torch-Pruning's Taylor importance may count a group's units otherwise than its root does (a slice
            # after a concatenation, GhostNet): the divergence alone then scores the group
            return d
        t = torch.nan_to_num(t.detach().float().cpu(), nan=0.0).abs()
        return d * t / t.mean().clamp(min=1e-12)

    def heads(self, name: str, attention: nn.Module, group) -> torch.Tensor | None:
        d = super().heads(name, attention, group)
        t = _per_head(self.taylor(group), attention)
        if d is None or t is None:
            return d
        t = t.abs()
        return d * t / t.mean().clamp(min=1e-12)


class _TorchPruning(Criterion):
    """Wraps a Torch-Pruning importance class."""

    def __init__(self) -> None:
        self.imp = self.make()

    def make(self) -> tp.importance.Importance:
        raise NotImplementedError

    def __call__(self, group) -> torch.Tensor | None:
        scores = self.imp(group)
        # Mean normalisation turns an all-zero group (e.g. zero gradients) into NaN: it has no importance.
        return None if scores is None else torch.nan_to_num(scores, nan=0.0)


@CRITERIA.register("l1")
class L1(_TorchPruning):
    """Torch-Pruning group L1 magnitude."""

    def make(self):
        return tp.importance.GroupMagnitudeImportance(p=1)


@CRITERIA.register("l2")
class L2(_TorchPruning):
    """Torch-Pruning group L2 magnitude."""

    def make(self):
        return tp.importance.GroupMagnitudeImportance(p=2)


@CRITERIA.register("fpgm")
class FPGM(_TorchPruning):
    """Filter pruning via geometric median (Torch-Pruning)."""

    def make(self):
        return tp.importance.FPGMImportance()


@CRITERIA.register("random")
class Random(_TorchPruning):
    """Random scores (seeded by the stage): the floor every criterion must beat."""

    def make(self):
        return tp.importance.RandomImportance()


@CRITERIA.register("taylor")
class Taylor(_TorchPruning):
    """Torch-Pruning group first-order Taylor, from gradients of the calibration batches."""

    needs_grad = True

    def make(self):
        return tp.importance.GroupTaylorImportance()


def accumulate_gradients(model: nn.Module, ctx: Context, collectors: list = ()) -> None:
    """Cross-entropy gradients summed over the calibration batches (for gradient-based criteria). Collectors
    (e.g. UnitStats) attached here measure the same forward passes, which saves a pass of their own."""
    from stages._recovery import task_loss
    from stages._training import tracing_mode

    model.zero_grad(set_to_none=True)
    handles = [h for c in collectors for h in c.attach(model)]
    try:
        with tracing_mode(model):  # auxiliary classifiers run (and get gradients) as in training, BN as in eval
            for x, y in ctx.loader("calibration"):
                task_loss(model(x.to(ctx.device)), y.to(ctx.device))[0].backward()
                for c in collectors:
                    c.batches += 1
    finally:
        for h in handles:
            h.remove()
    model.eval()
