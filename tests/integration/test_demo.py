"""`configs/demo.yaml` end to end: the acceptance figures of the main job, offline on real digits."""

from __future__ import annotations

import json
from pathlib import Path

from tests.conftest import REPO, run_cli


def test_demo_meets_its_promises(tmp_path: Path):
    run = tmp_path / "demo"
    done = run_cli("pipeline", str(REPO / "configs" / "demo.yaml"), "--run-dir", str(run),
                   "--set", "runtime.progress=false")
    assert done.returncode == 0, done.stderr[-3000:]
    s = json.loads((run / "summary.json").read_text())
    assert s["base"]["top1"] >= 95.0, "the demo's base model must be a real classifier"
    assert s["delta_pct"]["gflops"] <= -50.0
    assert s["base"]["top1"] - s["compressed"]["top1"] <= 2.0
    assert s["parity"]["max_abs_diff"] <= 1e-4
    assert s["latency_ms"]["speedup"] > 1.0
    assert s["gates"]["passed"]
    assert s["removed_blocks"], "the demo removes at least one whole block within its budget"
