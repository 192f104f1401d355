"""Stage `load`: build the model by name and load its local weights."""

from __future__ import annotations

from torch import nn

from pipeline.context import STAGES, Context, StageResult
from pipeline.models import build_model, count_macs


@STAGES.register("load")
class Load:
    name = "load"
    description = "build the model (timm/torchvision by name) and load its local weights"

    def run(self, model: nn.Module | None, ctx: Context) -> StageResult:
        spec = ctx.config.model
        model = build_model(spec).to(ctx.device).eval()
        gflops, params = count_macs(model, spec)
        source = str(spec.weights) if spec.weights else ("pretrained cache" if spec.pretrained else "random init")
        return StageResult(model=model, metrics={"gflops": gflops, "params_m": params, "weights": source})
