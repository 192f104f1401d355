"""The report's figures read right: legends beside or above the data (never over it), one colour per budget,
absolute widths on the width bars, and a latency axis that a single slow timing block cannot squash."""

from __future__ import annotations

from pathlib import Path

import pytest

import pipeline._report_figures as F


@pytest.fixture
def drawn(monkeypatch):
    figs = []
    monkeypatch.setattr(F, "_save", lambda fig, path: figs.append(fig))
    return figs


def _rows() -> list[dict]:
    rows = [dict(stage="calibrate", what="base", gflops=0.6, params_m=11.0, top1=98.1, accepted=True)]
    rows += [dict(stage="filter_prune", what=f"step {i}", gflops=0.5 - 0.1 * i, params_m=9.0 - i, top1=97.9 - 0.1 * i,
                  accepted=True) for i in range(3)]
    rows += [dict(stage="layer_truncate", what="drop b", gflops=0.2, params_m=5.0, top1=97.4, accepted=True)]
    return rows


def test_dynamics_budgets_have_their_own_colours_and_the_legends_sit_beside_the_panels(drawn):
    F.figure_dynamics(_rows(), Path("x.png"), {"filter_prune": (98.1, 1.0), "layer_truncate": (97.6, 1.0)})
    top = drawn[0].axes[2]
    budgets = [c for c in top.collections if c.get_label().endswith("pts")]
    colours = {tuple(c.get_colors()[0]) for c in budgets}
    assert len(budgets) == 2 and len(colours) == 2
    assert top.get_legend() is not None
    for ax in drawn[0].axes:  # a panel with one series has no legend
        legend = ax.get_legend()
        assert legend is None or legend.get_bbox_to_anchor().x0 >= ax.get_window_extent().x1 - 1


def test_widths_show_absolute_widths_and_a_legend_above_the_bars(drawn):
    widths = [dict(layer="conv1", base=64, compressed=24, removed=False),
              dict(layer="b.conv", base=128, compressed=128, removed=True),
              dict(layer="fc", base=10, compressed=10, removed=False)]
    F.figure_widths(widths, Path("x.png"))
    ax = drawn[0].axes[0]
    texts = [t.get_text() for t in ax.texts]
    assert "24/64" in texts and "10/10" in texts and not any(t.startswith("128/") for t in texts)
    assert ax.get_legend().get_bbox_to_anchor().y0 >= ax.get_window_extent().y1 - 1
    assert min(t.get_fontsize() for t in ax.get_xticklabels()) >= 7


def test_a_slow_p90_does_not_squash_the_latency_bars(drawn):
    lat = {"backend": "onnxruntime-cpu", "batch": 1, "precision": "fp32", "base": 2.1, "compressed": 0.64,
           "base_p10": 1.9, "base_p90": 16.7, "compressed_p10": 0.6, "compressed_p90": 0.7, "speedup": 3.3,
           "speedup_low": 3.1, "speedup_high": 3.4}
    F.figure_latency({"latency_ms": lat}, Path("x.png"))
    ax = drawn[0].axes[0]
    assert ax.get_ylim()[1] < 4 and any("16.7" in t.get_text() for t in ax.texts)
    F.figure_latency({"latency_ms": {**lat, "base_p90": 2.3}}, Path("y.png"))
    assert not drawn[1].axes[0].texts
