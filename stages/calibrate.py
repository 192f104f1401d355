"""Stage `calibrate`: one no-grad pass collecting the flow statistics later stages need, plus base metrics."""

from __future__ import annotations

from pydantic import Field
from torch import nn

from core.config import Section
from core.context import STAGES, Context, StageResult
from core.models import count_macs
from stages._blocks import measure_blocks
from stages._flows import UnitStats, calibration_pass
from stages._incop import InformationFlow, reference_gradient_flow
from stages._training import evaluate


class CalibrateConfig(Section):
    """Flow calibration: forward hooks over a slice of train, no gradients."""

    batches: int = Field(4, ge=1, description="calibration batches")
    batch_size: int = Field(64, ge=1, description="images per calibration batch")


@STAGES.register("calibrate")
class Calibrate:
    description = "one pass measuring unit and block flows on the calibration split; base metrics"

    def run(self, model: nn.Module | None, ctx: Context) -> StageResult:
        units, flow = UnitStats(), InformationFlow()
        blocks, unit_div = measure_blocks(model)
        calibration_pass(model, ctx, [units, blocks, unit_div, flow])
        stats = units.result()
        # InCoP's gradient-flow reference needs real backward passes of the dense model
        loader = ctx.loader("calibration")
        grad_ref = reference_gradient_flow(model, ctx.track(loader, "gradient flow"), ctx.device)
        gflops, params = count_macs(model, ctx.config.model)
        base = {**evaluate(model, ctx), "gflops": gflops, "params_m": params}
        return StageResult(metrics={"base": base, "layers_measured": len(stats)},
                           state={"base": base, "unit_stats": stats, "block_rows": blocks.result(),
                                  "unit_divergence": unit_div.result(), "information_flow": flow.result(),
                                  "gradient_flow": grad_ref})
