"""InCoP flow vectors (docs/method.md section 4): information flow (IF) and gradient flow (GF), and their distance."""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from stages._flows import MEASURED


class InformationFlow:
    """Spatially averaged outputs of every conv/linear layer, in execution order, for IF pairs."""

    def __init__(self) -> None:
        self.acts: dict[str, list[torch.Tensor]] = {}
        self.order: list[str] = []
        self.batches = 0

    def attach(self, model: nn.Module) -> list:
        def hook(name: str):
            def fn(mod: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
                a = output.float()
                a = a.flatten(2).mean(2) if a.ndim > 2 and isinstance(mod, nn.Conv2d) else a.reshape(-1, a.shape[-1])
                if name not in self.acts:
                    self.order.append(name)
                self.acts.setdefault(name, []).append(a.detach().cpu())

            return fn

        return [m.register_forward_hook(hook(n)) for n, m in model.named_modules() if isinstance(m, MEASURED)]

    def result(self) -> dict[str, float]:
        """Phi per consecutive pair "a|b": the mean Pearson correlation between their channels over the data."""
        z = {}
        for name in self.order:
            a = torch.cat(self.acts[name])
            z[name] = (a - a.mean(0)) / a.std(0, unbiased=False).clamp(min=1e-6)
        phi = {}
        for a, b in zip(self.order, self.order[1:], strict=False):
            if z[a].shape[0] != z[b].shape[0]:
                continue  # token-wise layers beside pooled ones: rows do not correspond
            phi[f"{a}|{b}"] = float((z[a].T @ z[b]).mean() / z[a].shape[0])
        return phi


def gradient_flow(model: nn.Module) -> dict[str, float]:
    """mean |grad W| per conv/linear layer from the gradients currently held (after real backward passes)."""
    return {n: float(m.weight.grad.abs().mean()) for n, m in model.named_modules()
            if isinstance(m, MEASURED) and m.weight.grad is not None}


def reference_gradient_flow(model: nn.Module, batches: Any, device: torch.device) -> dict[str, float]:
    """GF of the dense model: mean over the batches of mean |grad W| of the recovery loss (its distillation
    term has zero gradient when the student is the teacher, so cross-entropy alone)."""
    sums: dict[str, float] = {}
    n = 0
    model.eval()
    for x, y in batches:
        model.zero_grad(set_to_none=True)
        F.cross_entropy(model(x.to(device)), y.to(device)).backward()
        for k, v in gradient_flow(model).items():
            sums[k] = sums.get(k, 0.0) + v
        n += 1
    model.zero_grad(set_to_none=True)
    return {k: v / max(n, 1) for k, v in sums.items()}


def flow_distance(phi: dict[str, float], reference: dict[str, float]) -> float:
    """||Phi - Phi*||_2 over the entries both have (layers removed by truncation drop out)."""
    common = [k for k in reference if k in phi]
    if not common:
        return math.inf
    return math.sqrt(sum((phi[k] - reference[k]) ** 2 for k in common))
