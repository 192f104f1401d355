"""Stage `finetune`: recovery training (distillation, InCoP stopping), checkpointed every epoch."""

from __future__ import annotations

from torch import nn

from pipeline.context import STAGES, Context, StageResult
from stages._recovery import Budget, recover
from stages._training import evaluate, steps_per_epoch, teacher_and_reference

PROGRESS = "progress.pt"


@STAGES.register("finetune")
class Finetune:
    distributed = True  # under torchrun every rank trains its share of each global batch
    description = "recover accuracy: CE + distillation, stopped by recovery.stopping, resumable per epoch"

    @staticmethod
    def off(config) -> str | None:
        cfg = config.finetune
        return None if cfg.enabled and cfg.max_epochs else \
            ("finetune.enabled is false" if not cfg.enabled else "finetune.max_epochs is 0")

    def run(self, model: nn.Module | None, ctx: Context) -> StageResult:
        cfg = ctx.config.finetune
        before = evaluate(model, ctx)
        if not cfg.enabled or cfg.max_epochs == 0:
            return StageResult(status="skipped", metrics={"reason": "finetune disabled", **before})
        teacher, reference = teacher_and_reference(model, ctx)
        budget = Budget(rounds=cfg.max_epochs, steps=steps_per_epoch(ctx), lr=cfg.lr, lr_key="finetune.lr")
        model, outcome = recover(model, ctx, budget, teacher, reference, "epoch", seed=17,
                                 resume=ctx.stage_dir / PROGRESS, milestone="finetune epoch")
        (ctx.stage_dir / PROGRESS).unlink(missing_ok=True)  # only a killed attempt resumes; --from trains anew
        after = evaluate(model, ctx)
        metrics = {"epochs": outcome.rounds, "steps_per_epoch": budget.steps, "stopped_by": outcome.stopped_by,
                   "top1_before": before["top1"], **after}
        return StageResult(model=model, metrics=metrics, state={"recovery": outcome.record()})
