"""A speedup target the run does not meet says why: which limit stopped the loop, and how much of the base
latency width pruning cannot remove (time outside conv/linear layers, groups held whole, what the caps leave)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipeline.config import Config
from stages.validate import shortfall
from tests.conftest import run_here, tiny_config, write_config

FP = Config.model_validate(tiny_config(filter_prune={"target_speedup": 4.0, "target_flops_reduction": None,
                                                     "max_layer_pruning_ratio": 0.8})).filter_prune
LAT = {"speedup": 1.3, "speedup_low": 1.2, "speedup_high": 1.4}


def _state(other_ms: float, held: list[str]) -> dict:
    return {"latency": {"base_ms": 1.0, "other_ms_before": other_ms, "layers_before": {"a": 0.3, "b": 0.3,
                                                                                       "c": 1.0 - other_ms - 0.6}},
            "held_whole": [{"root": h, "layers": [h]} for h in held]}


@pytest.mark.parametrize("stop, words", [
    ("step 3 dropped top-1 by 2.1 > max_accuracy_drop 1.0; rolled back", "accuracy budget"),
    ("the speedup target 4x cannot be reached: every prunable layer is at its minimum width", "per-layer caps"),
    ("took all 20 steps (filter_prune.steps)", "step limit"),
    ("reached the speedup target", "validate measured 1.30x"),
])
def test_the_limit_that_stopped_the_loop_is_named(stop, words):
    why = shortfall(stop, _state(0.05, []), FP, LAT)
    assert words in why["reason"] and "beyond what width pruning can reach" not in why["reason"]


def test_a_target_beyond_the_fixed_cost_ceiling_says_so_with_the_share():
    why = shortfall("took all 20 steps (filter_prune.steps)", _state(0.35, ["a"]), FP, LAT)
    # floor: 0.35 outside conv/linear + 0.3 held + (0.3 + 0.05) * 0.2^2 left by the caps = 0.664 ms of 1.0: a
    # layer at its cap keeps a fifth of its outputs and of its inputs
    assert why["fixed_share"] == pytest.approx(0.35) and why["held_ms"] == pytest.approx(0.3)
    assert why["capped_ms"] == pytest.approx(0.014)
    assert why["ceiling"] == pytest.approx(1.0 / 0.664, rel=1e-3)
    assert "35% of the base latency is outside conv/linear layers" in why["reason"]
    assert "at most about 1.51x" in why["reason"]


def test_time_outside_layers_that_pruning_shrank_is_not_counted_as_fixed():
    state = _state(0.35, ["a"])
    state["latency"]["other_ms_after"] = 0.1  # element-wise ops over pruned tensors got cheaper
    why = shortfall("took all 20 steps (filter_prune.steps)", state, FP, LAT)
    assert why["fixed_ms"] == pytest.approx(0.1)
    assert why["ceiling"] == pytest.approx(1.0 / (0.1 + 0.3 + 0.014), rel=1e-3)


def test_a_ceiling_the_run_itself_exceeded_is_not_claimed():
    # the ceiling is an upper bound: a validated speedup above it proves the estimate wrong, and the reason must
    # not tell the user the target is out of reach
    why = shortfall("took all 20 steps (filter_prune.steps)", _state(0.35, ["a"]), FP,
                    {"speedup": 1.6, "speedup_low": 1.55, "speedup_high": 1.7})
    assert why["ceiling"] < 1.6 and "beyond what width pruning can reach" not in why["reason"]
    assert "step limit" in why["reason"]


def test_an_unmet_target_in_a_run_carries_its_reason(tmp_path: Path):
    cfg = write_config(tmp_path / "c.yaml", tiny_config(
        filter_prune={"target_speedup": 40.0, "target_flops_reduction": None, "steps": 2},
        layer_truncate={"enabled": False}, finetune={"enabled": False}, validate={"threads": 1}))
    res = run_here("pipeline", str(cfg), "--run-dir", str(tmp_path / "run"))
    assert res.returncode == 0, res.stderr[-2000:]
    target = json.loads((tmp_path / "run" / "summary.json").read_text())["targets"]["speedup"]
    assert not target["met"] and target["short_because"]["reason"]
    assert target["short_because"]["fixed_share"] > 0 and target["short_because"]["ceiling"] > 1.0
    assert target["short_because"]["reason"].split(";")[0] in " ".join(res.stderr.split()), "the console says it"
