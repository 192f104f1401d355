"""Exceptions that map to the CLI's exit codes (2 bad input, 3 failed gate)."""

from __future__ import annotations

import difflib
import re
from collections.abc import Iterable

_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


class UserInputError(Exception):
    """Bad input from the user (config, paths, model or data spec): exit code 2.

    The message says what is wrong, what is allowed and how to fix it.
    """

    exit_code = 2

    def __init__(self, message: str = "") -> None:
        super().__init__(_unwrap_worker(str(message)))


def _unwrap_worker(message: str) -> str:
    """A DataLoader worker re-raises our error with its whole traceback as the message; keep our message."""
    marker = "UserInputError: "
    if message.startswith("Caught UserInputError") and marker in message:
        return message[message.rindex(marker) + len(marker):].strip()
    return message


class GateFailure(Exception):
    """A validation gate failed: exit code 3. Artifacts are kept for inspection."""

    exit_code = 3


def did_you_mean(word: str, choices: Iterable[str], n: int = 3) -> str:
    """Return a ' Did you mean ...?' hint, or '' when nothing is close."""
    close = difflib.get_close_matches(word, list(choices), n=n, cutoff=0.5)
    if not close:
        return ""
    return " Did you mean " + " or ".join(repr(c) for c in close) + "?"


def first_line(exc: BaseException, limit: int = 300) -> str:
    """`Type: the first line of the message`, cut at `limit` characters and without terminal colour codes (a
    library's coloured message must not reach a log file or CI as escape sequences)."""
    text = _ANSI.sub("", str(exc)).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:limit] if text else ''}"
