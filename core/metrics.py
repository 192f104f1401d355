"""metrics.jsonl (always) and TensorBoard scalars (logging.tensorboard): every value a run logs.

metrics.jsonl is append-only: one JSON object per line, {"time", "stage", "attempt", "name", "value",
"step"}. A stage that runs again (resume after a kill, --from, a config change) appends its values again
under a new `attempt` (the time the stage started); the latest attempt of a stage is the one its checkpoint
holds. Each line is written with one append, so a kill leaves at most a cut last line, which readers skip.
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Any

METRICS = "metrics.jsonl"
TENSORBOARD = "tensorboard"


class MetricsLog:
    """Writes scalars of one run; a disabled log (other torchrun ranks) drops everything."""

    def __init__(self, root: Path, tensorboard: bool = False, enabled: bool = True) -> None:
        self.path = Path(root) / METRICS
        self.enabled = enabled
        self.stage, self.attempt = "", ""
        self._steps: dict[str, int] = {}
        self._writer = None
        if enabled and tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as exc:  # checked before the run starts; kept for library use
                from core.errors import UserInputError

                raise UserInputError("logging.tensorboard is true but the tensorboard package is not installed; "
                                     "pip install -e '.[tensorboard]' (or set logging.tensorboard: false)") from exc
            self._writer = SummaryWriter(log_dir=str(Path(root) / TENSORBOARD))

    def begin(self, stage: str, attempt: str) -> None:
        self.stage, self.attempt = stage, attempt

    def log(self, name: str, value: float, step: int | None = None) -> None:
        """One scalar of the current stage; `step` defaults to a per-name counter."""
        if not self.enabled:
            return
        value = float(value)
        if step is None:
            step = self._steps.get(f"{self.stage}/{name}", 0)
        self._steps[f"{self.stage}/{name}"] = step + 1
        row = {"time": round(time.time(), 3), "stage": self.stage, "attempt": self.attempt, "name": name,
               "value": value if math.isfinite(value) else str(value), "step": step}
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, (json.dumps(row) + "\n").encode())
        finally:
            os.close(fd)
        if self._writer is not None:
            self._writer.add_scalar(f"{self.stage}/{name}", value, global_step=step)

    def log_dict(self, values: dict[str, Any], prefix: str = "", step: int | None = None) -> None:
        """Every number in `values` (booleans and strings skipped)."""
        for k, v in values.items():
            if isinstance(v, int | float) and not isinstance(v, bool):
                self.log(prefix + k, v, step)

    def close(self) -> None:
        if self._writer is not None:
            self._writer.flush()
            self._writer.close()
            self._writer = None


def read_metrics(root: Path) -> list[dict[str, Any]]:
    """The rows of a run's metrics.jsonl (a cut last line is skipped)."""
    path = Path(root) / METRICS
    rows = []
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return rows
