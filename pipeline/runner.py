"""The runner: plans the stages, runs them in their context, checkpoints, resumes and invalidates."""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from torch import nn

import stages  # noqa: F401 - registers every stage in STAGES
from core._progress import RunClock, Tracker
from core.context import STAGES, SUMMARY, Context, StageResult, load_model_upto, seed_everything
from core.errors import UserInputError
from core.metrics import MetricsLog
from core.models import structure_of
from core.registry import PIPELINE
from core.rundir import RunDir, atomic_json, atomic_torch_save, atomic_write, json_bytes, now
from pipeline._probe import out_of_memory
from pipeline.config import Config
from pipeline.plan import DATA_FILES, PlanItem, make_plan, upstream_fingerprint
from pipeline.signals import Interrupted, critical

CHECKPOINT = "checkpoint.pt"


class _PlainFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")


def _logger(run_dir: RunDir, console: Console, main: bool = True) -> logging.Logger:
    """Console and log.txt on rank 0; other ranks report warnings only, to the console.

    On a terminal the console gets Rich's log lines; off one (CI, nohup) plain timestamped lines.
    """
    from rich.logging import RichHandler

    log = logging.getLogger(f"compress.{run_dir.root}")
    for h in log.handlers:
        h.close()
    log.handlers.clear()
    log.setLevel(logging.INFO if main else logging.WARNING)
    log.propagate = False
    if console.is_terminal:
        log.addHandler(RichHandler(console=console, show_path=False, show_time=False, markup=False))
    else:
        plain = logging.StreamHandler(console.file)
        plain.setFormatter(_PlainFormatter())
        log.addHandler(plain)
    if main:
        fh = logging.FileHandler(run_dir.root / "log.txt")
        fh.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        log.addHandler(fh)
    return log


def human(value: Any) -> Any:
    """A metric rounded for a log line: 4 significant digits for floats."""
    if isinstance(value, float):
        return float(f"{value:.4g}")
    return value


@dataclass
class _Session:
    """One invocation of the runner: what every stage of it shares."""

    config: Config
    run_dir: RunDir
    device: torch.device
    log: logging.Logger
    console: Console
    sink: MetricsLog
    clock: RunClock
    again: str = "Run the same command again"
    target: Any = None  # export.target.Target


def run_pipeline(config: Config, run_dir: RunDir, console: Console, start: str | None = None,
                 until: str | None = None, fresh: bool = False,
                 again: str = "Run the same command again", locked: bool = False) -> dict[str, Any] | None:
    """Run the planned stages; returns summary.json's content when the validate stage has run. `again` is how
    the caller resumes (the words of the interrupted-stage log line); `locked`: the caller holds the run
    directory's lock (a frontier run, for all its parts).

    Under torchrun, rank 0 plans, writes and runs the single-process stages while the other ranks wait;
    stages marked `distributed` (training) run on every rank.
    """
    from core import distributed as D

    if config.runtime.threads:
        torch.set_num_threads(config.runtime.threads)
    from export.target import resolve

    target = resolve(config)  # where the artifact is scored and timed: every stage reads this one object
    device = torch.device(target.device)
    D.init_from_env(device)
    main = D.is_main()
    if main and not locked:
        run_dir.lock()
    sink = None
    undo = None
    try:
        manifest, plan = _on_main(main, lambda: _prepare(config, run_dir, PIPELINE, start, until, fresh))
        sink = MetricsLog(run_dir.root, config.logging.tensorboard, enabled=main)
        session = _Session(config, run_dir, device, _logger(run_dir, console, main), console, sink,
                           RunClock(total=sum(item.action in ("run", "off") for item in plan)), again, target)
        if main:
            orphans = run_dir.remove_orphans()
            if orphans:
                session.log.info(f"removed {len(orphans)} temporary file(s) a killed earlier run left: "
                                 f"{', '.join(orphans[:5])}")
            manifest, undo = _supersede(run_dir, manifest, plan)
            session.log.info(f"deployment target: {target.runtime} on {target.hardware or target.device} "
                             f"(batch {target.batch}, {target.precision}; {target.why}); the pruning loop times "
                             f"with {target.timing}")
        try:
            for item in plan:
                if item.action == "skip":
                    session.log.info(f"[{item.index}] {item.name}: reused ({item.reason})")
                elif item.action not in ("run", "off"):
                    continue
                else:
                    session.clock.index += 1
                    if main:
                        manifest = _on_main(True, lambda i=item, m=manifest: _run_stage(i, session, m))
                        undo = None  # a stage of this run has committed: the previous run's artifacts are stale
                    elif getattr(STAGES.get(item.name), "distributed", False):
                        _run_worker(item, session, manifest)
                        manifest = _on_main(False, None)
                    else:
                        manifest = _on_main(False, None)  # wait while rank 0 runs it
        except UserInputError:
            if main and undo is not None:  # bad input found before anything changed: it changes nothing either
                undo()
            raise
        if not main:
            return None
        atomic_json(run_dir.root / "config.json", config.model_dump(mode="json", by_alias=True))
        summary = run_dir.root / SUMMARY
        return json.loads(summary.read_text()) if plan[-1].action != "stop" and summary.is_file() else None
    finally:
        if sink is not None:
            sink.close()
        if main and not locked:
            run_dir.unlock()


