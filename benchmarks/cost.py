"""Pipeline cost: wall time per stage of a demo run, calibration vs one training epoch, dependency-graph builds
per pruning step, and the peak resident memory of the process (the demo config, run in a fresh process)."""

from __future__ import annotations

import json
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]


def run(out_dir: Path, quick: bool) -> dict[str, Any]:
    run_dir = out_dir / "cost_demo"
    cmd = [sys.executable, "-m", "pipeline.cli", "pipeline", str(REPO / "configs" / "demo.yaml"), "--run-dir",
           str(run_dir), "--fresh", "--set", "runtime.progress=false"]
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    t0 = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
    wall = time.perf_counter() - t0
    if done.returncode != 0:
        raise RuntimeError(f"cost run failed:\n{done.stderr[-3000:]}")
    peak_kb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    manifest = json.loads((run_dir / "manifest.json").read_text())
    stages = {n: e["seconds"] for n, e in manifest["stages"].items()}
    fp = manifest["stages"]["filter_prune"]["metrics"]
    train = manifest["stages"]["train"]["metrics"]
    return {"wall_seconds": wall, "stages": stages, "peak_rss_mb": max(peak_kb, before) / 1024,
            "train_epoch_seconds": stages["train"] / train["epochs"], "calibrate_seconds": stages["calibrate"],
            "graph_builds": fp["graph_builds"], "steps": fp["steps_taken"], "scoring_seconds": fp["scoring_seconds"],
            "summary": json.loads((run_dir / "summary.json").read_text())}


def markdown(res: dict[str, Any]) -> str:
    s = res["summary"]
    lines = ["## Pipeline cost (demo run)", "", (__doc__ or "").strip().replace("\n", " "), "",
             "| stage | seconds | share |", "|---|---|---|"]
    total = sum(res["stages"].values())
    lines += [f"| {n} | {sec:.1f} | {100 * sec / total:.0f}% |" for n, sec in res["stages"].items()]
    lines += [f"| total (stages) | {total:.1f} | 100% |", "",
              f"- wall time of the process: {res['wall_seconds']:.1f} s (imports and start-up included)",
              f"- calibration: {res['calibrate_seconds']:.1f} s = "
              f"{res['calibrate_seconds'] / res['train_epoch_seconds']:.2f} x one training epoch "
              f"({res['train_epoch_seconds']:.1f} s)",
              f"- dependency-graph builds: {res['graph_builds']} for {res['steps']} pruning steps "
              f"({res['graph_builds'] / max(res['steps'], 1):.1f} per step); graph building + scoring "
              f"{res['scoring_seconds']:.1f} s in total",
              f"- peak resident memory of the process: {res['peak_rss_mb']:.0f} MB",
              f"- result of this run: top-1 {s['base']['top1']:.2f} -> {s['compressed']['top1']:.2f}, GMACs "
              f"{s['delta_pct']['gflops']:+.1f}%, latency {s['latency_ms']['speedup']:.2f}x", ""]
    return "\n".join(lines) + "\n"
