"""Flow statistics from forward hooks: per-unit activation norms for the divergence criteria."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from pipeline.runner import Context

MEASURED = (nn.Conv2d, nn.Linear)


def _per_channel_norm(t: torch.Tensor, channel_dim: int) -> torch.Tensor:
    """Conv (B,C,H,W): mean over samples of the per-channel L2 norm over space.
    Linear (B,...,N): per-feature L2 norm over all rows divided by sqrt(#rows) (METHOD.md section 3).
    """
    if channel_dim == 1:
        return t.flatten(2).norm(dim=2).mean(0)
    rows = t.reshape(-1, t.shape[-1])
    return rows.norm(dim=0) / rows.shape[0] ** 0.5


@torch.no_grad()
def collect_unit_stats(model: nn.Module, ctx: Context, description: str = "calibration") -> dict[str, Any]:
    """One eval pass over the calibration split.

    For every conv/linear layer: `in_norm`, the norm of each input channel as it arrives, i.e. the
    signal of the producing units after their normalisation and activation (and any residual add);
    `out_relu_norm`, ReLU of the raw output per channel (the published form); `out_numel`, C*H*W of one
    output sample.
    """
    sums: dict[str, dict[str, Any]] = {}
    batches = {"n": 0}

    def hook(name: str):
        def fn(mod: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
            x = inputs[0]
            cdim = 1 if isinstance(mod, nn.Conv2d) else -1
            entry = sums.setdefault(name, {"in_norm": 0.0, "out_relu_norm": 0.0,
                                           "out_numel": int(output[0].numel())})
            entry["in_norm"] = entry["in_norm"] + _per_channel_norm(x.float(), cdim).cpu()
            entry["out_relu_norm"] = entry["out_relu_norm"] + _per_channel_norm(output.float().relu(), cdim).cpu()

        return fn

    handles = [m.register_forward_hook(hook(n)) for n, m in model.named_modules() if isinstance(m, MEASURED)]
    model.eval()
    try:
        for x, _ in ctx.track(ctx.loader("calibration", batch_size=ctx.config.calibrate.batch_size), description):
            model(x.to(ctx.device))
            batches["n"] += 1
    finally:
        for h in handles:
            h.remove()
    n = max(batches["n"], 1)
    return {name: {"in_norm": e["in_norm"] / n, "out_relu_norm": e["out_relu_norm"] / n,
                   "out_numel": e["out_numel"]} for name, e in sums.items()}
