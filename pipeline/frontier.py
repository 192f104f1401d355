"""A frontier run: one pruning trajectory, stopped at each of a list of targets, and every point finished, exported
and validated, so that users see what each millisecond costs in accuracy on their runtime and pick.

`filter_prune.target_speedup: [1.5, 2, 3, 4]` (or a list of MACs reductions) runs load -> calibrate ->
filter_prune once, in the run directory itself; filter_prune keeps the model at each point it reaches
(`<stage>/points/<point>.pt`). Each point then runs the later stages in a run directory of its own,
`frontier/<point>/`, whose config is the run's with that point as its target: the stages before it are the run's
own checkpoints (hard links), recorded with that config's fingerprints, so re-runs reuse and invalidate exactly as
a single run does. A selection rule (`filter_prune.select`) decides which point the top-level model.onnx and
summary.json are; summary.json's `frontier` table lists them all.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
from pathlib import Path
from typing import Any

from rich.console import Console

from core.context import SUMMARY
from core.errors import UserInputError
from core.registry import PIPELINE
from core.rundir import RunDir, atomic_json, atomic_write, load_checkpoint, now
from pipeline.config import Config
from pipeline.plan import gather_inputs
from pipeline.runner import run_pipeline, supersede

FRONTIER = "frontier"
ARTIFACTS = ("model.onnx", "model.int8.onnx", "model.engine")  # what a point may ship, copied when selected
UPSTREAM = PIPELINE[: PIPELINE.index("filter_prune") + 1]
DOWNSTREAM = PIPELINE[PIPELINE.index("filter_prune") + 1:]
WITHIN = 0.10  # a point's validated speedup this close to its target needs no reason


def point_config(config: Config, point: float, root: Path) -> Config:
    """The run's config with one frontier point as its target (the frontier kept: the trajectory it came from)."""
    fp = config.filter_prune
    key = "target_speedup" if fp.target_speedup else "target_flops_reduction"
    data = config.model_dump(mode="json", by_alias=True)
    data["filter_prune"][key] = point
    data["run_dir"] = str(root)
    return Config.model_validate(data)


def _link(src: Path, dst: Path) -> None:
    """dst becomes src's content: a hard link where the file system allows, else a copy."""
    if dst.exists() and os.path.samefile(src, dst):
        return
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(f".{dst.name}.link.tmp")
    tmp.unlink(missing_ok=True)
    try:
        os.link(src, tmp)
    except OSError:
        shutil.copy2(src, tmp)
    os.replace(tmp, dst)


def _seed(main: RunDir, manifest: dict[str, Any], branch: RunDir, config: Config, point: dict[str, Any]) -> None:
    """Record in a point's run directory the stages it shares with the run: load to calibrate as they are, and
    filter_prune as the trajectory's model at this point, each under the point's config fingerprints."""
    bm = branch.read_manifest()
    bm.update({"name": config.name, "model": f"{config.model.source}:{config.model.name}"})
    inputs = gather_inputs(config, PIPELINE)
    for i, name in enumerate(UPSTREAM):
        src = manifest["stages"].get(name)
        if src is None:
            continue
        entry = copy.deepcopy(src)
        if name == "filter_prune":
            stage = branch.stage_dir(i, name)
            ckpt, result = stage / "checkpoint.pt", stage / "result.json"
            _link(main.root / Path(src["checkpoint"]).parent / point["file"], ckpt)
            atomic_json(result, {"stage": name, "status": "done", "metrics": point["metrics"],
                                 "frontier_point": point["label"]})
            entry.update(checkpoint=branch.rel(ckpt), metrics=point["metrics"],
                         files=branch.file_hashes([ckpt, result]), frontier_point=point["label"])
        else:
            for rel in entry.get("files", {}):
                _link(main.root / rel, branch.root / rel)
        entry.update(config_hash=inputs.hashes[i], inputs=inputs.per_stage[i])
        bm["stages"][name] = entry
    branch.write_manifest(bm)


