"""Stage `load`: build the model (by name, from the user's factory or object) and load its local weights."""

from __future__ import annotations

from torch import nn

from core._weights import nonfinite_tensors
from core.context import STAGES, Context, StageResult
from core.data import check_classes, class_info
from core.errors import UserInputError
from core.models import build_model, check_deterministic, count_macs


@STAGES.register("load")
class Load:
    description = ("build the model (timm/torchvision by name, a Hugging Face checkpoint, or your own) and load its "
                   "local weights")

    def run(self, model: nn.Module | None, ctx: Context) -> StageResult:
        spec = ctx.config.model
        if spec.source == "python":
            check_deterministic(spec)
        model = build_model(spec).to(ctx.device).eval()
        bad = nonfinite_tensors(model.state_dict())
        if bad:
            raise UserInputError(f"the model's weights hold NaN or Inf values in {len(bad)} tensor(s): "
                                 f"{', '.join(bad[:8])}. It diverged when it was trained (or the file is damaged); "
                                 f"use a checkpoint from before that happened")
        error, warning = check_classes(spec.num_classes, class_info(ctx.config))
        if error:
            raise UserInputError(error)
        if warning:
            ctx.log.warning(warning)
        metrics = {}
        skipped = ctx.splits.skipped
        if skipped:
            ctx.log.warning(f"data.skip_corrupt: {len(skipped)} unreadable image(s) skipped: "
                            f"{', '.join(skipped[:10])}" + (" ..." if len(skipped) > 10 else ""))
            metrics["skipped_images"] = len(skipped)
        gflops, params = count_macs(model, spec)
        checkpoint = "the checkpoint folder" if spec.source == "huggingface" else "pretrained cache"
        source = str(spec.weights) if spec.weights else (checkpoint if spec.pretrained else
                                                         "the model object" if spec.source == "module" else
                                                         "random init")
        return StageResult(model=model, metrics={"gflops": gflops, "params_m": params, "weights": source,
                                                 **metrics},
                           state={"skipped_images": skipped} if skipped else {})
