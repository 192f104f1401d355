"""A frontier run: a list target takes one pruning trajectory, keeps the model at each point, finishes, exports and
validates each under frontier/<point>/, and ships the one the selection rule picks."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from pydantic import ValidationError

from core.rundir import RunDir
from pipeline.cli import run
from pipeline.frontier import _row as frontier_row
from pipeline.frontier import select
from stages.filter_prune import FilterPruneConfig
from tests.conftest import tiny_config, write_config

POINTS = [0.2, 0.35, 0.9]  # the last is past what 3 steps can remove: not reached, and says why


def test_a_list_target_is_a_frontier_of_its_points_and_one_value_stays_a_single_target():
    c = FilterPruneConfig(target_speedup=[3, 1.5, 2, 2])
    assert (c.target_speedup, c.frontier, c.points()) == (3.0, [1.5, 2.0, 3.0], [1.5, 2.0, 3.0])
    point = FilterPruneConfig(target_speedup=2, frontier=[1.5, 2, 3])  # one point's own run stops at its point
    assert point.points() == [1.5, 2.0]
    assert FilterPruneConfig(target_speedup=[2]).frontier is None
    assert FilterPruneConfig(target_flops_reduction=[0.7, 0.3]).points() == [0.3, 0.7]
    for bad, words in (({"target_speedup": [0.5, 2]}, "out of range"), ({"target_speedup": []}, "takes numbers"),
                       ({"target_flops_reduction": [0.3, 1.2]}, "less than 1"),
                       ({"target_speedup": 2, "frontier": [1.5, 3]}, "not one of the frontier")):
        with pytest.raises(ValidationError, match=words):
            FilterPruneConfig(**bad)


def _row(label: str, speedup: float, top1: float, drop: float) -> dict:
    return {"label": label, "requested": float(label[:-1]), "validated": True, "speedup": speedup, "top1": top1,
            "top1_drop": drop}


def test_the_selection_rule_picks_the_fastest_point_within_the_drop_else_the_most_accurate():
    rows = [_row("2x", 2.1, 97.0, 0.5), _row("3x", 3.0, 96.2, 1.3), _row("4x", 3.9, 94.0, 3.5),
            {"requested": 5.0, "validated": False, "reason": "not reached"}]
    assert select(rows, "fastest_within_drop", 1.5)[0]["label"] == "3x"
    assert select(rows, "fastest_within_drop", None)[0]["label"] == "4x"  # no gate: the fastest
    chosen, why = select(rows, "fastest_within_drop", 0.1)
    assert chosen["label"] == "2x" and "no point keeps top-1 within" in why
    assert select(rows, "most_accurate", 1.5)[0]["label"] == "2x"
    assert select(rows, "largest_target", 1.5)[0]["label"] == "4x"  # the largest validated one


def test_a_point_past_its_target_by_a_kept_truncation_says_so(tmp_path: Path):
    main, branch = RunDir(tmp_path / "run"), RunDir(tmp_path / "run" / "frontier" / "2x")
    branch.root.mkdir(parents=True)
    (branch.root / "model.onnx").write_bytes(b"x")
    why = "the speedup target is reached (3.10x); layer1.1 took the model past the speedup target (3.10x) and " \
          "was kept: it cost no top-1"
    branch.write_manifest({"stages": {"layer_truncate": {"status": "done", "metrics": {"stop_reason": why,
                                                                                "beyond_target": ["layer1.1"]}}}})
    summary = {"latency_ms": {"speedup": 3.0, "compressed": 1.0, "base": 3.0},
               "compressed": {"top1": 95.0, "top5": 99.0, "gflops": 0.1, "params_m": 1.0},
               "base": {"top1": 96.0, "gflops": 0.3}, "gates": {"passed": True}}
    point = {"point": 2.0, "label": "2x", "reached": True, "metrics": {}}
    row = frontier_row(point, summary, branch, main, True)
    assert row["reason"] == f"layer_truncate kept a block beyond the target: {why}"
    branch.write_manifest({"stages": {"layer_truncate": {"status": "done", "metrics": {
        "stop_reason": "removed max_layers=2 blocks", "beyond_target": []}}}})
    assert "timing spread" in frontier_row(point, summary, branch, main, True)["reason"]


@pytest.fixture(scope="module")
def frontier_run(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("frontier")
    cfg = tiny_config(filter_prune={"target_flops_reduction": POINTS, "steps": 4, "p0": 0.3},
                      layer_truncate={"max_layers": 0}, validate={"gates": {"max_top1_drop": 100.0}})
    path = write_config(tmp / "frontier.yaml", cfg)
    assert run(["pipeline", str(path), "--run-dir", str(tmp / "run")]) == 0
    return tmp / "run"


def test_each_point_is_kept_on_one_trajectory_and_finished_in_its_own_run_directory(frontier_run: Path):
    summary = json.loads((frontier_run / "summary.json").read_text())
    rows = summary["frontier"]["points"]
    assert [r["requested"] for r in rows] == POINTS
    manifest = json.loads((frontier_run / "manifest.json").read_text())
    fp = manifest["stages"]["filter_prune"]
    assert [s for s in ("layer_truncate", "validate") if s in manifest["stages"]] == []  # only the trajectory here
    base = fp["metrics"]["gflops_before"]
    for r, target in zip(rows[:2], POINTS[:2], strict=True):
        assert r["validated"] and r["reached_in_pruning"], r
        point = frontier_run / "frontier" / r["label"]
        own = json.loads((point / "summary.json").read_text())
        assert own["targets"]["flops_reduction"]["requested"] == target and own["targets"]["flops_reduction"]["met"]
        assert r["gflops"] <= base * (1 - target) * 1.005 + 1e-9
        pm = json.loads((point / "manifest.json").read_text())
        # the stages before it are the run's own (not re-run), under the point's config fingerprints
        for name in ("load", "train", "calibrate"):
            assert pm["stages"][name]["finished"] == manifest["stages"][name]["finished"], name
        assert pm["stages"]["filter_prune"]["frontier_point"] == r["label"]
        assert (point / "model.onnx").is_file() and (point / "report.html").is_file()
    assert rows[0]["gflops"] > rows[1]["gflops"]  # later points are further along the same trajectory


def test_a_point_the_trajectory_does_not_reach_carries_the_reason(frontier_run: Path):
    last = json.loads((frontier_run / "summary.json").read_text())["frontier"]["points"][-1]
    assert not last["reached_in_pruning"]
    assert last["reason"].startswith("not reached") and "filter_prune.steps" in last["reason"], last


def test_the_selected_point_is_what_the_run_ships(frontier_run: Path):
    summary = json.loads((frontier_run / "summary.json").read_text())
    f = summary["frontier"]
    expected, _ = select(f["points"], "fastest_within_drop", 100.0)
    assert f["selected"] == expected["label"]
    shipped = frontier_run / "frontier" / f["selected"] / "model.onnx"
    assert (frontier_run / "model.onnx").read_bytes() == shipped.read_bytes()
    assert summary["compressed"] == json.loads(shipped.with_name("summary.json").read_text())["compressed"]
    report = (frontier_run / "report.md").read_text()
    assert "## Frontier" in report, report[:2000]
    assert f"[{f['selected']}](frontier/{f['selected']}/report.html) (shipped)" in report
    assert (frontier_run / "figures" / "frontier.png").is_file()


def test_running_the_same_frontier_again_reuses_every_stage(frontier_run: Path, capsys):
    config = frontier_run.parent / "frontier.yaml"
    before = json.loads((frontier_run / "manifest.json").read_text())
    assert run(["pipeline", str(config), "--run-dir", str(frontier_run)]) == 0
    after = json.loads((frontier_run / "manifest.json").read_text())
    assert {n: e["finished"] for n, e in after["stages"].items()} == \
        {n: e["finished"] for n, e in before["stages"].items()}
    for label in (r["label"] for r in after["frontier"]["points"] if r.get("label")):
        log = (frontier_run / "frontier" / label / "log.txt").read_text().split("deployment target")[-1]
        assert "first run" not in log and "re-run" not in log, label
        assert log.count("reused (") == 8, log


def test_one_point_re_run_from_its_own_folder_finishes_that_point(frontier_run: Path, tmp_path: Path):
    """A point's folder with its config.json (which keeps the frontier it came from) re-runs that point: it used to
    run as a frontier of no points and fail on "no frontier point was validated"."""
    import shutil

    copy = tmp_path / "run"
    shutil.copytree(frontier_run, copy)
    label = json.loads((copy / "summary.json").read_text())["frontier"]["points"][0]["label"]
    point = copy / "frontier" / label
    before = json.loads((point / "summary.json").read_text())["run"]["finished"]
    assert run(["pipeline", str(point / "config.json"), "--run-dir", str(point), "--from", "finetune"]) == 0
    after = json.loads((point / "summary.json").read_text())
    assert after["run"]["finished"] != before and after["run"]["current"]
    assert not (point / "frontier").exists()
    log = (point / "log.txt").read_text().split("deployment target")[-1]
    assert "[3] filter_prune: reused" in log and "[5] finetune: reused" not in log, log
    # the frontier's own command then takes that point as it is now (nothing re-run) into its table
    assert run(["pipeline", str(frontier_run.parent / "frontier.yaml"), "--run-dir", str(copy)]) == 0
    log = (point / "log.txt").read_text().split("deployment target")[-1]
    assert log.count("reused (") == 8, log
    row = json.loads((copy / "summary.json").read_text())["frontier"]["points"][0]
    assert row["label"] == label and row["top1"] == after["compressed"]["top1"]


def test_export_of_a_frontier_run_reads_back_the_shipped_point(frontier_run: Path, tmp_path: Path):
    """`compress export RUN_DIR` re-exports the model the run shipped, not the trajectory's last: on a copy whose
    record ships the first point (the least pruned, so unlike the trajectory's end)."""
    import shutil

    import onnx

    copy = tmp_path / "run"
    shutil.copytree(frontier_run, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    first = manifest["frontier"]["points"][0]["label"]
    manifest["frontier"]["selected"] = first
    (copy / "manifest.json").write_text(json.dumps(manifest))
    assert run(["export", str(copy)]) == 0

    def shapes(path: Path) -> list[tuple[int, ...]]:
        return sorted(tuple(i.dims) for i in onnx.load(str(path)).graph.initializer)

    exported = shapes(copy / "exports" / "model.onnx")
    assert exported == shapes(copy / "frontier" / first / "model.onnx")
    last = [r["label"] for r in manifest["frontier"]["points"] if r.get("label")][-1]
    assert exported != shapes(copy / "frontier" / last / "model.onnx")


def test_every_speedup_point_past_where_the_trajectory_stopped_is_finished_from_there(tmp_path: Path):
    """Under a speedup target each point's truncation aims at its own target, so every point the trajectory did not
    reach is finished from where it stopped (not only the first), each with the loop's reason."""
    cfg = tiny_config(filter_prune={"target_speedup": [30.0, 40.0], "target_flops_reduction": None, "steps": 2},
                      layer_truncate={"enabled": False}, finetune={"enabled": False},
                      validate={"threads": 1, "gates": {"max_top1_drop": 100.0}})
    assert run(["pipeline", str(write_config(tmp_path / "c.yaml", cfg)), "--run-dir", str(tmp_path / "run")]) == 0
    rows = json.loads((tmp_path / "run" / "summary.json").read_text())["frontier"]["points"]
    assert [r["requested"] for r in rows] == [30.0, 40.0]
    for r in rows:
        assert r["validated"] and not r["reached_in_pruning"], r
        assert r["reason"].startswith("not reached") and "filter_prune.steps" in r["reason"], r
        own = json.loads((tmp_path / "run" / "frontier" / r["label"] / "summary.json").read_text())
        assert own["targets"]["speedup"]["requested"] == r["requested"]
