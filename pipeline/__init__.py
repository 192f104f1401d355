"""IDAP++ compression pipeline: config, stage registry, runner, run directory, CLI and Python API.

    from pipeline import compress
    result = compress(model, train_dataset, val_dataset, run_dir="runs/mine",
                      overrides={"filter_prune.target_flops_reduction": 0.6})
    result.model, result.summary, result.run_dir
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from core._version import __version__
from core.errors import GateFailure, UserInputError

if TYPE_CHECKING:
    from pipeline.api import Result

__all__ = ["GateFailure", "UserInputError", "__version__", "compress"]


def compress(*args: Any, **kwargs: Any) -> Result:
    """Compress a model object on the given datasets; see pipeline.api.compress for the arguments."""
    from pipeline.api import compress as run

    return run(*args, **kwargs)


def __getattr__(name: str) -> Any:
    if name == "Result":
        from pipeline.api import Result

        return Result
    raise AttributeError(f"module 'pipeline' has no attribute {name!r}")
