"""The one recovery engine: CE + distillation, InCoP stopping, DDP under torchrun, per-round resume."""

from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn
from torch.utils.data import DataLoader

from core import distributed as D
from core._progress import eta
from core.config import Section
from core.context import Context
from core.errors import UserInputError
from core.rundir import atomic_torch_save, load_checkpoint
from stages._flows import calibration_pass
from stages._incop import InformationFlow, flow_distance, gradient_flow
from stages._training import evaluate


class RecoveryConfig(Section):
    """Loss, optimiser and stopping rule of every recovery: fine-tuning and the short ones between steps."""

    optimizer: Literal["sgd", "adamw"] = Field("sgd", description="SGD with Nesterov momentum, or AdamW")
    momentum: float = Field(0.9, ge=0.0, lt=1.0, description="SGD momentum")
    weight_decay: float = Field(5e-4, ge=0.0, description="not on norms and biases")
    schedule: Literal["cosine", "step"] = Field("cosine", description="learning-rate schedule over the budget")
    warmup_fraction: float = Field(0.0, ge=0.0, lt=1.0, description="share of the budget spent warming up")
    step_every: int = Field(1, ge=1, description="step schedule: rounds between decays")
    step_gamma: float = Field(0.1, gt=0.0, le=1.0, description="step schedule: factor at each decay")
    grad_clip: float | None = Field(None, gt=0.0, description="max gradient norm")
    label_smoothing: float = Field(0.0, ge=0.0, lt=1.0, description="of the cross-entropy term")
    distill_weight: float = Field(0.5, ge=0.0, le=1.0, description="lambda of the distillation term")
    temperature: float = Field(4.0, gt=0.0, description="distillation temperature tau")
    teacher: Literal["stage_input", "base"] = Field("base", description="distil from the base model or the "
                                                                       "model entering the stage")
    stopping: Literal["fixed", "accuracy", "information_flow", "gradient_flow"] = Field(
        "fixed", description="when a recovery stops early: never (fixed), at the base top-1, or InCoP flow "
        "consistency")
    epsilon: float | None = Field(None, gt=0.0, description="flow distance that stops (default IF 0.11, GF 0.5)")
    amp: bool = Field(True, description="mixed precision on CUDA")
    channels_last: bool = Field(True, description="channels-last memory format on CUDA")

    def threshold(self) -> float:
        """epsilon, or the InCoP authors' default for the stopping rule."""
        return self.epsilon if self.epsilon is not None else {"gradient_flow": 0.5}.get(self.stopping, 0.11)


@dataclass
class Budget:
    """How much a recovery may train: up to `rounds` rounds of `steps` optimiser steps each."""

    rounds: int
    steps: int
    lr: float
    lr_key: str = "the learning rate"  # the config key that set `lr`, for messages


class TrainingDiverged(UserInputError):
    """The loss became NaN or Inf: the stage stops, nothing of it is checkpointed (exit 2)."""


def _diverged(description: str, budget: Budget, value: float, rnd: int, amp: bool) -> TrainingDiverged:
    return TrainingDiverged(
        f"{description}: training diverged (loss {value}) in round {rnd + 1}; nothing of this stage is saved. The "
        f"learning rate is the likely cause: lower {budget.lr_key} (now {budget.lr:g}), e.g. to {budget.lr / 5:g}"
        + (", or set recovery.amp: false" if amp else "") + ", or set recovery.grad_clip, then run the same "
        "command again")


@dataclass
class Outcome:
    """What a recovery did and why it stopped."""

    rounds: int = 0
    stopped_by: str = "budget"
    history: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0

    def record(self) -> dict[str, Any]:
        return {"rounds": self.rounds, "stopped_by": self.stopped_by, "seconds": round(self.seconds, 3),
                "history": self.history}


AUX_WEIGHT = 0.4  # auxiliary classifiers' share of the loss, as Inception's authors train them


def split_outputs(out: Any) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """A model's training output: the logits, plus the auxiliary classifiers' logits when it returns several
    (e.g. a named tuple (logits, aux_logits)); in eval mode such models return the logits alone."""
    if isinstance(out, torch.Tensor):
        return out, []
    parts = [t for t in out if isinstance(t, torch.Tensor)] if isinstance(out, (tuple, list)) else []
    if not parts:
        raise TypeError(f"the model returned {type(out).__name__}; expected logits or a tuple of logits")
    return parts[0], parts[1:]


