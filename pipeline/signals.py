"""SIGINT, SIGTERM and SIGHUP as a typed exception, deferred while a checkpoint and its manifest entry are written.

`handling()` turns each into `Interrupted` (exit code 128 + signal number: 130 / 143 / 129; SIGHUP is a closed
terminal or a dropped ssh session) for the duration of a run; `critical()` marks the few instants where files and
the manifest must change together, and a signal arriving inside one is raised when it ends. Everything else on
disk is written atomically, so raising at any other instant loses nothing that was finished.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager

SIGNALS = (signal.SIGINT, signal.SIGTERM) + ((signal.SIGHUP,) if hasattr(signal, "SIGHUP") else ())


class Interrupted(BaseException):
    """The run was stopped by a signal. Like KeyboardInterrupt, not an Exception: nothing swallows it."""

    def __init__(self, signum: int, message: str | None = None) -> None:
        self.signum = signum
        self.name = signal.Signals(signum).name
        self.exit_code = 128 + signum
        super().__init__(message or f"stopped by {self.name}")


class _State:
    """Process-wide: signals are delivered to the process, not to a run."""

    depth = 0  # nesting of critical sections
    pending: int | None = None  # a signal that arrived inside one


def _handler(signum: int, frame: object) -> None:
    if _State.depth > 0:
        _State.pending = _State.pending or signum
        return
    raise Interrupted(signum)


@contextmanager
def handling() -> Iterator[None]:
    """Raise Interrupted on SIGINT/SIGTERM/SIGHUP inside the block; the previous handlers come back after it.

    Outside the main thread (where Python cannot install handlers) it does nothing.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {s: signal.getsignal(s) for s in SIGNALS}
    for s in SIGNALS:
        signal.signal(s, _handler)
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


@contextmanager
def critical() -> Iterator[None]:
    """A signal arriving inside is held back and raised once the block (and any enclosing one) has finished."""
    _State.depth += 1
    try:
        yield
    finally:
        _State.depth -= 1
        if _State.depth == 0 and _State.pending is not None:
            signum, _State.pending = _State.pending, None
            raise Interrupted(signum)