def _row(point: dict[str, Any], summary: dict[str, Any] | None, branch: RunDir, main: RunDir,
         speedup: bool) -> dict[str, Any]:
    """A frontier table row: what was asked, what validate measured, and why a point is off its target."""
    row: dict[str, Any] = {"requested": point["point"], "label": point["label"], "reached_in_pruning":
                           point["reached"], "path": main.rel(branch.root / "model.onnx")}
    if summary is None:
        return {**row, "validated": False, "reason": "not validated (the run stopped before validate)"}
    lat, c = summary["latency_ms"], summary["compressed"]
    row.update(validated=True, speedup=lat["speedup"], speedup_low=lat.get("speedup_low"),
               speedup_high=lat.get("speedup_high"), latency_ms=lat["compressed"], base_latency_ms=lat["base"],
               contended=lat.get("contended"), top1=c["top1"], top5=c["top5"],
               top1_drop=round(summary["base"]["top1"] - c["top1"], 4), gflops=c["gflops"], params_m=c["params_m"],
               bytes=c.get("bytes") or (branch.root / "model.onnx").stat().st_size,
               gates_passed=summary["gates"]["passed"])
    achieved = lat["speedup"] if speedup else 1.0 - c["gflops"] / summary["base"]["gflops"]
    row["achieved"] = round(achieved, 4)
    off = abs(achieved / point["point"] - 1.0) > WITHIN
    if not point["reached"]:
        row["reason"] = point["metrics"].get("stop_reason", "not reached")
    elif off and speedup and achieved > point["point"] and (
            trunc := branch.read_manifest()["stages"].get("layer_truncate", {}).get("metrics", {})).get(
                "beyond_target"):
        row["reason"] = f"layer_truncate kept a block beyond the target: {trunc['stop_reason']}"
    elif off:
        target = (summary.get("targets") or {}).get("speedup" if speedup else "flops_reduction", {})
        row["reason"] = (target.get("short_because", {}).get("reason") or
                         f"validated {achieved:.3g} is more than {WITHIN:.0%} from the {point['point']:g} the pruning "
                         f"loop reached ({'timing spread on the validation runtime' if speedup else 'truncation'})")
    return row


def select(rows: list[dict[str, Any]], rule: str, max_drop: float | None) -> tuple[dict[str, Any], str]:
    """The point the run ships, and why (filter_prune.select)."""
    done = [r for r in rows if r.get("validated")]
    if not done:
        raise UserInputError("no frontier point was validated, so none can be selected; see the points' run "
                             "directories under frontier/")
    if rule == "largest_target":
        return done[-1], "the largest target's point (filter_prune.select: largest_target)"
    most_accurate = max(done, key=lambda r: (r["top1"], r["speedup"]))
    if rule == "most_accurate":
        return most_accurate, "the most accurate point (filter_prune.select: most_accurate)"
    within = [r for r in done if max_drop is None or r["top1_drop"] <= max_drop]
    if not within:
        return most_accurate, (f"no point keeps top-1 within validate.gates.max_top1_drop {max_drop:g}: the most "
                               f"accurate one is shipped, and its gates decide the exit code")
    bound = "any top-1 drop (validate.gates.max_top1_drop is not set)" if max_drop is None else \
        f"top-1 drop at most {max_drop:g} points (validate.gates.max_top1_drop)"
    return max(within, key=lambda r: r["speedup"]), f"the fastest point with {bound}"


