"""Accuracy at matched measured speed where compression bites: the demo at -95% and -98% MACs.

The same comparison as "Accuracy at matched measured speed" (same harness, same re-timing, same matching rule), on
the demo's data with Torch-Pruning's recipe asked for -95% and -98% MACs, where a ResNet-18 keeps a few channels
per layer and top-1 starts to fall. A third arm asks IDAP++ for the same speeds with
`filter_prune.latency_weight: none` (HALP's knapsack: importance per predicted millisecond, without the default's
weighting by each unit's MACs), from the same trained base: it is what chooses that setting's default.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from benchmarks import matched_speed as ms

LEVELS = (0.95, 0.98)
ARMS = {"latency_weight=none": ["filter_prune.latency_weight=none"]}
FIGURE = ms.REPO / "benchmarks" / "figures" / "matched_speed_hard.png"


def run(out: Path, seeds: list[int], quick: bool = False) -> dict[str, Any]:
    return ms.run(out, seeds, quick, datasets=("demo",), levels=LEVELS, arms=ARMS, partial_name="matched_speed_hard")


def markdown(res: dict[str, Any], figure_path: Path = FIGURE) -> str:
    return ms.markdown(res, figure_path, "## Accuracy at matched measured speed where compression bites", __doc__)
