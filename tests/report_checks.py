"""Checks of a run's report against the run's own records (used by the demo test and the CLI tests)."""

from __future__ import annotations

import base64
import json
import struct
from html.parser import HTMLParser
from pathlib import Path

import torch

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def md_tables(text: str) -> dict[str, list[list[dict[str, str]]]]:
    """{section title: [table as a list of {header: cell}]} of a markdown report."""
    out: dict[str, list[list[dict[str, str]]]] = {}
    section, lines = "", text.splitlines()
    i = 0
    while i < len(lines):
        line = lines[i]
        if line.startswith("#"):
            section = line.lstrip("#").strip()
        elif line.startswith("|") and i + 1 < len(lines) and lines[i + 1].startswith("|---"):
            headers = [c.strip() for c in line.strip("|").split(" | ")]
            rows, i = [], i + 2
            while i < len(lines) and lines[i].startswith("|"):
                cells = [c.strip() for c in lines[i].strip().strip("|").split(" | ")]
                rows.append(dict(zip(headers, cells, strict=True)))
                i += 1
            out.setdefault(section, []).append(rows)
            continue
        i += 1
    return out


def close(cell: str, value: float, decimals: int) -> bool:
    return abs(float(cell.split()[0].rstrip("%x")) - value) <= 0.51 * 10 ** -decimals


def png_size(data: bytes) -> tuple[int, int]:
    assert data[:8] == PNG_SIGNATURE, "not a PNG"
    assert data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


class _Images(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.srcs: list[str] = []
        self.tags: list[str] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        if tag == "img":
            self.srcs.append(dict(attrs)["src"])


def check_report(run: Path, figures: tuple[str, ...] = ("dynamics.png", "widths.png", "latency.png")) -> dict:
    """Every figure a sensible PNG; report.html self-contained with them embedded; returns the md tables."""
    for name in figures:
        data = (run / "figures" / name).read_bytes()
        w, h = png_size(data)
        assert 300 <= w <= 5000 and 200 <= h <= 3000 and len(data) > 5_000, (name, w, h, len(data))
    parser = _Images()
    page = (run / "report.html").read_text()
    parser.feed(page)
    assert "table" in parser.tags and "h1" in parser.tags
    assert len(parser.srcs) == len(figures)
    for src in parser.srcs:
        assert src.startswith("data:image/png;base64,"), "images are embedded, not linked"
        png_size(base64.b64decode(src.split(",", 1)[1]))
    return md_tables((run / "report.md").read_text())


def check_numbers(run: Path) -> None:
    """The numbers in report.md equal those in summary.json and the stage records."""
    tables = check_report(run)
    s = json.loads((run / "summary.json").read_text())
    manifest = json.loads((run / "manifest.json").read_text())
    (main,) = tables["Base vs compressed"]
    rows = {r[""]: r for r in main}
    for label, key, dec in (("top-1 (%)", "top1", 2), ("top-5 (%)", "top5", 2), ("GMACs", "gflops", 4),
                            ("params (M)", "params_m", 3)):
        assert close(rows[label]["base"], s["base"][key], dec) and close(rows[label]["compressed"],
                                                                          s["compressed"][key], dec), label
    lat = next(r for k, r in rows.items() if k.startswith("latency, median"))
    assert close(lat["base"], s["latency_ms"]["base"], 3) and close(lat["compressed"], s["latency_ms"]["compressed"], 3)
    assert close(lat["change"], s["latency_ms"]["speedup"], 2)
    (dyn,) = tables["Dynamics"]
    steps = torch.load(run / "03_filter_prune" / "checkpoint.pt", weights_only=True)["state"]["dynamics"]
    decisions = torch.load(run / "04_layer_truncate" / "checkpoint.pt", weights_only=True)["state"]["decisions"]
    assert len(dyn) == len(steps) + len(decisions) + 2  # + finetune + deployed
    for row, d in zip(dyn, steps, strict=False):
        assert row["stage"] == "filter_prune"
        assert close(row["GMACs"], d["gflops"], 4) and close(row["params (M)"], d["params_m"], 3)
        assert close(row["top-1 (%)"], d["top1"], 2) and close(row["top-5 (%)"], d["top5"], 2)
        assert row["kept"] == ("yes" if d["accepted"] else "rolled back")
    for row, d in zip(dyn[len(steps):], decisions, strict=False):
        assert row["step"] == f"remove {d['block']}" and close(row["top-1 (%)"], d["top1_after"], 2)
        assert close(row["GMACs"], d["gflops_after"], 4)
    assert close(dyn[-1]["top-1 (%)"], s["compressed"]["top1"], 2) and dyn[-1]["stage"] == "validate"
    ft = manifest["stages"]["finetune"]["metrics"]
    assert close(dyn[-2]["top-1 (%)"], ft["top1"], 2)
    (blocks,) = tables["Removed blocks"]
    assert [r["block"] for r in blocks if r["decision"] == "removed"] == s["removed_blocks"]
    for r, d in zip(blocks, decisions, strict=True):
        assert close(r["divergence D"], d["divergence"], 4)
    (recovery,) = tables["Recovery"]
    assert recovery[-1]["stopped by"] == ft["stopped_by"] and recovery[-1]["rounds / epochs"] == str(ft["epochs"])
    widths = tables["Per-layer widths"][0]
    assert any(r["compressed width"] != r["base width"] for r in widths)
    (artifacts,) = tables["Artifacts"]
    by_file = {r["file"]: r for r in artifacts}
    for rel, digest in manifest["stages"]["validate"]["files"].items():
        assert by_file[rel]["sha256"] == digest
    assert ("Gates passed." if s["gates"]["passed"] else "Gates **failed**.") in (run / "report.md").read_text()
    text = (run / "report.md").read_text()
    assert text.count("Status: **") == 1, "the status is stated once"
    for name, t in s["targets"].items():
        assert f"Target {name} {t['requested']:g}: " + ("met" if t["met"] else "**MISSED**") in text
    (settings,) = tables["Settings"]
    by_setting = {r["setting"]: r["value"] for r in settings}
    assert f"criterion {json.loads((run / 'config.json').read_text())['filter_prune']['criterion']}" \
        in by_setting["filter_prune"]
    assert by_setting["validation runtime"].startswith(s["latency_ms"]["backend"])
    spread = next(r for k, r in rows.items() if k.startswith("latency, p10-p90"))
    assert f"{s['latency_ms']['speedup_low']:.2f}-{s['latency_ms']['speedup_high']:.2f}x" in spread["change"]
