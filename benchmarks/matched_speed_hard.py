"""Accuracy at matched measured speed where compression bites: the demo with almost no recovery.

The same comparison as "Accuracy at matched measured speed" (same harness, same re-timing, same matching rule), on
the demo's data with the recovery cut to what a user without the training pipeline has: 4 recovery steps after
each pruning and truncation step, no fine-tuning, no accuracy budget (`filter_prune.max_accuracy_drop: 100`), and
Torch-Pruning's recipe asked for -90% and -96% MACs (its round_to 8 stops a ResNet-18 near -96%). With the demo's
full recovery neither method loses more than a point even at the width floor (measured: both at 97.7 against a
97.5 base at -96% MACs), so the criteria are not told apart; here top-1 falls. A third arm asks IDAP++ for the
same speeds with the recipe's criterion (`filter_prune.criterion: taylor`) on IDAP++'s own latency allocation
(planned steps, per-layer caps) and truncation, from the same trained base: where the recipe is ahead, it says
whether the gap is the criterion's or the allocation's. (Earlier runs' third arms: `latency_weight: none` tied the
default twice; `steering: readings` chose planned steps as the default and was dropped for it.)

Everything here is timed at 1 thread (`validate.threads: 1`: the pruning loop, `validate` and the re-timing). At
2 threads on the 2-core benchmark machine a sub-0.1 ms model's latency has two modes that last for seconds: the
recipe's -90% model, re-timed in 14 fresh session pairs in one process, read 0.065 ms (6.4-7.3x) or 0.125 ms
(3.9-4.3x), while the base moved by 20%; at 1 thread the same 14 pairs read 0.076-0.079 ms (10.9-12.9x). The
recipe's MACs target does not see this; the latency-targeted loop steers by it (one run read 0.35 ms at -59% of the
MACs and 0.17 ms at -94%, and pruned to -94.7% for a speed the recipe had at -92.75%), so at 2 threads the
comparison measured the machine's modes more than the methods.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from benchmarks import matched_speed as ms

LEVELS = (0.9, 0.96)
SHORT = ["finetune.max_epochs=0", "filter_prune.recovery_steps=4", "layer_truncate.recovery_steps=4",
         "filter_prune.max_accuracy_drop=100"]
ARMS = {"criterion=taylor": ["filter_prune.criterion=taylor"]}
FIGURE = ms.REPO / "benchmarks" / "figures" / "matched_speed_hard.png"
THREADS = 1


def run(out: Path, seeds: list[int], quick: bool = False) -> dict[str, Any]:
    return ms.run(out, seeds, quick, datasets=("demo",), levels=LEVELS, arms=ARMS, partial_name="matched_speed_hard",
                  extra=SHORT, threads=THREADS)


def markdown(res: dict[str, Any], figure_path: Path = FIGURE) -> str:
    return ms.markdown(res, figure_path, "## Accuracy at matched measured speed where compression bites", __doc__)
