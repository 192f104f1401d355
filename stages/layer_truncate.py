"""Stage `layer_truncate`: IDAP++ flow-guided layer truncation with rollback (METHOD.md section 4)."""

from __future__ import annotations

import itertools
from typing import Any

from torch import nn

from pipeline.context import STAGES, Context, StageResult
from pipeline.models import clone, count_macs
from stages._blocks import find_candidates, measure_blocks, replace_with_identity
from stages._flows import calibration_pass
from stages._recovery import Budget, recover
from stages._training import evaluate, teacher_and_reference


def measure(model: nn.Module, ctx: Context, description: str) -> tuple[dict[str, Any], dict[str, float]]:
    """Block shapes and divergences D = E||y - x|| / E||x|| of the current model."""
    rows, unit_div = measure_blocks(model)
    calibration_pass(model, ctx, [rows, unit_div], description)
    return rows.result(), unit_div.result()


@STAGES.register("layer_truncate")
class LayerTruncate:
    name = "layer_truncate"
    description = "replace the lowest-divergence blocks by the identity; keep a removal only within budget"

    def run(self, model: nn.Module | None, ctx: Context) -> StageResult:
        cfg = ctx.config.layer_truncate
        if not cfg.enabled or cfg.max_layers == 0:
            return StageResult(status="skipped", metrics={"reason": "layer_truncate is disabled"})
        spec = ctx.config.model
        measured: tuple[dict[str, Any], dict[str, float]] | None = None
        if ctx.manifest["stages"].get("filter_prune", {}).get("status") == "skipped":
            calib = ctx.stage_state("calibrate")  # the model is the one calibrated: reuse that pass
            measured = (calib["block_rows"], calib["unit_divergence"])
        gflops0, _ = count_macs(model, spec)
        start = evaluate(model, ctx)
        current = dict(start)
        teacher, reference = teacher_and_reference(model, ctx)
        budget = Budget(rounds=cfg.recovery_rounds, steps=cfg.recovery_steps, lr=cfg.recovery_lr,
                        lr_key="layer_truncate.recovery_lr")
        decisions: list[dict[str, Any]] = []
        removed: list[str] = []
        essential: set[str] = set()
        candidates, rejected = None, {}
        stop = f"removed max_layers={cfg.max_layers} blocks"
        for t in ctx.track(itertools.count(), "truncation decisions"):
            if len(removed) >= cfg.max_layers:
                break
            if measured is None:
                measured = measure(model, ctx, f"block flows, round {t + 1}")
            blocks, why = find_candidates(model, *measured, cfg.min_flops_share)
            if candidates is None:
                candidates, rejected = [b.as_record() for b in blocks], why
            blocks = [b for b in blocks if b.name not in essential]
            if not blocks:
                stop = ("no removable block in this model: " + "; ".join(f"{n} module(s) {r}" for r, n in
                                                                         why.items())) if not candidates \
                    else "no candidate left (the rest are essential)"
                break
            best = min(blocks, key=lambda b: (b.divergence, b.name))
            snapshot = clone(model)
            replace_with_identity(model, best.modules)
            model, outcome = recover(model, ctx, budget, teacher, reference, f"recovery {t + 1}", seed=200 + t)
            after = evaluate(model, ctx)
            accepted = start["top1"] - after["top1"] <= cfg.max_accuracy_drop
            g_after, p_after = count_macs(model, spec)
            decisions.append({**best.as_record(), "top1_before": current["top1"], "top1_after": after["top1"],
                              "top5_after": after["top5"], "gflops_after": g_after, "params_m_after": p_after,
                              "accepted": accepted, "recovery_rounds": outcome.rounds,
                              "recovery_stop": outcome.stopped_by})
            for key, value in (("divergence", best.divergence), ("top1_after", after["top1"]),
                               ("gflops_after", g_after), ("params_m_after", p_after), ("accepted", accepted)):
                ctx.metric(f"truncate/{key}", float(value), step=t + 1)
            if accepted:
                removed.append(best.name)
                current = after
                measured = None  # flows change after a removal: re-score
            else:
                model = snapshot  # exact block and weights back; the measured flows are valid again
                essential.add(best.name)
            ctx.milestone(f"layer_truncate decision {t + 1}: {best.name} (D={best.divergence:.4f}, "
                          f"{best.macs_share:.1%} of MACs): top-1 {decisions[-1]['top1_before']:.2f} -> "
                          f"{after['top1']:.2f} (start {start['top1']:.2f}), GMACs {g_after:.4g}: "
                          + ("removed" if accepted else "ROLLED BACK, marked essential (top-1 budget)")
                          + f" [{len(removed)}/{cfg.max_layers} removed]")
        gflops, params = count_macs(model, spec)
        ctx.log.info(f"layer_truncate stopped: {stop}")
        metrics = {"removed_blocks": removed, "decisions": len(decisions), "candidates": len(candidates or []),
                   "stop_reason": stop, "gflops_before": gflops0, "gflops": gflops, "params_m": params,
                   "flops_reduction": 1.0 - gflops / gflops0, "top1_start": start["top1"], **current}
        state = {"decisions": decisions, "removed_blocks": removed, "candidates": candidates or [],
                 "rejected": rejected, "stop_reason": stop}
        return StageResult(model=model, metrics=metrics, state=state)
