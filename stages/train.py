"""Stage `train`: train the base model when the config asks (no pretrained weights, e.g. the demo)."""

from __future__ import annotations

from torch import nn

from pipeline.runner import STAGES, Context, StageResult
from stages._training import evaluate, steps_per_epoch, train_steps


@STAGES.register("train")
class Train:
    name = "train"
    description = "train the base model (only when train.enabled)"

    def run(self, model: nn.Module | None, ctx: Context) -> StageResult:
        cfg = ctx.config.train
        if not cfg.enabled:
            return StageResult(status="skipped", metrics={"reason": "train.enabled is false"})
        steps = cfg.epochs * steps_per_epoch(ctx)
        loss = train_steps(model, ctx, steps, cfg.lr, f"{cfg.epochs} epochs", cfg.momentum, cfg.weight_decay)
        return StageResult(model=model, metrics={"epochs": cfg.epochs, "steps": steps, "final_loss": loss,
                                                 **evaluate(model, ctx)})