def _on_main(main: bool, work) -> Any:
    """Rank 0 does `work` and shares its result (or its error) with every rank; the others receive it."""
    from core import distributed as D

    if not main:
        status, value = D.broadcast(None)
        if status == "error":
            raise RuntimeError(f"rank 0 stopped: {value}")
        return value
    try:
        value = work()
    except BaseException as exc:
        D.broadcast(("error", f"{type(exc).__name__}: {exc}"))
        raise
    return D.broadcast(("ok", value))[1]


def _prepare(config: Config, run_dir: RunDir, names: list[str], start: str | None, until: str | None,
             fresh: bool) -> tuple[dict[str, Any], list[PlanItem]]:
    manifest = {"stages": {}} if fresh else run_dir.read_manifest()
    manifest.update({"name": config.name, "model": f"{config.model.source}:{config.model.name}"})
    return manifest, make_plan(config, run_dir, manifest, names, start, until)


def _supersede(run_dir: RunDir, manifest: dict[str, Any], plan: list[PlanItem]):
    """Before the first stage re-runs: mark the records of the stages that will run, and the top-level
    summary.json, as the previous run's until this one finishes (see supersede). Returns the manifest and a
    function that puts both back as they were (for bad input found before any stage committed), or None when
    nothing was marked."""
    runs = [i for i in plan if i.action in ("run", "off")]
    if not runs:
        return manifest, None
    return manifest, supersede(run_dir, manifest, [i.name for i in runs], f"{runs[0].name} {runs[0].describe()}")


def supersede(run_dir: RunDir, manifest: dict[str, Any], names: list[str], why: str,
              entry_note: str | None = None) -> Callable[[], None]:
    """Mark the stages `names` outdated in the manifest (in place) and the top-level summary.json superseded,
    so that a kill at any instant after this leaves artifacts that say they are not current. The manifest is
    written first: critical() defers SIGINT/SIGTERM but not SIGKILL, and a kill between the two writes must
    leave a summary that still says current beside stages marked outdated (the manifest is what a re-run and
    the report trust), never a summary that says superseded beside stages still marked done. Returns a function
    that puts both back as they were."""
    stamp = now()
    path = run_dir.root / SUMMARY
    before_entries = copy.deepcopy(manifest["stages"])
    before_summary = path.read_bytes() if path.is_file() else None
    with critical():
        for name in names:
            entry = manifest["stages"].get(name)
            if entry is not None and entry.get("status") in ("done", "skipped"):
                entry.update(status="outdated", outdated_since=stamp, **({"note": entry_note} if entry_note else {}))
        try:
            summary = json.loads(before_summary) if before_summary is not None else None
        except ValueError:
            summary = None
        marked = None
        if isinstance(summary, dict):
            summary["run"] = {**(summary.get("run") or {}), "current": False, "status": "superseded",
                              "note": f"a re-run started at {stamp} ({why}) has not finished: this summary and "
                                      f"the report describe the previous run, and the artifacts beside them are "
                                      f"the previous run's unless manifest.json records their stage as done "
                                      f"since"}
            marked = json_bytes(summary)
            for entry in manifest["stages"].values():  # keep the recorded sha256 true (a --until run keeps it)
                if SUMMARY in entry.get("files", {}):
                    entry["files"][SUMMARY] = hashlib.sha256(marked).hexdigest()
        run_dir.write_manifest(manifest)
        if marked is not None:
            atomic_write(path, marked)

    def undo() -> None:
        with critical():
            for name, entry in before_entries.items():
                manifest["stages"][name] = entry
            run_dir.write_manifest(manifest)
            if before_summary is not None:
                atomic_write(path, before_summary)

    return undo


def _context(item: PlanItem, s: _Session, manifest: dict[str, Any]) -> Context:
    from core import distributed as D

    stage_dir = s.run_dir.stage_dir(item.index, item.name)
    rt = s.config.runtime
    tracker = Tracker(s.console, item.name, rt.progress and D.is_main(), rt.progress_interval, s.clock)
    ddp = getattr(STAGES.get(item.name), "distributed", False) and D.world_size() > 1
    return Context(s.config, s.run_dir, stage_dir, s.device, s.log, tracker, manifest, ddp=ddp, sink=s.sink,
                   target=s.target,
                   resume_key=item.config_hash + upstream_fingerprint(manifest, PIPELINE[: item.index]),
                   config_hash=item.config_hash)


