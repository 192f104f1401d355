"""The benchmark's bookkeeping: ties are called by the noise, and the markdown comes from the results only."""

from __future__ import annotations

from benchmarks import criteria


def test_a_difference_within_the_noise_is_a_tie():
    cell = {"divergence": (90.0, 0.5), "taylor": (89.7, 0.2), "random": (60.0, 3.0)}
    v = criteria.verdict(cell, ["divergence"], ["taylor", "random"])
    assert v["theirs"] == "taylor" and v["word"] == "tie" and abs(v["diff"] - 0.3) < 1e-9
    cell["divergence"] = (91.0, 0.5)
    assert criteria.verdict(cell, ["divergence"], ["taylor", "random"])["word"] == "win"
    cell["divergence"] = (88.0, 0.5)
    assert criteria.verdict(cell, ["divergence"], ["taylor", "random"])["word"] == "loss"


def _fake(top1: dict[str, float]) -> dict:
    rows = {c: {b: [{"top1": t - i, "reduction": lv} for i, lv in enumerate(criteria.LEVELS)]
                for b in criteria.BUDGETS} for c, t in top1.items()}
    run = {"base": {"top1": 98.0}, "criteria": rows, "full_epochs": 1, "full_steps": 60}
    return {"raw": {"demo": {0: run, 1: run}}, "criteria": list(top1), "datasets": ["demo"], "seeds": [0, 1],
            "levels": list(criteria.LEVELS)}


def test_markdown_states_the_winner_and_the_default():
    text = criteria.markdown(_fake({"divergence": 95.0, "taylor": 96.0, "l2": 94.0}))
    assert "| demo | -50% | none | divergence | taylor | -1.00 (noise 0.10) | loss |" in text
    assert "Mean top-1 over every dataset, level and budget: taylor" in text
    assert "0 wins, 0 ties, 9 losses" in text


def test_bench_arch_rewrites_only_its_own_section(tmp_path):
    from benchmarks import arch, run

    row = {"arch": "Net", "model": "timm:net", "input": [224, 224], "params_m": [10.0, 4.0], "gflops": [4.0, 1.4],
           "params_delta_pct": -60.0, "gflops_delta_pct": -65.0, "latency_ms": [40.0, 20.0], "speedup": 2.0,
           "efficiency": 2.0 / (4.0 / 1.4), "heads": [12, 6], "steps": 3, "prune_seconds": 1.0, "seconds": 2.0,
           "parity_rel": {"base": 1e-6, "model": 2e-6}}
    body = arch.markdown({"rows": [row, {**row, "arch": "Other", "efficiency": 0.9}], "warmup": 1, "runs": 3,
                          "target": 0.65})
    assert "| Net | `timm:net` | 224x224 | 10.0 → 4.0 (-60.0%) | 4.00 → 1.40 (-65.0%) | 12 → 6 |" in body
    assert "Median efficiency 0.80 over 2 architectures; lowest Net (0.70)" in body
    path = tmp_path / "BENCHMARKS.md"
    path.write_text("# Benchmarks\n\n## Criteria\n\nkept\n")
    run._write_arch(path, body)
    run._write_arch(path, body.replace("Net", "Net2"))  # a second run replaces, never appends
    text = path.read_text()
    assert text.startswith("# Benchmarks\n\n## Criteria\n\nkept\n") and text.count(run.ARCH_START) == 1
    assert "Net2" in text and "| Net |" not in text
    assert run._arch_block(path).startswith(run.ARCH_START)


def test_int8_section_comes_from_its_results_and_keeps_the_others(tmp_path):
    from benchmarks import int8, run

    rows = {r: {"median_ms": m, "p10_ms": m - 1, "p90_ms": m + 1, "bytes": 4e6 * m / 100, "speedup": 100 / m,
                "low": 90 / m, "high": 110 / m} for r, m in zip(int8.ROLES, (100.0, 50.0, 20.0, 45.0), strict=True)}
    fast = {"speedup": 2.5, "speedup_low": 2.4, "speedup_high": 2.6}
    demo = [{"seed": s, "base FP32": 98.0, "pruned FP32": 97.0 + s, "pruned INT8": 96.5 + s, "base INT8": 97.8,
             "int8_drop": 0.5, "agreement": 99.0, "speedup_vs_base": 4.0, "speedup_vs_compressed": 1.5,
             "gflops_delta": -70.0} for s in (0, 2)]
    body = int8.markdown({"resnet50": {"rows": rows, "pruning": {"achieved": 2.01, "macs_ratio": 2.4, "steps": 3},
                                       "pruned_int8_vs_pruned_fp32": fast, "base_int8_vs_base_fp32": fast},
                          "demo": demo})
    assert "| pruned INT8 | 20.0 | 19.0-21.0 | 5.00x | 4.50-5.50 | 0.8 |" in body
    assert "| mean ± sd | 98.00 ± 0.00 | 98.00 ± 1.41 | 97.50 ± 1.41 | 97.80 ± 0.00 |" in body
    path = tmp_path / "BENCHMARKS.md"
    path.write_text("# Benchmarks\n\n## Criteria\n\nkept\n")
    for _ in range(2):
        run._write_arch(path, body, *run._markers("int8"))
    text = path.read_text()
    assert text.count("<!-- bench-int8: start -->") == 1 and "## Criteria\n\nkept\n" in text


