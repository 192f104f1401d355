"""Shared training and evaluation loops (base training, short recovery, fine-tuning)."""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.runner import Context


@torch.no_grad()
def evaluate(model: nn.Module, ctx: Context, split: str = "validation") -> dict[str, float]:
    """Top-1 / top-5 in percent on a split."""
    model.eval()
    correct1 = correct5 = total = 0
    for x, y in ctx.loader(split):
        x, y = x.to(ctx.device), y.to(ctx.device)
        logits = model(x)
        k = min(5, logits.shape[1])
        top = logits.topk(k, dim=1).indices
        correct1 += (top[:, 0] == y).sum().item()
        correct5 += (top == y[:, None]).any(dim=1).sum().item()
        total += y.numel()
    return {"top1": 100.0 * correct1 / total, "top5": 100.0 * correct5 / total}


def _batches(ctx: Context, seed: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Endless seeded stream of training batches (a new shuffle each pass)."""
    epoch = 0
    while True:
        yield from ctx.loader("train", shuffle=True, seed=seed * 1000 + epoch)
        epoch += 1


def sgd(model: nn.Module, lr: float, momentum: float = 0.9, weight_decay: float = 5e-4) -> torch.optim.SGD:
    """SGD without weight decay on norms and biases."""
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim > 1]
    rest = [p for p in model.parameters() if p.requires_grad and p.ndim <= 1]
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": rest, "weight_decay": 0.0}]
    return torch.optim.SGD(groups, lr=lr, momentum=momentum, nesterov=momentum > 0)


def train_steps(model: nn.Module, ctx: Context, steps: int, lr: float, description: str,
                momentum: float = 0.9, weight_decay: float = 5e-4, seed: int = 0) -> float:
    """`steps` cross-entropy SGD steps with a cosine schedule; returns the mean loss."""
    if steps <= 0:
        return float("nan")
    opt = sgd(model, lr, momentum, weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * s / steps)))
    model.train()
    total, stream = 0.0, _batches(ctx, seed)
    for _ in ctx.track(range(steps), description, total=steps):
        x, y = next(stream)
        x, y = x.to(ctx.device), y.to(ctx.device)
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        total += loss.item()
    model.eval()
    return total / steps


def steps_per_epoch(ctx: Context) -> int:
    return math.ceil(len(ctx.splits.train) / ctx.config.data.batch_size)