def _input_model(item: PlanItem, s: _Session, manifest: dict[str, Any]) -> nn.Module | None:
    seed_everything(s.config.seed + item.index)
    if item.index == 0:
        return None
    return load_model_upto(s.config, s.run_dir, manifest, PIPELINE[item.index - 1]).to(s.device)


def _run_worker(item: PlanItem, s: _Session, manifest: dict[str, Any]) -> None:
    """A rank other than 0 takes its share of a distributed stage; it writes nothing."""
    ctx = _context(item, s, manifest)
    STAGES.get(item.name)().run(_input_model(item, s, manifest), ctx)


def _run_stage(item: PlanItem, s: _Session, manifest: dict[str, Any]) -> dict[str, Any]:
    stage = STAGES.get(item.name)()
    ctx = _context(item, s, manifest)
    run_dir, log = s.run_dir, s.log
    stage_dir = ctx.stage_dir
    previous = manifest["stages"].get(item.name)
    with critical():
        stage_dir.mkdir(parents=True, exist_ok=True)
        manifest["stages"][item.name] = {"status": "running", "config_hash": item.config_hash, "started": now(),
                                         "inputs": item.inputs, "reason": item.describe()}
        s.sink.begin(item.name, manifest["stages"][item.name]["started"])
        run_dir.write_manifest(manifest)
    log.info(f"[{item.index}] {item.name}: {item.describe()}")
    t0 = time.perf_counter()
    try:
        result = stage.run(_input_model(item, s, manifest), ctx)
        ctx.tracker.before_commit()
        with critical():  # the checkpoint and its manifest entry change together, or neither does
            entry = _commit(item, s.config, run_dir, stage_dir, result, manifest["stages"][item.name])
            entry["upstream"] = upstream_fingerprint(manifest, PIPELINE[: item.index])
            entry["seconds"] = round(time.perf_counter() - t0, 3)
            manifest["stages"][item.name] = entry
            run_dir.write_manifest(manifest)
    except UserInputError:
        # Bad input loses nothing: the stage's previous record (and its files) stay as they were.
        with critical():
            if previous is None:
                manifest["stages"].pop(item.name, None)
            else:
                manifest["stages"][item.name] = previous
            run_dir.write_manifest(manifest)
        raise
    except Interrupted as exc:
        with critical():
            manifest["stages"][item.name].update(status="interrupted", signal=exc.name, finished=now())
            run_dir.write_manifest(manifest)
        log.warning(f"[{item.index}] {item.name}: interrupted by {exc.name} after "
                    f"{time.perf_counter() - t0:.1f}s; every earlier checkpoint is intact. {s.again} to resume "
                    f"from {item.name}.")
        raise
    except BaseException as exc:
        with critical():
            manifest["stages"][item.name].update(status="failed", error=f"{type(exc).__name__}: {exc}",
                                                 finished=now())
            run_dir.write_manifest(manifest)
        oom = out_of_memory(exc, item.name, s.config)  # the settings' fault, not a bug: exit 2 naming them
        if oom is not None:
            raise oom from exc
        raise
    s.sink.log_dict({**entry["metrics"], "seconds": entry["seconds"]}, prefix="stage/")
    shown = {k: human(v) for k, v in entry["metrics"].items() if not isinstance(v, (dict, list))}
    log.info(f"[{item.index}] {item.name}: {entry['status']} in {entry['seconds']:.1f}s {shown}")
    return manifest


def _commit(item: PlanItem, config: Config, run_dir: RunDir, stage_dir: Path, result: StageResult,
            entry: dict[str, Any]) -> dict[str, Any]:
    files = list(result.files)
    if item.data_entries is not None:  # what the data folder held, for the next plan's "40 files added"
        listing = stage_dir / DATA_FILES
        atomic_json(listing, item.data_entries)
        files.append(listing)
    has_model = result.model is not None
    if has_model or result.state:
        ckpt = stage_dir / CHECKPOINT
        payload: dict[str, Any] = {"state": result.state, "model": None, "structure": None}
        if has_model:
            cpu_model = result.model.to("cpu")
            payload["model"] = cpu_model.state_dict()
            payload["structure"] = structure_of(cpu_model, config.model)
        atomic_torch_save(ckpt, payload)
        files.append(ckpt)
        entry["checkpoint"] = run_dir.rel(ckpt)
    atomic_json(stage_dir / "result.json", {"stage": item.name, "status": result.status,
                                            "metrics": result.metrics})
    files.append(stage_dir / "result.json")
    entry.update(status=result.status, finished=now(), metrics=result.metrics, has_model=has_model,
                 files=run_dir.file_hashes(files))
    return entry
