"""The recovery engine: distillation loss, each InCoP stopping rule, budgets, gradient flow from real backward."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from rich.console import Console

import stages._recovery as R
from core._progress import Tracker
from core.context import Context
from core.models import build_model, clone
from core.rundir import RunDir
from pipeline.config import Config
from stages._flows import calibration_pass
from stages._incop import InformationFlow, gradient_flow, reference_gradient_flow
from stages._recovery import RecoveryConfig
from tests.conftest import tiny_config


def make_ctx(tmp_path: Path, **recovery) -> Context:
    config = Config.model_validate(tiny_config(recovery=recovery))
    return Context(config, RunDir(tmp_path), tmp_path, torch.device("cpu"), logging.getLogger("t"),
                   Tracker(Console(), "finetune", False), {"stages": {}})


def dense_and_reference(ctx: Context):
    torch.manual_seed(0)
    model = build_model(ctx.config.model).eval()
    flow = InformationFlow()
    calibration_pass(model, ctx, [flow])
    loader = ctx.loader("calibration")
    ref = {"top1": 50.0, "information_flow": flow.result(),
           "gradient_flow": reference_gradient_flow(model, loader, ctx.device)}
    return model, ref


def test_distillation_loss_matches_the_formula():
    cfg = RecoveryConfig(distill_weight=0.3, temperature=2.0)
    s, t, y = torch.randn(8, 5), torch.randn(8, 5), torch.randint(0, 5, (8,))
    kl = (F.softmax(t / 2, 1) * (F.log_softmax(t / 2, 1) - F.log_softmax(s / 2, 1))).sum(1).mean()
    expected = 0.7 * F.cross_entropy(s, y) + 0.3 * 4.0 * kl
    assert R.distill_loss(s, t, y, cfg).item() == pytest.approx(expected.item(), rel=1e-5)
    assert R.distill_loss(s, s, y, cfg).item() == pytest.approx(0.7 * F.cross_entropy(s, y).item(), rel=1e-5)
    assert R.distill_loss(s, None, y, cfg).item() == pytest.approx(F.cross_entropy(s, y).item(), rel=1e-6)


def test_information_flow_stop_fires_at_once_on_the_dense_model(tmp_path):
    ctx = make_ctx(tmp_path, stopping="information_flow")
    model, ref = dense_and_reference(ctx)
    model, out = R.recover(model, ctx, R.Budget(rounds=3, steps=2, lr=0.001), clone(model), ref, "t", seed=0)
    assert out.rounds == 1 and out.stopped_by.startswith("information_flow distance")
    assert out.history[0]["distance"] <= 0.11


def test_flow_rules_never_run_beyond_the_budget(tmp_path):
    for rule in ("information_flow", "gradient_flow"):
        ctx = make_ctx(tmp_path, stopping=rule, epsilon=1e-12)
        model, ref = dense_and_reference(ctx)
        with torch.no_grad():
            model.layer1[0].conv1.weight.add_(torch.randn_like(model.layer1[0].conv1.weight))  # flows differ now
        model, out = R.recover(model, ctx, R.Budget(rounds=2, steps=2, lr=0.01), None, ref, "t", seed=0)
        assert out.rounds == 2 and out.stopped_by == "max rounds (2)", rule
        assert all(row["distance"] > 1e-12 for row in out.history if "distance" in row)


def test_accuracy_rule(tmp_path):
    ctx = make_ctx(tmp_path, stopping="accuracy")
    model, ref = dense_and_reference(ctx)
    _, out = R.recover(clone(model), ctx, R.Budget(2, 2, 0.01), None, {**ref, "top1": 0.0}, "t", seed=0)
    assert out.rounds == 1 and "accuracy reached" in out.stopped_by
    _, out = R.recover(clone(model), ctx, R.Budget(2, 2, 0.01), None, {**ref, "top1": 101.0}, "t", seed=0)
    assert out.rounds == 2 and out.stopped_by == "max rounds (2)"
    assert [r["round"] for r in out.history] == [1, 2] and all("top1" in r for r in out.history)


def test_gradient_flow_comes_from_real_backward_passes(tmp_path, monkeypatch):
    ctx = make_ctx(tmp_path, stopping="gradient_flow", epsilon=1e9)
    model, ref = dense_and_reference(ctx)
    seen = []

    def spy(m):
        flows = gradient_flow(m)
        seen.append(sum(flows.values()))
        return flows

    monkeypatch.setattr(R, "gradient_flow", spy)
    _, out = R.recover(model, ctx, R.Budget(rounds=3, steps=2, lr=0.01), None, ref, "t", seed=0)
    assert out.rounds == 1 and out.stopped_by.startswith("gradient_flow distance")
    assert len(seen) == 2 and all(v > 0 for v in seen), "one reading per training step, after its backward"
    # the reference is the mean of mean |grad W| over real cross-entropy backward passes
    m2 = build_model(ctx.config.model).eval()
    x, y = next(iter(ctx.loader("calibration")))
    ref_one = reference_gradient_flow(m2, [(x, y)], ctx.device)
    F.cross_entropy(m2(x), y).backward()
    assert ref_one["fc"] == pytest.approx(float(m2.fc.weight.grad.abs().mean()), rel=1e-5)
    assert ref_one["layer1.0.conv1"] == pytest.approx(float(m2.layer1[0].conv1.weight.grad.abs().mean()), rel=1e-5)


def _cpu_scaler(scale: float):
    """A real grad scaler on the CPU standing in for CUDA's: it scales the loss by `scale`."""
    return lambda device, cfg: torch.amp.GradScaler("cpu", init_scale=scale, enabled=True)


