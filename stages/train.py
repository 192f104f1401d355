"""Stage `train`: train the base model when the config asks (no pretrained weights, e.g. the demo)."""

from __future__ import annotations

from torch import nn

from pipeline.config import RecoveryConfig
from pipeline.context import STAGES, Context, StageResult
from stages._recovery import Budget, recover
from stages._training import evaluate, steps_per_epoch


@STAGES.register("train")
class Train:
    distributed = True  # under torchrun every rank trains its share of each global batch
    description = "train the base model (only when train.enabled)"

    @staticmethod
    def off(config) -> str | None:
        return None if config.train.enabled else "train.enabled is false"

    def run(self, model: nn.Module | None, ctx: Context) -> StageResult:
        cfg = ctx.config.train
        if not cfg.enabled:
            return StageResult(status="skipped", metrics={"reason": "train.enabled is false"})
        plain = RecoveryConfig(momentum=cfg.momentum, weight_decay=cfg.weight_decay, distill_weight=0.0,
                               stopping="fixed")
        budget = Budget(rounds=cfg.epochs, steps=steps_per_epoch(ctx), lr=cfg.lr, lr_key="train.lr")
        model, outcome = recover(model, ctx, budget, None, {}, "epoch", seed=1, cfg=plain, milestone="train epoch")
        return StageResult(model=model, metrics={"epochs": outcome.rounds, "final_loss": outcome.history[-1]["loss"],
                                                 **evaluate(model, ctx)})
