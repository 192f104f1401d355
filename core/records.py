"""What a report is made of, and what it reads: a run directory's records, and sections of text and tables.

Each stage writes its own report section (a `report` method beside its `run`) from these records; the report
(pipeline/report.py) orders the sections, draws the figures and renders markdown and HTML.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # the composed schema sits above the stages; only its type is named here
    from pipeline.config import Config

FIGURES = "figures"


@dataclass
class Table:
    headers: list[str]
    rows: list[list[str]]


@dataclass
class ReportSection:
    title: str
    text: list[str] = field(default_factory=list)
    tables: list[Table] = field(default_factory=list)
    figures: list[tuple[str, str]] = field(default_factory=list)  # (path relative to the run directory, caption)
    data: dict[str, Any] = field(default_factory=dict)  # figure file name -> what the report draws it from


@dataclass
class RunRecords:
    """What a run directory holds, read once."""

    root: Path
    manifest: dict[str, Any]
    summary: dict[str, Any] | None
    summary_note: str | None
    config: Config | None
    states: dict[str, dict[str, Any]]  # stage -> the plain state of its checkpoint
    structures: dict[str, dict[str, Any]]
    damage: dict[str, list[str]] = field(default_factory=dict)  # stage -> its files missing or altered
    notes: list[str] = field(default_factory=list)

    def metrics(self, stage: str) -> dict[str, Any]:
        """The metrics a stage recorded in the manifest ({} when it has not run)."""
        return self.manifest["stages"].get(stage, {}).get("metrics", {})


def f2(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}"


def f4(x: float | None) -> str:
    return "-" if x is None else f"{x:.4f}"


def pct(new: float, old: float) -> str:
    return f"{100.0 * (new - old) / old:+.1f}%" if old else "-"


def pts(new: float | None, old: float | None) -> str:
    return "-" if new is None or old is None else f"{new - old:+.2f}"


def dynamics_row(stage: str, what: str, params_m: float | None, gflops: float | None, top1: float | None,
                 top5: float | None, accepted: bool, recovery_rounds: Any = None, recovery_stop: Any = None,
                 **extra: Any) -> dict[str, Any]:
    """One row of the report's dynamics table (and figure): a pruning step, a truncation decision, fine-tuning or
    the deployed artifact."""
    return {"stage": stage, "what": what, "params_m": params_m, "gflops": gflops, "top1": top1, "top5": top5,
            "accepted": accepted, "recovery_rounds": recovery_rounds, "recovery_stop": recovery_stop, **extra}
