"""What stages share: the stage protocol and registry, the stage order, StageResult and the Context they run in.

Stages import this module (never the runner); the runner imports the stages. The arrows run one way:
pipeline (cli/api -> runner) -> stages -> export -> core (context, config sections, errors, run directory).
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from core._progress import Tracker
from core.data import Splits, build_splits
from core.errors import UserInputError
from core.metrics import MetricsLog
from core.models import rebuild
from core.registry import PIPELINE, Registry
from core.rundir import RunDir, load_checkpoint

if TYPE_CHECKING:  # the composed schema sits above the stages; only its type is named here
    from pipeline.config import Config

SUMMARY = "summary.json"


@dataclass
class StageResult:
    """What a stage hands back to the runner.

    Attributes:
        model: the model after the stage, or None when the stage did not change it.
        metrics: small JSON-able figures recorded in the manifest.
        state: tensors and plain data the runner saves in the stage's checkpoint.
        files: artifacts the stage wrote (atomically); their sha256 go into the manifest.
        status: "done", or "skipped" for a stage the config switched off.
    """

    model: nn.Module | None = None
    metrics: dict[str, Any] = field(default_factory=dict)
    state: dict[str, Any] = field(default_factory=dict)
    files: list[Path] = field(default_factory=list)
    status: str = "done"


class Stage(Protocol):
    """A pipeline stage, named once: by its registration in STAGES (== its config key == its module's name).

    Its config section is defined beside it and composed into the schema by pipeline/config.py. A stage with
    records of its own also says what they mean in the report, as static methods that read a run directory's
    records (core.records.RunRecords): `report(rec) -> list[ReportSection]`, its section(s), and
    `dynamics(rec, before) -> list[row]`, its rows of the run's dynamics table.
    """

    description: ClassVar[str]

    def run(self, model: nn.Module | None, ctx: Context) -> StageResult: ...


STAGES: Registry[type] = Registry("stage")


@dataclass
class Context:
    """Everything a stage may use: config, run directory, data, device, logging, progress."""

    config: Config
    run_dir: RunDir
    stage_dir: Path
    device: torch.device
    log: logging.Logger
    tracker: Tracker
    manifest: dict[str, Any]
    resume_key: str = ""  # identifies this attempt's inputs: a mid-stage checkpoint with another key is stale
    config_hash: str = ""  # the stage's fingerprint: its own inputs chained onto every upstream stage's
    ddp: bool = False  # every rank runs this stage (torchrun): train on shards, reduce metrics
    sink: MetricsLog | None = None
    target: Any = None  # export.target.Target, resolved once per run; None: stages resolve it from the config
    _splits: Splits | None = None

    def metric(self, name: str, value: float, step: int | None = None) -> None:
        """Record one scalar in metrics.jsonl (and TensorBoard when enabled); rank 0 only."""
        if self.sink is not None:
            self.sink.log(name, value, step)

    @property
    def splits(self) -> Splits:
        if self._splits is None:
            self._splits = build_splits(self.config)
        return self._splits

    @property
    def world(self) -> tuple[int, int]:
        """(rank, world size) of the processes sharing this stage's work."""
        from core import distributed as D

        return (D.rank(), D.world_size()) if self.ddp else (0, 1)

    def loader(self, split: str) -> DataLoader:
        """An ordered loader over a split: calibrate.batch_size for calibration, data.eval_batch_size otherwise.

        Training batches do not come from here: the recovery engine cuts seeded global batches itself.
        """
        bs = self.config.calibrate.batch_size if split == "calibration" else self.config.data.eval_batch_size
        return DataLoader(getattr(self.splits, split), batch_size=bs, num_workers=self.config.data.num_workers)

    def track(self, items, description: str, total: int | None = None):
        return self.tracker.track(items, description, total)

    def milestone(self, message: str) -> None:
        """One INFO line for a unit of progress a user waits for (a pruning step, a decision, an epoch):
        in log.txt and on the console, on a terminal or not."""
        self.log.info(message)
        self.tracker.milestone()

    def stage_state(self, name: str) -> dict[str, Any]:
        """The saved state of a finished stage (loaded with weights_only=True)."""
        entry = self.manifest["stages"].get(name)
        if not entry or entry.get("status") != "done":
            raise UserInputError(f"stage {name!r} has not finished in {self.run_dir.root}; run the pipeline "
                                 f"without --from, or with --from {name}")
        path = self.run_dir.root / entry["checkpoint"] if entry.get("checkpoint") else None
        return load_checkpoint(path)["state"] if path else {}

    def model_of(self, name: str) -> nn.Module:
        """Rebuild the model as the named stage (or the last earlier one that had a model) left it."""
        return load_model_upto(self.config, self.run_dir, self.manifest, name)


def load_model_upto(config: Config, run_dir: RunDir, manifest: dict[str, Any], stage: str) -> nn.Module:
    """Rebuild the latest model checkpoint at or before `stage` from spec + structure + weights."""
    names = PIPELINE[: PIPELINE.index(stage) + 1]
    for name in reversed(names):
        entry = manifest["stages"].get(name, {})
        if entry.get("status") == "done" and entry.get("has_model"):
            ckpt = load_checkpoint(run_dir.root / entry["checkpoint"])
            return rebuild(config.model, ckpt["structure"], ckpt["model"])
    raise UserInputError(f"no finished stage up to {stage!r} has saved a model in {run_dir.root}; "
                         f"run the pipeline from the start (without --from)")


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch so that a stage re-run gives the same result."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
