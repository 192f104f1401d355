"""Stage `finetune`: cross-entropy recovery with a fixed epoch budget."""

from __future__ import annotations

from torch import nn

from pipeline.runner import STAGES, Context, StageResult
from stages._training import evaluate, steps_per_epoch, train_steps


@STAGES.register("finetune")
class Finetune:
    name = "finetune"
    description = "recover accuracy with cross-entropy fine-tuning (fixed epochs)"

    def run(self, model: nn.Module | None, ctx: Context) -> StageResult:
        cfg = ctx.config.finetune
        before = evaluate(model, ctx)
        if not cfg.enabled or cfg.epochs == 0:
            return StageResult(status="skipped", metrics={"reason": "finetune disabled", **before})
        steps = cfg.epochs * steps_per_epoch(ctx)
        loss = train_steps(model, ctx, steps, cfg.lr, f"{cfg.epochs} epochs", cfg.momentum, cfg.weight_decay,
                           seed=17)
        after = evaluate(model, ctx)
        return StageResult(model=model, metrics={"epochs": cfg.epochs, "final_loss": loss,
                                                 "top1_before": before["top1"], **after})
