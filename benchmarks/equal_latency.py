"""Accuracy at equal latency: latency-targeted vs MACs-targeted pruning, and what the latency model costs.

Per dataset and seed, one run directory: the demo pipeline first prunes to -70% MACs (the demo's target); its
validated speedup S is then requested as `filter_prune.target_speedup` in the same run directory, which re-runs
filter_prune onwards from the same trained base and calibration. Torch-Pruning's usual recipe (global Taylor
ranking, round_to 8, the same -70% MACs target) is run the same way, through the same recovery and fine-tuning.
All end with the same fine-tuning and are scored and timed by `validate` (ONNX Runtime CPU, batch 1). The latency
run is then repeated with
`--from filter_prune` to show what the measurement cache saves. Measuring cost is the seconds filter_prune and
layer_truncate spent exporting, profiling and timing models, over the stages' total; the first latency run of each
run directory starts with an empty cache (`COMPRESS_CACHE_DIR` per run directory).
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
DIGITS = ["data.kind=digits", "data.val_fraction=0.25", "train.epochs=12"]


def _pipeline(run: Path, sets: list[str], extra: list[str] = ()) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "pipeline.cli", "pipeline", str(REPO / "configs" / "demo.yaml"), "--run-dir",
           str(run), *extra, *[a for s in ["runtime.progress=false", *sets] for a in ("--set", s)]]
    env = {**os.environ, "COMPRESS_CACHE_DIR": str(run.parent / f"{run.name}-cache")}
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=env)
    if done.returncode not in (0, 3):
        raise SystemExit(f"{' '.join(cmd)} exited {done.returncode}:\n{done.stderr[-3000:]}")
    s = json.loads((run / "summary.json").read_text())
    stages = json.loads((run / "manifest.json").read_text())["stages"]
    ran = {n: e for n, e in stages.items() if e.get("status") == "done"}
    measuring = sum(ran[n]["metrics"].get("latency_seconds", 0.0) for n in ("filter_prune", "layer_truncate")
                    if n in ran)
    hits = sum(ran[n]["metrics"].get("latency_cache_hits", 0) for n in ("filter_prune", "layer_truncate") if n in ran)
    misses = sum(ran[n]["metrics"].get("latency_cache_misses", 0) for n in ("filter_prune", "layer_truncate")
                 if n in ran)
    return {"top1": s["compressed"]["top1"], "base_top1": s["base"]["top1"], "speedup": s["latency_ms"]["speedup"],
            "low": s["latency_ms"]["speedup_low"], "high": s["latency_ms"]["speedup_high"],
            "gflops_delta": s["delta_pct"]["gflops"], "measuring_seconds": measuring, "hits": hits, "misses": misses,
            "pruning_seconds": sum(ran[n]["seconds"] for n in ("filter_prune", "layer_truncate") if n in ran),
            "stage_seconds": sum(e["seconds"] for e in ran.values())}  # every stage: a whole run's time


def one(out: Path, dataset: str, seed: int) -> dict[str, Any]:
    run = out / f"eqlat-{dataset}-seed{seed}"
    # the first latency run must measure everything: an earlier benchmark's cache would hide the cost it reports
    shutil.rmtree(run.parent / f"{run.name}-cache", ignore_errors=True)
    sets = [f"seed={seed}", *(DIGITS if dataset == "digits" else [])]
    macs = _pipeline(run, sets, ["--fresh"])
    tp = _pipeline(run, [*sets, "filter_prune.criterion=taylor", "filter_prune.ranking=global",
                         "filter_prune.round_to=8"])
    speed = [*sets, "filter_prune.target_flops_reduction=null", f"filter_prune.target_speedup={macs['speedup']:.3f}"]
    lat = _pipeline(run, speed)
    again = _pipeline(run, speed, ["--from", "filter_prune"])
    return {"dataset": dataset, "seed": seed, "macs": macs, "tp": tp, "latency": lat, "again": again}


def run(out: Path, seeds: list[int], quick: bool = False) -> dict[str, Any]:
    rows = []
    for dataset in ("demo",) if quick else ("demo", "digits"):
        for seed in seeds[:1] if quick else seeds:
            rows.append(one(out, dataset, seed))
            r = rows[-1]
            print(f"equal-latency {dataset} seed {seed}: MACs-targeted {r['macs']['top1']:.2f} at "
                  f"{r['macs']['speedup']:.2f}x, Torch-Pruning recipe {r['tp']['top1']:.2f} at "
                  f"{r['tp']['speedup']:.2f}x, latency-targeted {r['latency']['top1']:.2f} at "
                  f"{r['latency']['speedup']:.2f}x", flush=True)
    return {"rows": rows}


def _stat(values: list[float]) -> tuple[float, float]:
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def markdown(res: dict[str, Any]) -> str:
    lines = ["## Accuracy at equal latency", "", (__doc__ or "").split("\n\n", 1)[1].strip(), "",
             "| dataset | seed | base top-1 | MACs-targeted: top-1, speedup, MACs | Torch-Pruning recipe: top-1, "
             "speedup, MACs | latency-targeted: top-1, speedup, MACs | measuring, first run | second run: cache "
             "hits/misses, measuring |",
             "|---|---|---|---|---|---|---|---|"]

    def arm(x: dict[str, Any]) -> str:
        return f"{x['top1']:.2f}, {x['speedup']:.2f}x ({x['low']:.2f}-{x['high']:.2f}), {x['gflops_delta']:+.0f}%"

    for r in res["rows"]:
        m, lt, a = r["macs"], r["latency"], r["again"]
        lines.append(f"| {r['dataset']} | {r['seed']} | {m['base_top1']:.2f} | {arm(m)} | {arm(r['tp'])} | {arm(lt)} | "
                     f"{lt['measuring_seconds']:.0f} s of {lt['stage_seconds']:.0f} s "
                     f"({lt['measuring_seconds'] / lt['stage_seconds']:.0%}) | {a['hits']}/{a['misses']}, "
                     f"{a['measuring_seconds']:.1f} s |")
    lines.append("")
    for dataset in dict.fromkeys(r["dataset"] for r in res["rows"]):
        rows = [r for r in res["rows"] if r["dataset"] == dataset]
        (mm, ms), (lm, ls) = (_stat([r[k]["top1"] for r in rows]) for k in ("macs", "latency"))
        diff = [r["latency"]["top1"] - r["macs"]["top1"] for r in rows]
        dm, ds = _stat(diff)
        word = ("tie" if abs(dm) <= max(ds, ms, ls) else
                "latency-targeted higher" if dm > 0 else "MACs-targeted higher")
        sp = [r["latency"]["speedup"] / r["macs"]["speedup"] for r in rows]
        tm, ts = _stat([r["tp"]["top1"] for r in rows])
        tsp = statistics.mean(r["tp"]["speedup"] for r in rows)
        lines.append(f"- {dataset}: MACs-targeted {mm:.2f} ± {ms:.2f}, latency-targeted {lm:.2f} ± {ls:.2f}, "
                     f"paired difference {dm:+.2f} ± {ds:.2f} points ({word} within the seed std); latency-targeted "
                     f"speedup / MACs-targeted speedup {statistics.mean(sp):.2f} on average; Torch-Pruning's recipe "
                     f"{tm:.2f} ± {ts:.2f} at {tsp:.2f}x on average")
    share = [r["latency"]["measuring_seconds"] / r["latency"]["stage_seconds"] for r in res["rows"]]
    hits = sum(r["again"]["hits"] for r in res["rows"])
    total = hits + sum(r["again"]["misses"] for r in res["rows"])
    lines.append(f"- measuring on a first run: {statistics.mean(share):.0%} of the pipeline's stage time on average "
                 f"(largest {max(share):.0%}); on the second run {hits} of {total} measurements came from the cache "
                 f"({hits / max(total, 1):.0%})")
    return "\n".join(lines) + "\n"