def test_equal_latency_calls_ties_by_the_seed_noise():
    from benchmarks import equal_latency

    def rec(top1, speedup, seconds=10.0, hits=0, misses=8):
        return {"top1": top1, "base_top1": 98.0, "speedup": speedup, "low": speedup - 0.2, "high": speedup + 0.2,
                "gflops_delta": -70.0, "measuring_seconds": seconds, "hits": hits, "misses": misses,
                "pruning_seconds": 60.0, "stage_seconds": 200.0}

    rows = [{"dataset": "demo", "seed": s, "macs": rec(96.0 + s, 3.0), "tp": rec(95.5 + s, 4.0 + s),
             "latency": rec(96.2 + s, 3.05), "again": rec(96.2 + s, 3.05, 0.5, 8, 0)} for s in (0, 1, 2)]
    text = equal_latency.markdown({"rows": rows})
    assert "paired difference +0.20 ± 0.00 points (tie within the seed std)" in text
    assert "Torch-Pruning's recipe 96.50 ± 1.00 at 5.00x on average" in text
    assert "| demo | 0 | 98.00 | 96.00, 3.00x (2.80-3.20), -70% | 95.50, 4.00x (3.80-4.20), -70% |" in text
    assert "measuring on a first run: 5% of the pipeline's stage time" in text and "24 of 24" in text