def task_loss(out: Any, y: torch.Tensor, label_smoothing: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Cross-entropy of the logits plus AUX_WEIGHT times each auxiliary classifier's; returns (loss, logits)."""
    logits, aux = split_outputs(out)
    logits = logits.float()
    loss = F.cross_entropy(logits, y, label_smoothing=label_smoothing)
    for a in aux:
        loss = loss + AUX_WEIGHT * F.cross_entropy(a.float(), y)
    return loss, logits


def distill_loss(student: Any, teacher: torch.Tensor | None, y: torch.Tensor, cfg: RecoveryConfig,
                 ) -> torch.Tensor:
    """(1 - lambda) CE(z_s, y) + lambda tau^2 KL(softmax(z_t / tau) || softmax(z_s / tau)), the CE term as in
    `task_loss` (auxiliary classifiers included; the teacher distils into the main logits only)."""
    ce, student = task_loss(student, y, cfg.label_smoothing)
    if teacher is None or cfg.distill_weight == 0:
        return ce
    tau = cfg.temperature
    kl = F.kl_div(F.log_softmax(student / tau, dim=1), F.log_softmax(teacher / tau, dim=1), log_target=True,
                  reduction="batchmean")
    return (1 - cfg.distill_weight) * ce + cfg.distill_weight * tau * tau * kl


def _optimizer(model: nn.Module, cfg: RecoveryConfig, lr: float) -> torch.optim.Optimizer:
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim > 1]
    rest = [p for p in model.parameters() if p.requires_grad and p.ndim <= 1]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": rest, "weight_decay": 0.0}]
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=lr)
    return torch.optim.SGD(groups, lr=lr, momentum=cfg.momentum, nesterov=cfg.momentum > 0)


