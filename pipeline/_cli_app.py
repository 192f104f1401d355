"""The Typer app behind `compress`, the console it reports on, and helpers shared by its verbs."""

from __future__ import annotations

from collections.abc import Iterable

import typer
from rich.console import Console

from pipeline._version import __version__

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


def one_of(values: Iterable[str]) -> str:
    """Allowed values for a help text, e.g. 'onnx | tensorrt'."""
    return " | ".join(values)


def version_text() -> str:
    import torch

    return f"compress (idap-compress) {__version__}, torch {torch.__version__}"