def run_frontier(config: Config, run_dir: RunDir, console: Console, start: str | None = None,
                 until: str | None = None, fresh: bool = False,
                 again: str = "Run the same command again") -> dict[str, Any] | None:
    """Run a frontier (see the module's docstring); returns the top-level summary.json's content, or None when
    --until stopped it before the points were validated."""
    if not config.filter_prune.enabled:
        raise UserInputError("a list target (filter_prune.frontier) needs filter_prune.enabled: true: the points "
                             "are taken on its trajectory")
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise UserInputError("a frontier run (a list target) runs in one process, not under torchrun; run it with "
                             "`compress pipeline`, or give filter_prune one target")
    if run_dir.read_manifest()["stages"].get("filter_prune", {}).get("frontier_point"):
        # one point's own folder (frontier/<point>/), run with its config.json: that config keeps the frontier (the
        # trajectory the point came from), but the folder holds one point; run as a frontier it found no points,
        # finished nothing and failed on "no frontier point was validated". Re-running it finishes that point.
        return run_pipeline(config, run_dir, console, start, until, fresh, again)
    run_dir.lock()
    try:
        main_until = until if until in UPSTREAM else "filter_prune"
        run_pipeline(config, run_dir, console, start if start in UPSTREAM else None, main_until, fresh, again,
                     locked=True)
        if until in UPSTREAM:
            return None
        manifest = run_dir.read_manifest()
        # a single run's later stages in this folder, and the summary and artifacts at its top, describe another
        # model now: marked before any point runs or any artifact is copied up (see supersede)
        supersede(run_dir, manifest, list(DOWNSTREAM), "a frontier run, whose points finish under frontier/",
                  entry_note="superseded by the frontier run (frontier/)")
        entry = manifest["stages"]["filter_prune"]
        points = load_checkpoint(run_dir.root / entry["checkpoint"])["state"].get("points") or []
        speedup = config.filter_prune.target_speedup is not None
        rows = []
        for point in points:
            branch = RunDir(run_dir.root / FRONTIER / point["label"])
            pconf = point_config(config, point["point"], branch.root)
            branch.lock()
            try:
                _seed(run_dir, manifest, branch, pconf, point)
            finally:
                branch.unlock()
            console.print(f"frontier point {point['label']}: {'reached' if point['reached'] else 'NOT reached'} "
                          f"at pruning step {point['step']}; finishing it in {branch.root}", markup=False,
                          highlight=False, soft_wrap=True)
            summary = run_pipeline(pconf, branch, console, start if start in DOWNSTREAM else None, until,
                                   False, again)
            if pconf.logging.report and summary is not None:
                from pipeline.report import write_report

                write_report(branch.root, pconf)
            rows.append(_row(point, summary, branch, run_dir, speedup))
        missing = [p for p in config.filter_prune.frontier if p not in {pt["point"] for pt in points}]
        for p in missing:  # a MACs target past the first point not reached: nothing of its own to ship
            rows.append({"requested": p, "validated": False, "reached_in_pruning": False,
                         "reason": f"not reached: {entry['metrics'].get('stop_reason', 'the trajectory stopped')} "
                                   f"(the first point not reached holds where it stopped; truncation does not aim "
                                   f"at a MACs target, so the points after it would be the same model)"})
        rows.sort(key=lambda r: r["requested"])
        if until is not None and until != PIPELINE[-1]:
            _record(run_dir, manifest, rows, None, None)
            return None
        chosen, why = select(rows, config.filter_prune.select, config.validate_.gates.max_top1_drop)
        return _publish(run_dir, manifest, rows, chosen, why)
    finally:
        run_dir.unlock()


def _record(run_dir: RunDir, manifest: dict[str, Any], rows: list[dict[str, Any]], chosen: dict[str, Any] | None,
            files: dict[str, str] | None) -> None:
    manifest = run_dir.read_manifest()
    manifest["frontier"] = {"points": rows, "selected": chosen["label"] if chosen else None, "files": files or {},
                            "finished": now()}
    run_dir.write_manifest(manifest)


def _publish(run_dir: RunDir, manifest: dict[str, Any], rows: list[dict[str, Any]], chosen: dict[str, Any],
             why: str) -> dict[str, Any]:
    """The selected point's artifacts and summary become the run's own, with the whole frontier beside them."""
    branch = run_dir.root / FRONTIER / chosen["label"]
    written = []
    for name in ARTIFACTS:
        src, dst = branch / name, run_dir.root / name
        if src.is_file():
            atomic_write(dst, src.read_bytes())
            written.append(dst)
        else:
            dst.unlink(missing_ok=True)  # an earlier run's artifact would contradict the summary
    summary = json.loads((branch / SUMMARY).read_text())
    summary["frontier"] = {"selected": chosen["label"], "why": why, "points": rows}
    summary["artifacts"] = {**summary.get("artifacts", {}), "frontier": FRONTIER}
    atomic_json(run_dir.root / SUMMARY, summary)
    written.append(run_dir.root / SUMMARY)
    _record(run_dir, manifest, rows, chosen, run_dir.file_hashes(written))
    return summary


def selected_run(config: Config, run_dir: RunDir, summary: dict[str, Any]) -> tuple[Config, RunDir]:
    """The config and run directory of the point a frontier run shipped (the run's own otherwise)."""
    frontier = summary.get("frontier") if summary else None
    if not frontier:
        return config, run_dir
    row = next(r for r in frontier["points"] if r.get("label") == frontier["selected"])
    root = run_dir.root / FRONTIER / row["label"]
    return point_config(config, row["requested"], root), RunDir(root)


def shipped_point(run_dir: Path) -> Path:
    """The run directory that holds the model a run shipped: a frontier run's selected point, else the run's own
    (for verbs that read the compressed model back, e.g. `compress export`)."""
    selected = (RunDir(run_dir).read_manifest().get("frontier") or {}).get("selected")
    return Path(run_dir) / FRONTIER / selected if selected else Path(run_dir)
