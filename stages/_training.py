"""Evaluation on a split (sharded and reduced across ranks under torchrun), and the shared recovery context."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Subset

from core import distributed as D
from core.context import Context
from core.models import clone


@torch.no_grad()
def evaluate(model: nn.Module, ctx: Context, split: str = "validation") -> dict[str, float]:
    """Top-1 / top-5 in percent on a split; each rank scores its share and the counts are summed."""
    model.eval()
    ds = getattr(ctx.splits, split)
    me, world = ctx.world
    if world > 1:
        ds = Subset(ds, list(range(me, len(ds), world)))
    correct1 = correct5 = total = 0
    for x, y in DataLoader(ds, batch_size=ctx.config.data.eval_batch_size, num_workers=ctx.config.data.num_workers):
        x, y = x.to(ctx.device), y.to(ctx.device)
        logits = model(x)
        top = logits.topk(min(5, logits.shape[1]), dim=1).indices
        correct1 += (top[:, 0] == y).sum().item()
        correct5 += (top == y[:, None]).any(dim=1).sum().item()
        total += y.numel()
    correct1, correct5, total = D.all_reduce_sum([correct1, correct5, total], ctx.device, ctx.ddp)
    return {"top1": 100.0 * correct1 / total, "top5": 100.0 * correct5 / total}


def steps_per_epoch(ctx: Context) -> int:
    """Full global batches in one pass over the training split."""
    return max(len(ctx.splits.train) // ctx.config.data.batch_size, 1)


def teacher_and_reference(model: nn.Module, ctx: Context) -> tuple[nn.Module | None, dict[str, Any]]:
    """The distillation teacher (stage input or base model) and the references the stopping rules compare to."""
    cfg = ctx.config.recovery
    teacher = None
    if cfg.distill_weight > 0:
        teacher = clone(model) if cfg.teacher == "stage_input" else ctx.model_of("calibrate").to(ctx.device)
        teacher.eval()
    calib = ctx.stage_state("calibrate")
    reference = {"top1": calib["base"]["top1"], "information_flow": calib["information_flow"],
                 "gradient_flow": calib["gradient_flow"]}
    return teacher, reference


@contextmanager
def tracing_mode(model: nn.Module):
    """Trace in training mode so branches that only run in training (auxiliary classifiers) join the graph,
    with normalisation and dropout in eval mode (running statistics untouched, deterministic, any batch)."""
    modes = {m: m.training for m in model.modules()}
    model.train()
    for m in model.modules():
        if isinstance(m, (nn.modules.batchnorm._NormBase, nn.Dropout, nn.Dropout2d)):
            m.eval()
    try:
        yield
    finally:
        for m, mode in modes.items():
            m.training = mode
