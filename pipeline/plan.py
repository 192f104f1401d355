"""The plan of a run: which stages to reuse, run or leave, and why (config hashes, upstream fingerprints)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from rich.console import Console
from rich.table import Table

from pipeline.config import Config, section_hash
from pipeline.errors import UserInputError, did_you_mean
from pipeline.rundir import RunDir


@dataclass
class PlanItem:
    """What the runner will do with one stage and why."""

    index: int
    name: str
    config_hash: str
    action: str  # "run", "skip" or "stop"
    reason: str


def stage_hashes(config: Config, names: list[str]) -> list[str]:
    """Chained config hashes: a stage's own section plus everything upstream."""
    hashes, prev = [], ""
    engine = "off"
    if config.export.tensorrt.mode != "off":
        from export.tensorrt import engine_fingerprint

        # an engine is rebuilt when TensorRT appears, disappears, is upgraded, or the GPU model changes
        engine = engine_fingerprint()
    from pipeline.data import data_fingerprint
    from pipeline.models import fingerprint

    inputs = [fingerprint(config.model), data_fingerprint(config)]  # file contents the config only names
    for name in names:
        own = {"load": [config.seed, config.model, config.data, *inputs],
               "filter_prune": [config.filter_prune, config.recovery],
               "export": [config.export, engine],
               "validate": [config.validate_, config.runtime.device]}.get(name, [config.section(name)])
        prev = section_hash(prev, *own)
        hashes.append(prev)
    return hashes


def upstream_fingerprint(manifest: dict[str, Any], upstream: list[str]) -> str:
    """Identity of the upstream stages' outputs (their files' sha256), recorded with each finished stage."""
    return section_hash([manifest["stages"].get(n, {}).get("files", {}) for n in upstream])


def make_plan(config: Config, run_dir: RunDir, manifest: dict[str, Any], names: list[str],
              start: str | None, until: str | None) -> list[PlanItem]:
    """Decide per stage: reuse the checkpoint, run it, or stop before it."""
    for flag, value in (("--from", start), ("--until", until)):
        if value is not None and value not in names:
            raise UserInputError(f"{flag} {value!r} is not a stage.{did_you_mean(value, names)} "
                                 f"Stages in order: {', '.join(names)}.")
    start_i = names.index(start) if start else len(names)
    until_i = names.index(until) if until else len(names) - 1
    if start and until and start_i > until_i:
        raise UserInputError(f"--from {start} comes after --until {until}; stages run in the order "
                             f"{', '.join(names)}")
    plan, rerun = [], False
    for i, (name, h) in enumerate(zip(names, stage_hashes(config, names), strict=True)):
        entry = manifest["stages"].get(name)
        if i > until_i:
            plan.append(PlanItem(i, name, h, "stop", f"after --until {until}"))
            continue
        if i >= start_i:
            reason = f"forced by --from {start}"
        elif rerun:
            reason = "an upstream stage re-runs"
        elif entry is None:
            reason = "not run yet"
        elif entry.get("status") not in ("done", "skipped"):
            reason = f"previous attempt ended as {entry.get('status')!r}"
        elif entry.get("config_hash") != h:
            reason = "its config (or an upstream one) changed"
        elif entry.get("upstream") != upstream_fingerprint(manifest, names[:i]):
            reason = "an upstream checkpoint changed after it ran"
        else:
            bad = run_dir.corrupted_files(entry)
            if bad:
                raise UserInputError(
                    f"checkpoint files of finished stage {name!r} are missing or do not match their recorded "
                    f"sha256: {', '.join(bad)} (damaged or edited outside the tool). Nothing was changed. "
                    f"Re-run with --from {name} to recompute it and every later stage."
                )
            plan.append(PlanItem(i, name, h, "skip", f"{entry['status']}, unchanged"))
            continue
        rerun = True
        plan.append(PlanItem(i, name, h, "run", reason))
    return plan


def print_plan(console: Console, plan: list[PlanItem], run_dir: RunDir) -> None:
    table = Table(title=f"plan for {run_dir.root}")
    for col in ("#", "stage", "action", "why"):
        table.add_column(col)
    for p in plan:
        table.add_row(str(p.index), p.name, p.action, p.reason)
    console.print(table)
