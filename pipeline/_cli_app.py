"""The Typer app behind `compress`, the console it reports on, and helpers shared by its verbs."""

from __future__ import annotations

from collections.abc import Iterable

import typer
from rich.console import Console
from typer.core import TyperOption

from core._version import __version__

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110},
    help="IDAP++ compression for PyTorch vision models: divergence-aware filter pruning, flow-guided layer "
         "truncation, recovery fine-tuning, ONNX/TensorRT export and validation on the deployed runtime.",
    epilog="Exit codes: 0 success, 1 a bug (traceback printed), 2 bad input or environment (nothing altered), "
           "3 a validation gate failed, 130/143/129 stopped by SIGINT/SIGTERM/SIGHUP (re-run the same command to "
           "resume).",
)
console = Console(stderr=True)

_type_column = TyperOption.display_type_rich


def _no_type_for_flags(self: TyperOption, ctx) -> str | None:
    """The help's type column says what value an option takes; a flag takes none (typer prints `<bool>`)."""
    return None if self.is_flag else _type_column(self, ctx)


TyperOption.display_type_rich = _no_type_for_flags  # typer is bounded <0.30; tests/test_cli.py reads the help


def one_of(values: Iterable[str]) -> str:
    """Allowed values for a help text, e.g. 'onnx | tensorrt'."""
    return " | ".join(values)


def version_text() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:  # the installed distribution's version: importing torch would take seconds
        torch = version("torch")
    except PackageNotFoundError:
        torch = "not installed"
    return f"compress (idap-compress) {__version__}, torch {torch}"
