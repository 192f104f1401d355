"""Stage `train`: train the base model when the config asks (no pretrained weights, e.g. the demo)."""

from __future__ import annotations

from pydantic import Field
from torch import nn

from core.config import Section
from core.context import STAGES, Context, StageResult
from stages._recovery import Budget, RecoveryConfig, recover
from stages._training import evaluate, steps_per_epoch


class TrainConfig(Section):
    """Train the base model (only when no trained weights exist, e.g. the offline demo)."""

    enabled: bool = Field(False, description="train the base model before compressing it")
    epochs: int = Field(5, ge=1, description="SGD epochs, cosine schedule")
    lr: float = Field(0.05, gt=0.0, description="peak learning rate")
    momentum: float = Field(0.9, ge=0.0, lt=1.0, description="SGD momentum")
    weight_decay: float = Field(5e-4, ge=0.0, description="L2 weight decay (not on norms and biases)")


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
