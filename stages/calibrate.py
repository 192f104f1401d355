"""Stage `calibrate`: one no-grad pass collecting the flow statistics later stages need, plus base metrics."""

from __future__ import annotations

from torch import nn

from pipeline.models import count_macs
from pipeline.runner import STAGES, Context, StageResult
from stages._flows import collect_unit_stats
from stages._training import evaluate


@STAGES.register("calibrate")
class Calibrate:
    name = "calibrate"
    description = "measure unit flows on the calibration split; score the base model on validation"

    def run(self, model: nn.Module | None, ctx: Context) -> StageResult:
        stats = collect_unit_stats(model, ctx)
        gflops, params = count_macs(model, ctx.config.model)
        base = {**evaluate(model, ctx), "gflops": gflops, "params_m": params}
        return StageResult(metrics={"base": base, "layers_measured": len(stats)},
                           state={"base": base, "unit_stats": stats})
