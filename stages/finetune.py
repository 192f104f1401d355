"""Stage `finetune`: recovery training (distillation, InCoP stopping), checkpointed every epoch."""

from __future__ import annotations

from typing import Any

from pydantic import Field
from torch import nn

from core.config import Section
from core.context import STAGES, Context, StageResult
from core.records import RunRecords, dynamics_row
from stages._recovery import Budget, recover
from stages._training import evaluate, steps_per_epoch, teacher_and_reference


class FinetuneConfig(Section):
    """Recovery fine-tuning: up to max_epochs, stopped by recovery.stopping."""

    enabled: bool = Field(True, description="run recovery fine-tuning")
    max_epochs: int = Field(3, ge=0, description="most epochs; recovery.stopping may end it sooner")
    lr: float = Field(0.01, gt=0.0, description="peak learning rate")


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

    @staticmethod
    def dynamics(rec: RunRecords, before: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """The report's dynamics row: the model after fine-tuning (its size is the last kept row's)."""
        last = next((r for r in reversed(before) if r["accepted"]), None)
        if rec.manifest["stages"].get("finetune", {}).get("status") != "done" or last is None:
            return []
        m = rec.metrics("finetune")
        return [dynamics_row("finetune", f"{m.get('epochs')} epoch(s)", last["params_m"], last["gflops"],
                             m.get("top1"), m.get("top5"), True, m.get("epochs"), m.get("stopped_by"))]

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