def _schedule(opt: torch.optim.Optimizer, cfg: RecoveryConfig, budget: Budget):
    total = max(budget.rounds * budget.steps, 1)
    warm = int(cfg.warmup_fraction * total)

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        if cfg.schedule == "step":
            return cfg.step_gamma ** (step // (budget.steps * cfg.step_every))
        return 0.5 * (1 + math.cos(math.pi * (step - warm) / max(total - warm, 1)))

    return torch.optim.lr_scheduler.LambdaLR(opt, factor)


def _scaler(device: torch.device, cfg: RecoveryConfig) -> torch.amp.GradScaler:
    """The loss scaler of mixed precision: active on CUDA with recovery.amp, a no-op elsewhere."""
    return torch.amp.GradScaler("cuda", enabled=device.type == "cuda" and cfg.amp)


def _rng_state() -> dict[str, Any]:
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    # plain data and tensors only, so that the checkpoint loads with weights_only=True
    state = {"torch": torch.get_rng_state(), "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos,
                                                        has_gauss, gauss], "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class _Stream:
    """Endless training batches: each epoch a seeded permutation cut into global batches, this rank's share."""

    def __init__(self, ctx: Context, seed: int, start_step: int) -> None:
        self.ds, self.ctx, self.seed = ctx.splits.train, ctx, seed
        self.bs = ctx.config.data.batch_size
        self.me, self.world = ctx.world
        self.per_epoch = len(D.global_batches(len(self.ds), self.bs, seed, 0, self.me, self.world))
        self.step = start_step

    def __iter__(self):
        while True:
            epoch, offset = divmod(self.step, self.per_epoch)
            batches = D.global_batches(len(self.ds), self.bs, self.seed, epoch, self.me, self.world)[offset:]
            loader = DataLoader(self.ds, batch_sampler=batches, num_workers=self.ctx.config.data.num_workers)
            for x, y in loader:
                self.step += 1
                yield x, y


def _stop_reason(rule: str, model: nn.Module, ctx: Context, reference: dict[str, Any], eps: float,
                 row: dict[str, Any], grad_flow: dict[str, float] | None) -> str | None:
    """Check the stopping rule on the current model; fills `row` with what it measured."""
    if rule == "accuracy":
        row.update(evaluate(model, ctx))
        return "accuracy reached the reference" if row["top1"] >= reference["top1"] else None
    if rule == "information_flow":
        flow = InformationFlow()
        calibration_pass(model, ctx, [flow], "information flow")
        row["distance"] = flow_distance(flow.result(), reference["information_flow"])
    elif rule == "gradient_flow":
        if grad_flow is None:
            return None
        row["distance"] = flow_distance(grad_flow, reference["gradient_flow"])
    else:
        return None
    stop = D.broadcast(row["distance"] <= eps, ctx.ddp)  # every rank takes rank 0's decision
    return f"{rule} distance {row['distance']:.4f} <= epsilon {eps:g}" if stop else None


def recover(model: nn.Module, ctx: Context, budget: Budget, teacher: nn.Module | None, reference: dict[str, Any],
            description: str, seed: int, resume: Path | None = None, cfg: RecoveryConfig | None = None,
            milestone: str | None = None) -> tuple[nn.Module, Outcome]:
    """Train `model` to recover, up to the budget, stopping early by `recovery.stopping`.

    The rule is checked after each round, as InCoP does after each epoch: a pruned model whose flows still
    look consistent before any training is not taken as recovered (measured: that let IF skip every
    recovery of the demo and lose the accuracy budget).

    Under torchrun the model trains in DDP (gloo on CPU, nccl on CUDA) on this rank's share of each global
    batch. With `resume`, the full training state is saved after every round and picked up again after a kill.
    """
    cfg, device = cfg or ctx.config.recovery, ctx.device
    rule, eps = cfg.stopping, cfg.threshold()
    out = Outcome()
    t0, started = time.perf_counter(), time.monotonic()
    if budget.rounds == 0 or budget.steps == 0:
        out.stopped_by = "no recovery budget"
        return model, out
    cuda = device.type == "cuda"
    if cuda and cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    opt = _optimizer(model, cfg, budget.lr)
    sched = _schedule(opt, cfg, budget)
    scaler = _scaler(device, cfg)
    start_round = 0
    if resume is not None and resume.is_file():
        saved = load_checkpoint(resume)
        if saved.get("key") == ctx.resume_key:
            model.load_state_dict(saved["model"])
            opt.load_state_dict(saved["optimizer"])
            sched.load_state_dict(saved["scheduler"])
            if saved["scaler"] and scaler.is_enabled():  # a run started on the CPU saved no scaler state
                scaler.load_state_dict(saved["scaler"])
            _set_rng_state(saved["rng"])
            start_round, out.history = saved["round"], saved["history"]
            ctx.log.info(f"{description}: resuming after round {start_round} of {budget.rounds}")
    world = ctx.world[1]
    net = nn.parallel.DistributedDataParallel(model) if world > 1 else model
    if teacher is not None:
        teacher = teacher.to(device).eval()
    stream = iter(_Stream(ctx, seed, start_round * budget.steps))
    for rnd in range(start_round, budget.rounds):
        net.train()
        loss_sum, images, grads, counts, skipped, tr = 0.0, 0, {}, {}, 0, time.perf_counter()
        for _ in ctx.track(range(budget.steps), f"{description} round {rnd + 1}/{budget.rounds}"):
            x, y = next(stream)
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            if cuda and cfg.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            with torch.autocast(device.type, enabled=cuda and cfg.amp):
                logits = net(x)
                with torch.no_grad():
                    t_logits = teacher(x) if teacher is not None else None
                loss = distill_loss(logits, None if t_logits is None else t_logits.float(), y, cfg)
            value = loss.item()
            if not math.isfinite(value):
                skipped += 1
                # Without a grad scaler a non-finite loss poisons the weights at once; with one (AMP on CUDA)
                # an occasional overflow step is skipped by the scaler, but not a round of them.
                if not scaler.is_enabled() or skipped > budget.steps // 2:
                    raise _diverged(description, budget, value, rnd, cuda and cfg.amp)
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            if rule == "gradient_flow" or cfg.grad_clip:
                scaler.unscale_(opt)  # gradients in true units (with AMP they are scaled by up to 65,536)
            if rule == "gradient_flow":
                for k, v in gradient_flow(model).items():
                    if math.isfinite(v):  # an overflow step (skipped by the scaler) says nothing of the flow
                        grads[k] = grads.get(k, 0.0) + v
                        counts[k] = counts.get(k, 0) + 1
            if cfg.grad_clip:
                nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            scaler.step(opt)
            scaler.update()
            sched.step()
            loss_sum += value if math.isfinite(value) else 0.0
            images += len(y) * world
            ctx.tracker.info = f"{images / (time.perf_counter() - tr):.0f} img/s"
        model.eval()
        if not all(bool(torch.isfinite(p).all()) for p in model.parameters()):
            raise _diverged(description, budget, float("nan"), rnd, cuda and cfg.amp)
        finite_steps = max(budget.steps - skipped, 1)
        row = {"round": rnd + 1, "loss": D.all_reduce_sum([loss_sum], device, ctx.ddp)[0] / (finite_steps * world),
               "images_per_s": images / (time.perf_counter() - tr)}
        if skipped:
            row["nonfinite_steps"] = skipped
        grad_flow = {k: v / counts[k] for k, v in grads.items()} or None
        reason = _stop_reason(rule, model, ctx, reference, eps, row, grad_flow)
        if milestone is not None:
            if "top1" not in row:
                row.update(evaluate(model, ctx))
            ctx.milestone(f"{milestone} {rnd + 1}/{budget.rounds}: loss {row['loss']:.4f}, top-1 {row['top1']:.2f}, "
                          f"top-5 {row['top5']:.2f}, {row['images_per_s']:.0f} img/s"
                          + (f", flow distance {row['distance']:.4f}" if "distance" in row else "")
                          + (f"; stopping: {reason}" if reason else "")
                          + f" (ETA {eta(started, rnd + 1 - start_round, budget.rounds - start_round)})")
        out.history.append(row)
        ctx.metric("recovery/loss", row["loss"])
        ctx.metric("recovery/images_per_s", row["images_per_s"])
        if "distance" in row:
            ctx.metric(f"recovery/{rule}_distance", row["distance"])
        out.rounds = rnd + 1
        if resume is not None and ctx.world[0] == 0:
            atomic_torch_save(resume, {"key": ctx.resume_key, "round": rnd + 1, "history": out.history,
                                       "model": model.state_dict(), "optimizer": opt.state_dict(),
                                       "scheduler": sched.state_dict(), "scaler": scaler.state_dict(),
                                       "rng": _rng_state()})
        if ctx.ddp:
            D.barrier()
        if reason:
            out.stopped_by = reason
            break
    else:
        out.stopped_by = f"max rounds ({budget.rounds})"
    out.rounds = max(out.rounds, start_round)
    out.seconds = time.perf_counter() - t0
    model = model.to(memory_format=torch.contiguous_format)
    return model, out
