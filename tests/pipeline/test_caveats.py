"""A latency figure taken on a busy machine carries its caveat wherever it appears: the console table, the report,
latency.png's title and summary.json (written by validate; checked in tests/export/test_validation.py)."""

from __future__ import annotations

from pathlib import Path

from rich.console import Console

import pipeline._report_figures as F
from export.validation import contended
from pipeline.cli import summary_table

BUSY = "while timing with 2 threads, other processes kept 1.90 of the 2 cores busy"


def _summary(busy: str | None) -> dict:
    lat = {"backend": "onnxruntime-cpu", "batch": 1, "precision": "fp32", "base": 0.5, "compressed": 0.2,
           "base_p10": 0.45, "base_p90": 0.6, "compressed_p10": 0.18, "compressed_p90": 0.25, "speedup": 2.5,
           "speedup_low": 2.2, "speedup_high": 2.8, "threads": 2, "contended": busy,
           "machine": {"other_cores": 1.9 if busy else 0.0, "steal_share": 0.0, "cores": 2}}
    return {"name": "n", "model": "timm:resnet18", "latency_ms": lat,
            "base": {"top1": 90.0, "top5": 99.0, "gflops": 1.0, "params_m": 1.0},
            "compressed": {"top1": 89.0, "top5": 99.0, "gflops": 0.5, "params_m": 0.5},
            "delta_pct": {"top1": -1.0, "gflops": -50.0, "params_m": -50.0}, "parity": {"max_abs_diff": 1e-6},
            "targets": {}}


def _table_text(summary: dict) -> str:
    console = Console(record=True, width=200)
    console.print(summary_table(summary))
    return console.export_text()


def test_the_console_table_and_report_say_contended(tmp_path: Path):
    assert "CONTENDED" in _table_text(_summary(BUSY)) and "CONTENDED" not in _table_text(_summary(None))
    assert contended(_summary(BUSY)["latency_ms"]) == BUSY and contended(_summary(None)["latency_ms"]) is None
    old = _summary(None)["latency_ms"]  # a summary from before `contended` was recorded: judged by its load
    del old["contended"]
    old["machine"]["other_cores"] = 1.9
    assert "other processes kept 1.90" in contended(old)


def test_latency_png_title_carries_the_caveat(tmp_path: Path, monkeypatch):
    titles = []
    monkeypatch.setattr(F, "_save", lambda fig, path: titles.append(fig.axes[0].get_title()))
    F.figure_latency(_summary(BUSY), tmp_path / "a.png")
    F.figure_latency(_summary(None), tmp_path / "b.png")
    assert "CONTENDED" in titles[0] and "CONTENDED" not in titles[1]