def test_matched_speed_compares_only_matched_seeds_and_calls_ties_by_the_seed_noise(tmp_path):
    from benchmarks import matched_speed as ms

    def timed(s: float) -> dict:
        return {"speedup": s, "speedup_low": s - 0.2, "speedup_high": s + 0.2, "ms": 1.0 / s}

    def row(seed: int, level: float, tp: float, ours: float, speed: float = 5.0, their: float | None = None) -> dict:
        mine = timed(speed if their is None else their)
        return {"dataset": "demo", "seed": seed, "level": level, "base_top1": 98.0,
                "tp": {"level": level, "top1": tp, "timed": timed(speed)}, "ours": {"top1": ours, "timed": mine},
                "matched": ms._overlap(mine, timed(speed))}

    rows = [row(0, 0.7, 97.0, 97.1, 3.0), row(1, 0.7, 97.2, 97.1, 3.0), row(2, 0.7, 97.1, 97.3, 3.0),
            row(0, 0.9, 94.0, 95.5), row(1, 0.9, 94.2, 95.6), row(2, 0.9, 90.0, 99.0, their=9.0)]
    assert not rows[-1]["matched"]  # 9x against 5x: not compared, and the table says so
    wide = {"speedup": 1.7, "speedup_low": 1.2, "speedup_high": 2.9}  # a sub-millisecond model's spread
    assert not ms._overlap(wide, {"speedup": 2.8, "speedup_low": 1.6, "speedup_high": 3.0})  # overlap, not a match
    text = ms.markdown({"rows": rows}, tmp_path / "figure.png")
    assert (tmp_path / "figure.png").stat().st_size > 0 and f"]({tmp_path / 'figure.png'})" in text
    assert "| demo | 2 | -90% | 98.00 | 90.00, 5.00x (4.80-5.20) | 99.00, 9.00x (8.80-9.20) | no: ours ahead on both " \
           "(faster, as accurate or more) | +9.00 |" in text
    assert "- demo at 3.0x (3 of 3 seeds matched): recipe 97.10 ± 0.10, ours 97.17 ± 0.12" in text
    at3 = text.split("\n- demo at 3.0x")[1].split("\n")[0]
    assert "(a tie: within the seed std; ours higher in 2, the recipe in 1)" in at3
    at5 = text.split("\n- demo at 5.0x")[1].split("\n")[0]
    assert at5.startswith(" (2 of 3 seeds matched)") and "+1.45 ± 0.07 points (ours higher by more than" in at5
    assert "the seed std; ours higher in 2, the recipe in 0)" in at5  # a tie or not, who was ahead in each seed
    assert at5.endswith("Of the seeds not at matched speed: 1 ours ahead on both (faster, as accurate or more).")
    # apart in speed: faster and less accurate is a trade-off, not a win; one matched seed is no verdict
    assert ms.dominance(row(0, 0.9, 97.0, 96.0, their=9.0)).startswith("a trade-off")
    assert ms.dominance(row(0, 0.9, 97.0, 97.5, 9.0, their=5.0)).startswith("a trade-off")
    assert ms.dominance(row(0, 0.9, 97.5, 97.0, 9.0, their=5.0)).startswith("recipe ahead on both")
    # medians 10% apart but spreads that overlap: the timing cannot order them, and the more accurate one is ahead
    # (faster by median and 3.6 points more accurate was called a trade-off)
    near = row(0, 0.96, 89.7, 93.3, 20.24, their=22.28)
    near["tp"]["timed"] |= {"speedup_low": 19.0, "speedup_high": 21.6}
    near["ours"]["timed"] |= {"speedup_low": 20.05, "speedup_high": 25.31}
    assert not near["matched"] and ms.dominance(near) == "ours more accurate, speeds not told apart (spreads overlap)"
    near["ours"]["top1"] = 88.0
    assert ms.dominance(near) == "recipe more accurate, speeds not told apart (spreads overlap)"
    one = ms.markdown({"rows": [row(0, 0.7, 97.0, 98.0, 3.0)]}, tmp_path / "one.png")
    assert "(1 of 1 seeds matched)" in one and "(one seed: a figure, not a verdict)" in one
    # an extra arm (other settings asked for the same speed) is judged against the default, not the recipe
    arm = [row(s, 0.95, 90.0, 92.0, 8.0) | {"arms": {"w=none": {"top1": 92.5 + s, "timed": timed(t)}}}
           for s, t in ((0, 8.1), (1, 8.0), (2, 12.0))]
    arm.append(row(3, 0.95, 90.0, 92.0, 8.0) | {"arms": {"w=none": {"top1": None, "reason": "accuracy budget"}}})
    text = ms.markdown({"rows": arm}, tmp_path / "arm.png")
    assert "| ours, w=none: top-1, speedup |" in text and "| not validated: accuracy budget |" in text
    line = next(x for x in text.splitlines() if x.startswith("  - w=none against the default at the recipe's -95%"))
    assert "(3 of 4 seeds): default 92.00 ± 0.00 at 8.00x, w=none 93.50 ± 1.00 at 9.37x" in line
    assert "at matched speed in 2 (paired w=none - default +1.00 ± 0.71: w=none higher by more than" in line
    assert line.endswith("apart in speed: 1 w=none ahead on both.")


def test_torch_pruning_alone_reports_where_it_stops_and_the_matrix_states_the_inspect_ratio():
    """The Torch-Pruning-alone column: a model it handles finishes with its MACs cut; a coupling it cannot follow
    is reported where it failed, never as a cut; the matrix section states the inspect-to-run median."""
    from benchmarks.matrix import markdown
    from benchmarks.tp_alone import cell, run_one

    ok = run_one("torchvision", "resnet18", 32)
    assert ok["outcome"] == "ok" and 0.3 < ok["cut"] < 0.7, ok
    assert cell({"outcome": "step", "error": "IndexError: index 169 is out of bounds"}).startswith("fails in its step")
    assert cell({"outcome": "hang", "error": "still running"}) == "hangs"
    row = {"model": "a:b", "input": 64, "gflops": 0.1, "cut": 0.5, "held": 0, "held_share": 0.0, "held_kinds": {},
           "parity_rel": 1e-7, "seconds": 20.0, "inspect_s": 1.0, "tp_alone": ok}
    text = markdown({"rows": [row, {**row, "inspect_s": 3.0}], "failures": {}})
    assert "median 10.0% of the pipeline run's time" in text and f"-{ok['cut']:.1%}" in text
    assert "finished on 2 of 2" in text


def test_the_recipe_is_asked_again_along_the_speed_it_showed():
    from benchmarks.matched_speed import next_level

    # one run: MACs left scale as 1/speedup
    assert abs(next_level([(0.9, 10.0)], 20.0) - 0.95) < 1e-9
    # two runs: the power law through them (speed grew as (MACs left)^-0.5 here, so 1.5x the speed again needs
    # 1/2.25 of the MACs left)
    assert abs(next_level([(0.9, 10.0), (0.975, 20.0)], 30.0) - (1 - 0.025 / 2.25)) < 1e-6
    # a target that would not move (the recipe's floor, or our speed already asked): nothing more to try
    assert next_level([(0.96, 20.0)], 20.01) is None
