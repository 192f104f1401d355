"""Rich progress bars for long loops, plus the fault-injection hook the kill/resume tests use."""

from __future__ import annotations

import os
import signal
from collections.abc import Iterable, Iterator
from typing import TypeVar

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

T = TypeVar("T")

# COMPRESS_DEBUG_KILL_AT="<stage>:<n>" SIGKILLs the process at the n-th progress tick of <stage>,
# "<stage>:commit" just before the runner saves that stage's checkpoint. Tests use it to kill a run
# at a known instant; it does nothing unless set.
KILL_ENV = "COMPRESS_DEBUG_KILL_AT"


class Tracker:
    """Progress display for one stage; counts ticks for the kill hook."""

    def __init__(self, console: Console, stage: str, enabled: bool = True) -> None:
        self.console = console
        self.stage = stage
        self.enabled = enabled and console.is_terminal
        self.ticks = 0
        self.info = ""  # shown beside the bar, e.g. throughput
        target = os.environ.get(KILL_ENV, "")
        self._kill_stage, _, self._kill_at = target.partition(":")

    def _maybe_kill(self, point: str) -> None:
        if self._kill_stage == self.stage and self._kill_at == point:
            os.kill(os.getpid(), signal.SIGKILL)

    def tick(self) -> None:
        """One unit of work done (called by `track`)."""
        self.ticks += 1
        self._maybe_kill(str(self.ticks))

    def before_commit(self) -> None:
        """The stage's work is done and nothing of it is saved yet."""
        self._maybe_kill("commit")

    def track(self, items: Iterable[T], description: str, total: int | None = None, unit: str = "") -> Iterator[T]:
        """Iterate with a progress bar (when attached to a terminal)."""
        if total is None and hasattr(items, "__len__"):
            total = len(items)  # type: ignore[arg-type]
        if not self.enabled:
            for item in items:
                yield item
                self.tick()
            return
        columns = [TextColumn(f"[bold]{self.stage}[/] {description}"), BarColumn(), MofNCompleteColumn(),
                   TimeElapsedColumn(), TimeRemainingColumn(), TextColumn("{task.fields[info]}")]
        with Progress(*columns, console=self.console, transient=True) as progress:
            task = progress.add_task(description, total=total, info="")
            for item in items:
                yield item
                progress.update(task, advance=1, info=self.info)
                self.tick()
