"""Flow statistics from forward hooks: per-unit activation norms and per-block shapes and divergences.

Several collectors share one no-grad pass over the calibration split (docs/method.md section 1).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from core.context import Context
from stages._attention import HeadStats

MEASURED = (nn.Conv2d, nn.Linear)


def _per_channel_norm(t: torch.Tensor, channel_dim: int) -> torch.Tensor:
    """Conv (B,C,H,W): mean over samples of the per-channel L2 norm over space.
    Linear (B,...,N): per-feature L2 norm over all rows divided by sqrt(#rows) (docs/method.md section 2).
    """
    if channel_dim == 1:
        return t.flatten(2).norm(dim=2).mean(0)
    rows = t.reshape(-1, t.shape[-1])
    return rows.norm(dim=0) / rows.shape[0] ** 0.5


class UnitStats:
    """Per conv/linear layer: `in_norm`, the norm of each input channel as it arrives (the producing units'
    signal after their normalisation, activation and any residual add); `out_relu_norm`, ReLU of the raw
    output per channel (the published form); `out_numel`, C*H*W of one output sample. Per head-prunable
    attention module: `head_norm`, the per-head attention output norm (stages/_attention.py)."""

    def __init__(self) -> None:
        self.sums: dict[str, dict[str, Any]] = {}
        self.batches = 0
        self.heads = HeadStats()

    def attach(self, model: nn.Module) -> list:
        def hook(name: str):
            def fn(mod: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
                cdim = 1 if isinstance(mod, nn.Conv2d) else -1
                e = self.sums.setdefault(name, {"in_norm": 0.0, "out_relu_norm": 0.0,
                                                "out_numel": int(output[0].numel())})
                with torch.no_grad():  # also attached to gradient passes (accumulate_gradients)
                    e["in_norm"] = e["in_norm"] + _per_channel_norm(inputs[0].detach().float(), cdim).cpu()
                    e["out_relu_norm"] = e["out_relu_norm"] + _per_channel_norm(output.detach().float().relu(),
                                                                                cdim).cpu()

            return fn

        handles = [m.register_forward_hook(hook(n)) for n, m in model.named_modules() if isinstance(m, MEASURED)]
        return handles + self.heads.attach(model)

    def result(self) -> dict[str, Any]:
        n = max(self.batches, 1)
        self.heads.batches = self.batches
        out = {k: {"in_norm": e["in_norm"] / n, "out_relu_norm": e["out_relu_norm"] / n, "out_numel": e["out_numel"]}
               for k, e in self.sums.items()}
        return {**out, **self.heads.result()}


class BlockStats:
    """Per module: input/output shapes, calls per forward, and the block divergence terms
    E||y - x|| and E||x|| (per-sample L2 norms) where the output has the input's shape."""

    def __init__(self) -> None:
        self.rows: dict[str, dict[str, Any]] = {}
        self.batches = 0

    def attach(self, model: nn.Module) -> list:
        def hook(name: str):
            def fn(mod: nn.Module, inputs: tuple, kwargs: dict[str, Any], output: Any) -> None:
                row = self.rows.setdefault(name, {"calls": 0, "diff": 0.0, "norm": 0.0, "in_shape": None,
                                                  "out_shape": None, "single": True})
                row["calls"] += 1
                tensors_in = [t for t in inputs if isinstance(t, torch.Tensor)]
                if len(inputs) != 1 or len(tensors_in) != 1 or not isinstance(output, torch.Tensor):
                    row["single"] = False
                    return
                x = tensors_in[0]
                row["in_shape"], row["out_shape"] = list(x.shape[1:]), list(output.shape[1:])
                if x.shape == output.shape:
                    row["diff"] += float((output - x).flatten(1).norm(dim=1).sum())
                    row["norm"] += float(x.flatten(1).norm(dim=1).sum())
                    if name not in self.samples:
                        # a block may be called with more than its input (a transformer block's rope= or mask=):
                        # the residual test calls it the same way, on the same two samples
                        self.samples[name] = (x[:2].detach().clone(), {
                            k: (v[:2] if v.dim() and v.shape[0] == x.shape[0] else v).detach().clone()
                            if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()})

            return fn

        self.samples: dict[str, tuple[torch.Tensor, dict[str, Any]]] = {}
        return [m.register_forward_hook(hook(n), with_kwargs=True) for n, m in model.named_modules() if n]

    @torch.no_grad()
    def finish(self, model: nn.Module) -> None:
        """Mark residual blocks: with every parameter zeroed, y = x + f(x) becomes exactly the identity."""
        for name, (x, kwargs) in self.samples.items():
            mod = model.get_submodule(name)
            zeros = {k: torch.zeros_like(p) for k, p in mod.named_parameters()}
            if not zeros:
                continue
            try:
                y = torch.func.functional_call(mod, zeros, (x,), kwargs)
            except Exception:  # noqa: BLE001 - a module that cannot run this way is simply not residual
                continue
            scale = float(x.abs().max()) or 1.0
            self.rows[name]["residual"] = bool(torch.allclose(y, x, rtol=0.0, atol=1e-6 * scale))
        self.samples.clear()

    def result(self) -> dict[str, Any]:
        n = max(self.batches, 1)
        out = {}
        for name, r in self.rows.items():
            out[name] = {**r, "calls": r["calls"] // n, "residual": r.get("residual", False),
                         "divergence": r["diff"] / r["norm"] if r["norm"] > 0 else None}
        return out


@torch.no_grad()
def calibration_pass(model: nn.Module, ctx: Context, collectors: list, description: str = "calibration") -> None:
    """One eval pass over the calibration split feeding every collector."""
    handles = [h for c in collectors for h in c.attach(model)]
    model.eval()
    try:
        loader = ctx.loader("calibration")
        for x, _ in ctx.track(loader, description):
            model(x.to(ctx.device))
            for c in collectors:
                c.batches += 1
    finally:
        for h in handles:
            h.remove()
    for c in collectors:
        if hasattr(c, "finish"):
            c.finish(model)


def collect_unit_stats(model: nn.Module, ctx: Context, description: str = "calibration") -> dict[str, Any]:
    """Unit statistics alone (for re-measuring after the model changed)."""
    units = UnitStats()
    calibration_pass(model, ctx, [units], description)
    return units.result()
