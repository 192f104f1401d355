"""Progress for long loops: Rich bars on a terminal, plain timed lines off one (CI logs, nohup, Slurm).

Also the fault-injection hook the kill/resume tests use.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import TypeVar

from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.text import Text

T = TypeVar("T")

# COMPRESS_DEBUG_KILL_AT="<stage>:<n>" SIGKILLs the process at the n-th progress tick of <stage>,
# "<stage>:commit" just before the runner saves that stage's checkpoint. Tests use it to kill a run
# at a known instant; it does nothing unless set.
KILL_ENV = "COMPRESS_DEBUG_KILL_AT"


def duration(seconds: float) -> str:
    """A human duration: 42s, 3m05s, 1h12m."""
    s = int(round(max(seconds, 0.0)))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{(s % 3600) // 60:02d}m"


def eta(started: float, done: float, total: float) -> str:
    """Remaining time of a loop from its rate so far, or '?' before the first item."""
    if done <= 0 or total <= 0:
        return "?"
    elapsed = time.monotonic() - started
    return duration(elapsed * (total - done) / done)


@dataclass
class RunClock:
    """The whole invocation: when it started and which of its stages runs now."""

    started: float = field(default_factory=time.monotonic)
    index: int = 0  # 1-based position of the current stage among the stages this invocation runs
    total: int = 0

    def line(self, stage: str) -> str:
        return f"run: stage {self.index}/{self.total} {stage}, {duration(time.monotonic() - self.started)} elapsed"


@dataclass
class _Loop:
    description: str
    total: int | None
    started: float = field(default_factory=time.monotonic)
    done: int = 0


class Tracker:
    """Progress display for one stage; counts ticks for the kill hook.

    On a terminal: a Rich bar per loop (with its ETA) and, for the outermost loop, the whole run's position.
    Off a terminal: one plain line at most every `interval` seconds with every open loop's count, rate and ETA.
    Milestones (a pruning step, a truncation decision, an epoch) are logged by the stages themselves.
    """

    def __init__(self, console: Console, stage: str, enabled: bool = True, interval: float = 30.0,
                 clock: RunClock | None = None) -> None:
        self.console = console
        self.stage = stage
        self.live = enabled and console.is_terminal
        self.plain = enabled and not console.is_terminal
        self.interval = interval
        self.clock = clock or RunClock(index=1, total=1)
        self.ticks = 0
        self.info = ""  # shown beside the bar, e.g. throughput
        self._loops: list[_Loop] = []
        self._last_line = time.monotonic()
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

    def milestone(self) -> None:
        """A milestone line was just logged: the next timed line is due an interval from now."""
        self._last_line = time.monotonic()

    def status_line(self) -> str:
        """Every open loop with its count and ETA, the stage's position in the run and the time elapsed."""
        parts = [f"{self.stage}"]
        for loop in self._loops:
            count = f"{loop.done}/{loop.total}" if loop.total else str(loop.done)
            parts.append(f"{loop.description} {count} (ETA {eta(loop.started, loop.done, loop.total or 0)})")
        if self.info:
            parts.append(self.info)
        return " | ".join(parts) + f" | {self.clock.line(self.stage)}"

    def _plain_tick(self) -> None:
        now = time.monotonic()
        if now - self._last_line >= self.interval:
            self._last_line = now
            self.console.print(time.strftime("%H:%M:%S ") + self.status_line(), markup=False, highlight=False,
                               soft_wrap=True)

    def track(self, items: Iterable[T], description: str, total: int | None = None, unit: str = "") -> Iterator[T]:
        """Iterate with a progress display (a bar on a terminal, timed lines off one)."""
        if total is None and hasattr(items, "__len__"):
            total = len(items)  # type: ignore[arg-type]
        loop = _Loop(description, total)
        self._loops.append(loop)
        try:
            if self.live:
                yield from self._live(items, loop)
                return
            for item in items:
                yield item
                loop.done += 1
                self.tick()
                if self.plain:
                    self._plain_tick()
        finally:
            self._loops.remove(loop)

    def _live(self, items: Iterable[T], loop: _Loop) -> Iterator[T]:
        columns = [TextColumn(f"[bold]{escape(self.stage)}[/] {escape(loop.description)}"), BarColumn(),
                   MofNCompleteColumn(), TimeElapsedColumn(), TimeRemainingColumn(), TextColumn("{task.fields[info]}")]
        # the outermost loop of a stage also shows where the whole run is
        run_line = (lambda: self.clock.line(self.stage)) if len(self._loops) == 1 else None
        with _Bars(*columns, run_line=run_line, console=self.console, transient=True) as progress:
            task = progress.add_task(loop.description, total=loop.total, info="")
            for item in items:
                yield item
                loop.done += 1
                progress.update(task, advance=1, info=self.info)
                self.tick()


class _Bars(Progress):
    """Rich progress bars with an optional line under them (the run's position)."""

    def __init__(self, *columns, run_line=None, **kwargs) -> None:
        super().__init__(*columns, **kwargs)
        self.run_line = run_line

    def get_renderables(self):
        yield self.make_tasks_table(self.tasks)
        if self.run_line is not None:
            yield Text(self.run_line(), style="dim")
