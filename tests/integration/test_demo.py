"""`configs/demo.yaml` end to end: the acceptance figures of the main job, offline on real digits."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from core.rundir import sha256
from export.runtime import OrtModel
from tests.conftest import REPO, run_cli
from tests.report_checks import check_numbers


def test_demo_meets_its_promises(tmp_path: Path):
    run = tmp_path / "demo"
    # 2 minutes on an AVX-512 machine, 10 to 20 on a 2-core AVX2 one (AMD EPYC Zen 2, 2026-12-04)
    done = run_cli("pipeline", str(REPO / "configs" / "demo.yaml"), "--run-dir", str(run),
                   "--set", "runtime.progress=false", timeout=1800)
    assert done.returncode == 0, done.stderr[-3000:]
    s = json.loads((run / "summary.json").read_text())
    assert s["base"]["top1"] >= 95.0, "the demo's base model must be a real classifier"
    assert s["delta_pct"]["gflops"] <= -50.0
    assert s["base"]["top1"] - s["compressed"]["top1"] <= 2.0
    assert s["parity"]["max_abs_diff"] <= 1e-4
    assert s["latency_ms"]["speedup"] > 1.0
    assert s["gates"]["passed"]
    assert s["removed_blocks"], "the demo removes at least one whole block within its budget"
    check_numbers(run)  # the report, written by the pipeline, agrees with summary.json and the stage records
    from benchmarks.readme import readme_summary

    # the documented figures are a demo run's, within noise
    shown = readme_summary((REPO / "docs" / "run-directory.md").read_text())
    assert abs(shown["compressed"]["top1"] - s["compressed"]["top1"]) <= 1.5
    assert abs(shown["delta_pct"]["gflops"] - s["delta_pct"]["gflops"]) <= 5.0

    # the standalone verbs on the finished demo run
    before = {p: sha256(p) for p in run.rglob("*") if p.is_file() and p.name != "log.txt"}
    out = tmp_path / "validate.json"
    done = run_cli("validate", str(run / "model.onnx"), "--config", str(REPO / "configs" / "demo.yaml"),
                   "--base", str(run / "07_validate" / "base.onnx"), "--output", str(out),
                   "--set", "validate.runs=20")
    assert done.returncode == 0, done.stderr[-3000:]
    v = json.loads(out.read_text())
    assert v["compressed"]["top1"] == s["compressed"]["top1"] and v["base"]["top1"] == s["base"]["top1"]
    assert v["latency_ms"]["backend"] == "onnxruntime-cpu" and v["latency_ms"]["speedup"] > 1.0
    done = run_cli("export", str(run), "--format", "onnx")
    assert done.returncode == 0, done.stderr[-3000:]
    x = np.random.default_rng(0).standard_normal((4, 1, 32, 32)).astype(np.float32)
    again = OrtModel(run / "exports" / "model.onnx")(x)
    assert np.abs(again - OrtModel(run / "model.onnx")(x)).max() <= 1e-5
    assert {p: sha256(p) for p in before} == before, "the verbs leave the run's own files alone"


def test_readme_demo_figures_are_generated_from_a_demo_run():
    """The README's demo sentence and the example summary.json of docs/run-directory.md come from one run (make
    readme-demo), agree with each other, and carry every key a summary has."""
    import re

    from benchmarks.readme import DEMO, SUMMARY_DOC, blocks, demo_paragraph, readme_summary

    text = (REPO / "README.md").read_text()
    example = readme_summary(SUMMARY_DOC.read_text())
    minutes = int(re.search(r"about (\d+) minutes", blocks(text, DEMO)).group(1))
    assert blocks(text, DEMO) == demo_paragraph(example, minutes)
    for key in ("base", "compressed", "delta_pct", "latency_ms", "parity", "artifacts", "gates", "targets"):
        assert key in example, key
    assert example["name"] == "demo" and example["model"] == "timm:resnet18"
