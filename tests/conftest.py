"""Shared fixtures: small configs that run the whole pipeline in seconds."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]


def tiny_config(**sections: Any) -> dict[str, Any]:
    """A config for timm ResNet-18 on synthetic 32x32 data; every stage does a little real work."""
    cfg: dict[str, Any] = {
        "name": "tiny",
        "seed": 0,
        "model": {"source": "timm", "name": "resnet18", "num_classes": 4, "in_chans": 1, "input_size": [32, 32]},
        "data": {"kind": "synthetic", "synthetic_samples": 192, "batch_size": 32, "eval_batch_size": 64},
        "train": {"enabled": True, "epochs": 1, "lr": 0.05},
        "calibrate": {"batches": 2, "batch_size": 32},
        "filter_prune": {"target_flops_reduction": 0.5, "steps": 4, "p0": 0.2, "recovery_steps": 3,
                         "max_accuracy_drop": 100.0},
        "layer_truncate": {"max_layers": 1, "recovery_steps": 2, "max_accuracy_drop": 100.0},
        "finetune": {"max_epochs": 1},
        "validate": {"warmup": 2, "runs": 5, "block_seconds": 0.02, "gates": {"max_parity_error": 1e-3}},
        "runtime": {"progress": False, "threads": 2},
    }
    for key, value in sections.items():
        if isinstance(value, dict) and isinstance(cfg.get(key), dict):
            cfg[key] = {**cfg[key], **value}
        else:
            cfg[key] = value
    return cfg


def resnet50_config(**sections: Any) -> dict[str, Any]:
    """The tiny config on torchvision ResNet-50 (random weights, synthetic 64x64 data, no base training)."""
    base = {"name": "r50",
            "model": {"source": "torchvision", "name": "resnet50", "num_classes": 10, "in_chans": 3,
                      "input_size": [64, 64]},
            "data": {"synthetic_samples": 96, "batch_size": 16, "eval_batch_size": 48},
            "train": {"enabled": False},
            "calibrate": {"batches": 1, "batch_size": 16},
            "filter_prune": {"target_flops_reduction": 0.4, "steps": 3, "p0": 0.15, "recovery_steps": 2}}
    for key, value in sections.items():
        base[key] = {**base[key], **value} if isinstance(value, dict) and isinstance(base.get(key), dict) else value
    return tiny_config(**base)


def pruner_for(criterion: str = "l2", input_size: tuple[int, int] = (8, 8), data: list | tuple = (),
               **filter_prune: Any):
    """A Pruner on a bare context (CPU, a 1-channel input of `input_size`, 4 classes, `data` as every loader's
    batches), for tests that prune a hand-built model one step at a time."""
    from types import SimpleNamespace

    import torch

    from pipeline.config import Config
    from stages._criteria import CRITERIA
    from stages._pruner import Pruner

    cfg = Config.model_validate({"name": "t", "model": {"source": "timm", "name": "resnet18", "num_classes": 4,
                                                        "in_chans": 1, "input_size": list(input_size)},
                                 "filter_prune": {"criterion": criterion, **filter_prune}})
    ctx = SimpleNamespace(config=cfg, device=torch.device("cpu"), loader=lambda *a, **k: list(data),
                          track=lambda items, *a, **k: items)
    return Pruner(CRITERIA.get(criterion)(), ctx)


def write_config(path: Path, cfg: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def run_cli(*args: str, env: dict[str, str] | None = None, timeout: float = 600,
            cwd: Path = REPO) -> subprocess.CompletedProcess:
    """Run `compress` in a fresh process, as users and CI do (from `cwd`, the repository by default)."""
    full_env = {**os.environ, "COLUMNS": "200", "PYTHONPATH": str(REPO), **(env or {})}
    return subprocess.run([sys.executable, "-m", "pipeline.cli", *args], capture_output=True, text=True,
                          env=full_env, timeout=timeout, cwd=cwd)


def run_here(*args: str) -> subprocess.CompletedProcess:
    """Run `compress` in this process, as main() runs it minus the exit (no interpreter and torch start-up: most
    cases need no fresh process); stdout and stderr captured."""
    import contextlib
    import io

    from pipeline.cli import run

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = run(list(args))
    return subprocess.CompletedProcess(list(args), code, out.getvalue(), err.getvalue())


@pytest.fixture
def tiny(tmp_path: Path) -> Path:
    return write_config(tmp_path / "tiny.yaml", tiny_config())


REQUIRE_GPU = "COMPRESS_REQUIRE_GPU"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """With COMPRESS_REQUIRE_GPU=1 (`make gpu-check`), a gpu test that skips fails instead: a GPU job that lost
    its GPU, TensorRT or CUDA provider must go red, not pass having tested nothing."""
    outcome = yield
    report = outcome.get_result()
    if report.skipped and item.get_closest_marker("gpu") and os.environ.get(REQUIRE_GPU) == "1":
        reason = report.longrepr[-1] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        report.outcome = "failed"
        report.longrepr = f"{REQUIRE_GPU}=1 but this gpu test would skip: {reason}"