def test_gradient_flow_is_read_unscaled_under_a_grad_scaler(tmp_path, monkeypatch):
    """With AMP the gradients carry the loss scale (65,536 by default) until unscaled: the flow read from them
    must be the same as without a scaler, or the gradient-flow rule never fires on a GPU."""
    ctx = make_ctx(tmp_path, stopping="gradient_flow", epsilon=1e-9)
    model, ref = dense_and_reference(ctx)
    _, plain = R.recover(clone(model), ctx, R.Budget(rounds=2, steps=2, lr=0.01), None, ref, "t", seed=0)
    monkeypatch.setattr(R, "_scaler", _cpu_scaler(2.0 ** 16))
    _, scaled = R.recover(clone(model), ctx, R.Budget(rounds=2, steps=2, lr=0.01), None, ref, "t", seed=0)
    for a, b in zip(plain.history, scaled.history, strict=True):
        assert b["distance"] == pytest.approx(a["distance"], rel=1e-5)
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5)


def test_resume_with_the_empty_scaler_state_of_a_cpu_run(tmp_path, monkeypatch):
    """A fine-tune started on the CPU saves scaler state {}; resuming it where a scaler is active must work."""
    ctx = make_ctx(tmp_path)
    ctx.resume_key = "k"
    model, ref = dense_and_reference(ctx)
    progress = tmp_path / "progress.pt"
    budget = R.Budget(rounds=2, steps=2, lr=0.01)
    R.recover(clone(model), ctx, R.Budget(rounds=1, steps=2, lr=0.01), None, ref, "t", seed=0, resume=progress)
    assert torch.load(progress, weights_only=True)["scaler"] == {}
    monkeypatch.setattr(R, "_scaler", _cpu_scaler(2.0 ** 10))
    _, out = R.recover(clone(model), ctx, budget, None, ref, "t", seed=0, resume=progress)
    assert out.rounds == 2


def test_a_non_finite_loss_stops_training_before_the_weights_change(tmp_path):
    ctx = make_ctx(tmp_path)
    model, ref = dense_and_reference(ctx)
    with torch.no_grad():
        model.fc.weight.fill_(float("inf"))
    before = {k: v.detach().clone() for k, v in model.named_parameters()}
    with pytest.raises(R.TrainingDiverged, match=r"lower filter_prune.recovery_lr \(now 0.01\)"):
        R.recover(model, ctx, R.Budget(1, 2, 0.01, "filter_prune.recovery_lr"), None, ref, "recovery 1", seed=0)
    assert all(torch.equal(v, before[k]) for k, v in model.named_parameters()), "no optimiser step was taken"
