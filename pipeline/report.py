"""`compress report RUN_DIR`: report.md, a self-contained report.html and figures/*.png from a run directory.

Everything comes from the run's own records (manifest.json, summary.json, the stage checkpoints' plain
state), so a report can be made for any run: finished, failed, interrupted or stopped with --until.
"""

from __future__ import annotations

import base64
import html
import io
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.config import Config
from pipeline.rundir import RunDir, atomic_write, load_checkpoint, sha256

REPORT_MD, REPORT_HTML, FIGURES = "report.md", "report.html", "figures"


@dataclass
class Table:
    headers: list[str]
    rows: list[list[str]]


@dataclass
class Section:
    title: str
    text: list[str] = field(default_factory=list)
    tables: list[Table] = field(default_factory=list)
    figures: list[tuple[str, str]] = field(default_factory=list)  # (relative path, caption)


def f2(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}"


def f4(x: float | None) -> str:
    return "-" if x is None else f"{x:.4f}"


def pct(new: float, old: float) -> str:
    return f"{100.0 * (new - old) / old:+.1f}%" if old else "-"


def pts(new: float | None, old: float | None) -> str:
    return "-" if new is None or old is None else f"{new - old:+.2f}"


# ---------------------------------------------------------------------------------------------- records


@dataclass
class RunRecords:
    """What a run directory holds, read once."""

    root: Path
    manifest: dict[str, Any]
    summary: dict[str, Any] | None
    summary_note: str | None
    config: Config | None
    states: dict[str, dict[str, Any]]
    structures: dict[str, dict[str, Any]]


def read_run(run_dir: Path, config: Config | None = None) -> RunRecords:
    from pipeline.errors import UserInputError
    from stages import PIPELINE

    rd = RunDir(run_dir)
    if not rd.manifest_path.is_file():
        raise UserInputError(f"{run_dir} is not a run directory (no manifest.json); pass the --run-dir of a "
                             f"`compress pipeline` run")
    manifest = rd.read_manifest()
    if config is None and (rd.root / "config.json").is_file():
        from pipeline.config import load_config

        config = load_config(rd.root / "config.json")
    summary, note = None, None
    entry = manifest["stages"].get("validate", {})
    path = rd.root / "summary.json"
    if path.is_file():
        if entry.get("status") == "done" and not rd.corrupted_files(entry):
            summary = json.loads(path.read_text())
        else:
            note = "summary.json is from an earlier validation (stages before it have re-run since); ignored"
    states, structures = {}, {}
    for name in PIPELINE:
        e = manifest["stages"].get(name, {})
        if e.get("status") == "done" and e.get("checkpoint") and not rd.corrupted_files(e):
            ckpt = load_checkpoint(rd.root / e["checkpoint"])
            states[name] = ckpt.get("state") or {}
            if ckpt.get("structure") is not None:
                structures[name] = ckpt["structure"]
    return RunRecords(rd.root, manifest, summary, note, config, states, structures)


def run_status(rec: RunRecords) -> tuple[str, str]:
    """(one word, one sentence) on how far the run got."""
    from stages import PIPELINE

    stages = rec.manifest["stages"]
    for name in PIPELINE:
        st = stages.get(name, {}).get("status")
        if st == "failed":
            return "failed", f"failed in stage `{name}`: {stages[name].get('error', 'no error recorded')}"
        if st == "running":
            return "interrupted", (f"interrupted in stage `{name}` (the process was killed or crashed while it ran); "
                                   f"re-run the same command to resume from it")
    if rec.summary is not None:
        gates = rec.summary.get("gates", {})
        if gates.get("passed", True):
            return "finished", "finished: every stage done, validation gates passed"
        return "gates failed", "finished, but validation gates failed: " + "; ".join(gates.get("failures", []))
    done = [n for n in PIPELINE if stages.get(n, {}).get("status") in ("done", "skipped")]
    if not done:
        return "not started", "no stage has finished"
    nxt = PIPELINE[PIPELINE.index(done[-1]) + 1] if done[-1] != PIPELINE[-1] else None
    return "stopped", f"stopped after stage `{done[-1]}`" + (f"; `{nxt}` and later have not run" if nxt else "")


def dynamics_rows(rec: RunRecords) -> list[dict[str, Any]]:
    """One row per pruning step and truncation decision, then fine-tuning and the deployed artifact."""
    rows: list[dict[str, Any]] = []
    dyn = rec.states.get("filter_prune", {}).get("dynamics", [])
    for d in dyn:
        rows.append({"stage": "filter_prune", "what": "start" if d["step"] == 0 else f"step {d['step']}",
                     "params_m": d["params_m"], "gflops": d["gflops"], "top1": d["top1"], "top5": d["top5"],
                     "accepted": d["accepted"], "recovery_rounds": d.get("recovery_rounds"),
                     "recovery_stop": d.get("recovery_stop")})
    last = next((r for r in reversed(rows) if r["accepted"]), None)
    for d in rec.states.get("layer_truncate", {}).get("decisions", []):
        row = {"stage": "layer_truncate", "what": f"remove {d['block']}", "params_m": d.get("params_m_after"),
               "gflops": d.get("gflops_after"), "top1": d["top1_after"], "top5": d.get("top5_after"),
               "accepted": d["accepted"], "recovery_rounds": d.get("recovery_rounds"),
               "recovery_stop": d.get("recovery_stop"), "divergence": d["divergence"]}
        rows.append(row)
        if d["accepted"]:
            last = row
    ft = rec.manifest["stages"].get("finetune", {})
    if ft.get("status") == "done" and last is not None:
        m = ft["metrics"]
        rows.append({"stage": "finetune", "what": f"{m.get('epochs')} epoch(s)", "params_m": last["params_m"],
                     "gflops": last["gflops"], "top1": m.get("top1"), "top5": m.get("top5"), "accepted": True,
                     "recovery_rounds": m.get("epochs"), "recovery_stop": m.get("stopped_by")})
    if rec.summary is not None:
        c = rec.summary["compressed"]
        rows.append({"stage": "validate", "what": f"deployed ({rec.summary['latency_ms']['backend']})",
                     "params_m": c["params_m"], "gflops": c["gflops"], "top1": c["top1"], "top5": c["top5"],
                     "accepted": True, "recovery_rounds": None, "recovery_stop": None})
    return rows


def layer_widths(rec: RunRecords) -> list[dict[str, Any]]:
    """Output width of every conv and linear layer in the base model and in the latest model checkpoint."""
    from torch import nn

    from pipeline.models import build_model
    from stages import PIPELINE

    if rec.config is None or not rec.structures:
        return []
    latest = next(rec.structures[n] for n in reversed(PIPELINE) if n in rec.structures)
    attrs, replaced = latest.get("attrs", {}), latest.get("replaced", {})
    rows = []
    for name, mod in build_model(rec.config.model, with_weights=False).named_modules():
        if isinstance(mod, nn.Conv2d | nn.Linear):
            base = mod.out_channels if isinstance(mod, nn.Conv2d) else mod.out_features
            key = "out_channels" if isinstance(mod, nn.Conv2d) else "out_features"
            removed = any(name == r or name.startswith(r + ".") for r in replaced)
            now = 0 if removed else attrs.get(name, {}).get(key, base)
            rows.append({"layer": name, "type": type(mod).__name__, "base": base, "compressed": now,
                         "removed": removed})
    return rows


# ---------------------------------------------------------------------------------------------- figures


def _save(fig: Any, path: Path) -> None:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight", metadata={"Software": None})
    atomic_write(path, buf.getvalue())


def figure_dynamics(rows: list[dict[str, Any]], path: Path) -> None:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(9, 7.5))
    axes = fig.subplots(3, 1, sharex=True)
    xs = list(range(len(rows)))
    series = [("gflops", "GMACs (multiply-accumulates, 1e9)", "tab:blue"), ("params_m", "parameters (M)",
                                                                             "tab:green"),
              ("top1", "top-1 (%)", "tab:red")]
    for ax, (key, label, color) in zip(axes, series, strict=True):
        ok = [(x, r[key]) for x, r in zip(xs, rows, strict=True) if r[key] is not None and r["accepted"]]
        bad = [(x, r[key]) for x, r in zip(xs, rows, strict=True) if r[key] is not None and not r["accepted"]]
        if ok:
            ax.plot(*zip(*ok, strict=True), marker="o", color=color, label="kept")
        if bad:
            ax.scatter(*zip(*bad, strict=True), marker="x", s=60, color="black", label="rolled back", zorder=3)
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend(loc="best", fontsize=8)
    prev, n = None, 0
    for x, r in zip(xs, rows, strict=True):
        if r["stage"] != prev:
            for ax in axes:
                ax.axvline(x - 0.5, color="grey", linestyle="--", linewidth=0.8)
            # alternate heights so that the names of short stages do not overlap
            axes[0].annotate(r["stage"], (x - 0.45, 1.01 + 0.09 * (n % 2)), xycoords=("data", "axes fraction"),
                             fontsize=8, va="bottom")
            prev, n = r["stage"], n + 1
    axes[-1].set_xticks(xs)
    axes[-1].set_xticklabels([r["what"] for r in rows], rotation=60, ha="right", fontsize=7)
    axes[-1].set_xlabel("pruning step / truncation decision / stage (dashed lines: stage boundaries)")
    fig.suptitle("Compression dynamics")
    _save(fig, path)


def figure_widths(widths: list[dict[str, Any]], path: Path) -> None:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(max(8.0, 0.18 * len(widths) + 2), 4.5))
    ax = fig.subplots()
    kept = [100.0 * w["compressed"] / w["base"] for w in widths]
    colors = ["lightgrey" if w["removed"] else "tab:blue" for w in widths]
    ax.bar(range(len(widths)), kept, color=colors)
    for i, w in enumerate(widths):
        if w["removed"]:
            ax.bar(i, 100.0, color="none", edgecolor="tab:red", hatch="//", linewidth=0.5)
    ax.set_ylim(0, 125)
    ax.set_yticks(range(0, 101, 20))
    ax.set_ylabel("retained output width (%)")
    ax.set_xlabel("layer (conv / linear, in model order)")
    step = max(1, len(widths) // 40)
    ax.set_xticks(range(0, len(widths), step))
    ax.set_xticklabels([widths[i]["layer"] for i in range(0, len(widths), step)], rotation=90, fontsize=6)
    from matplotlib.patches import Patch

    ax.legend(handles=[Patch(color="tab:blue", label="pruned layer (share of base width)"),
                       Patch(facecolor="none", edgecolor="tab:red", hatch="//", label="in a removed block")],
              loc="upper center", ncol=2, fontsize=8)
    ax.set_title("Per-layer retained width")
    ax.grid(axis="y", alpha=0.3)
    _save(fig, path)


def figure_latency(summary: dict[str, Any], path: Path) -> None:
    from matplotlib.figure import Figure

    lat = summary["latency_ms"]
    fig = Figure(figsize=(5.5, 4))
    ax = fig.subplots()
    med = [lat["base"], lat["compressed"]]
    p90 = [lat.get("base_p90", lat["base"]), lat.get("compressed_p90", lat["compressed"])]
    bars = ax.bar(["base", "compressed"], med, color=["tab:grey", "tab:blue"], label="median")
    ax.errorbar([0, 1], med, yerr=[[0, 0], [p - m for p, m in zip(p90, med, strict=True)]], fmt="none",
                ecolor="black", capsize=6, label="p90")
    for b, m in zip(bars, med, strict=True):
        ax.annotate(f"{m:.3f} ms", (b.get_x() + b.get_width() / 2, m / 2), ha="center", va="center", fontsize=10,
                    color="white", fontweight="bold")
    ax.set_ylabel("latency per batch (ms)")
    ax.set_title(f"{lat['backend']}, batch {lat['batch']}, {lat.get('precision', 'fp32')}: "
                 f"{lat['speedup']:.2f}x faster")
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    _save(fig, path)


# ---------------------------------------------------------------------------------------------- sections


def build_sections(rec: RunRecords, rows: list[dict[str, Any]], widths: list[dict[str, Any]]) -> list[Section]:
    from stages import PIPELINE

    word, sentence = run_status(rec)
    name = rec.manifest.get("name", rec.root.name)
    intro = Section(f"Compression report: {name}", [
        f"Model `{rec.manifest.get('model', '?')}`, run directory `{rec.root}`.",
        f"Status: **{word}**, {sentence}."])
    if rec.summary_note:
        intro.text.append(rec.summary_note)
    sections = [intro]
    s = rec.summary
    if s is not None:
        b, c, lat = s["base"], s["compressed"], s["latency_ms"]
        t = Table(["", "base", "compressed", "change"], [
            ["top-1 (%)", f2(b["top1"]), f2(c["top1"]), f"{pts(c['top1'], b['top1'])} pts"],
            ["top-5 (%)", f2(b["top5"]), f2(c["top5"]), f"{pts(c['top5'], b['top5'])} pts"],
            ["GMACs", f4(b["gflops"]), f4(c["gflops"]), pct(c["gflops"], b["gflops"])],
            ["params (M)", f"{b['params_m']:.3f}", f"{c['params_m']:.3f}", pct(c["params_m"], b["params_m"])],
            [f"latency, median (ms; {lat['backend']}, batch {lat['batch']}, {lat.get('precision', 'fp32')})",
             f"{lat['base']:.3f}", f"{lat['compressed']:.3f}", f"{lat['speedup']:.2f}x faster "
             f"({pct(lat['compressed'], lat['base'])})"],
            ["latency, p90 (ms)", f"{lat.get('base_p90', 0):.3f}", f"{lat.get('compressed_p90', 0):.3f}", ""],
        ])
        sec = Section("Base vs compressed", [
            f"Accuracy: {s.get('accuracy_source', 'validation split')}. GMACs are multiply-accumulates at the "
            f"model's input size (summary.json `gflops`). Parity with PyTorch: max |difference| "
            f"{s['parity']['max_abs_diff']:.2e} over {s['parity']['samples']} images."], [t])
        sections.append(sec)
    if rows:
        base_top1 = rows[0]["top1"]
        t = Table(["stage", "step", "params (M)", "GMACs", "top-1 (%)", "top-5 (%)", "Δ top-1 (pts)", "kept"],
                  [[r["stage"], r["what"], "-" if r["params_m"] is None else f"{r['params_m']:.3f}", f4(r["gflops"]),
                    f2(r["top1"]), f2(r["top5"]), pts(r["top1"], base_top1), "yes" if r["accepted"] else
                    "rolled back"] for r in rows])
        sections.append(Section("Dynamics", [
            "One row per pruning step and truncation decision (after its recovery), then fine-tuning and the "
            "deployed artifact; Δ top-1 is against the first row. Rolled-back rows were measured, then undone."],
            [t], [(f"{FIGURES}/dynamics.png", "GMACs, parameters and top-1 across the run")]))
    if widths:
        changed = [w for w in widths if w["compressed"] != w["base"]]
        t = Table(["layer", "type", "base width", "compressed width", "retained"],
                  [[w["layer"], w["type"], str(w["base"]), "removed" if w["removed"] else str(w["compressed"]),
                    f"{100.0 * w['compressed'] / w['base']:.0f}%"] for w in widths])
        sections.append(Section("Per-layer widths", [
            f"{len(changed)} of {len(widths)} conv/linear layers changed (output channels or features; "
            f"`removed` = inside a block replaced by the identity)."], [t],
            [(f"{FIGURES}/widths.png", "retained output width per layer")]))
    elif rec.config is None and rec.structures:
        sections.append(Section("Per-layer widths", [
            "Not shown: the run has no config.json (it is written when an invocation completes); pass the "
            "run's YAML with `compress report RUN_DIR --config CONFIG`."]))
    trunc = rec.states.get("layer_truncate")
    if trunc is not None:
        dec = trunc.get("decisions", [])
        t = Table(["block", "divergence D", "MACs share", "top-1 before", "top-1 after", "decision"],
                  [[d["block"], f"{d['divergence']:.4f}", f"{100 * d['macs_share']:.1f}%", f2(d["top1_before"]),
                    f2(d["top1_after"]), "removed" if d["accepted"] else "rolled back (essential)"] for d in dec])
        text = [f"Removed blocks: {', '.join(trunc.get('removed_blocks', [])) or 'none'}. "
                f"Stopped: {trunc.get('stop_reason', '-')}. Candidates: {len(trunc.get('candidates', []))}."]
        for why, n in (trunc.get("rejected") or {}).items():
            text.append(f"Not candidates: {n} module(s) {why}.")
        sections.append(Section("Removed blocks", text, [t] if dec else []))
    rec_rows = [[r["stage"], r["what"], str(r["recovery_rounds"]), str(r["recovery_stop"])] for r in rows
                if r["recovery_rounds"] is not None or r["recovery_stop"] is not None]
    if rec_rows:
        sections.append(Section("Recovery", [
            "Rounds of recovery training after each step (fine-tuning: epochs) and what stopped them "
            "(`recovery.stopping`)."], [Table(["stage", "step", "rounds / epochs", "stopped by"], rec_rows)]))
    if s is not None:
        g = s["gates"]
        text = [f"Gates {'passed' if g['passed'] else '**failed**'}."]
        text += [f"Failed: {f}" for f in g.get("failures", [])]
        text += [f"Not checked: {u}" for u in g.get("unchecked", [])]
        tables = []
        if rec.config is not None:
            gc = rec.config.validate_.gates.model_dump()
            tables.append(Table(["gate", "threshold"], [[k, "not set" if v is None else str(v)] for k, v in
                                                        gc.items()]))
        sections.append(Section("Gates", text, tables))
        sections.append(Section("Latency", [
            f"{lat['runs']} timed runs after {lat['warmup']} warm-up runs per model, base and compressed "
            f"interleaved."], [], [(f"{FIGURES}/latency.png", "median latency with p90")]))
    st = rec.manifest["stages"]
    sections.append(Section("Stages", [], [Table(["#", "stage", "status", "seconds", "finished"], [
        [str(i), n, st.get(n, {}).get("status", "not run"), f"{st[n]['seconds']:.1f}" if "seconds" in st.get(n, {})
         else "-", st.get(n, {}).get("finished", "-")] for i, n in enumerate(PIPELINE)])]))
    sections.append(Section("Artifacts", ["Files of the run (report files excluded), with their size and sha256."],
                            [Table(["file", "bytes", "sha256"], artifact_rows(rec))]))
    return sections


def artifact_rows(rec: RunRecords) -> list[list[str]]:
    skip = {REPORT_MD, REPORT_HTML, ".lock", "log.txt", "metrics.jsonl"}
    rows = []
    for p in sorted(rec.root.rglob("*")):
        rel = p.relative_to(rec.root)
        if p.is_file() and rel.parts[0] not in (FIGURES, "tensorboard") and p.name not in skip \
                and ".tmp" not in p.name:
            rows.append([str(rel), f"{p.stat().st_size:,}", sha256(p)])
    return rows


# ---------------------------------------------------------------------------------------------- rendering


def _md_cell(text: str) -> str:
    return text.replace("|", "\\|")


def render_md(sections: list[Section]) -> str:
    out = []
    for i, sec in enumerate(sections):
        out.append(("# " if i == 0 else "## ") + sec.title + "\n")
        out += [t + "\n" for t in sec.text]
        for t in sec.tables:
            out.append("| " + " | ".join(map(_md_cell, t.headers)) + " |")
            out.append("|" + "|".join("---" for _ in t.headers) + "|")
            out += ["| " + " | ".join(map(_md_cell, r)) + " |" for r in t.rows]
            out.append("")
        out += [f"![{cap}]({path})\n" for path, cap in sec.figures]
    return "\n".join(out).rstrip() + "\n"


def _inline_md(text: str) -> str:
    """The little markdown the report's prose uses (`code`, **bold**) as HTML."""
    import re

    t = html.escape(text)
    t = re.sub(r"`([^`]+)`", r"<code>\1</code>", t)
    return re.sub(r"\*\*([^*]+)\*\*", r"<b>\1</b>", t)


CSS = ("body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}"
       "table{border-collapse:collapse;margin:1em 0;font-size:14px}td,th{border:1px solid #ccc;padding:3px 8px;"
       "text-align:right}th{background:#f3f3f3}td:first-child,td:nth-child(2){text-align:left}"
       "img{max-width:100%;border:1px solid #eee}code{background:#f6f6f6;padding:0 3px}")


def render_html(sections: list[Section], root: Path) -> str:
    out = ["<!DOCTYPE html>", "<html><head><meta charset='utf-8'>",
           f"<title>{html.escape(sections[0].title)}</title><style>{CSS}</style></head><body>"]
    for i, sec in enumerate(sections):
        tag = "h1" if i == 0 else "h2"
        out.append(f"<{tag}>{html.escape(sec.title)}</{tag}>")
        out += [f"<p>{_inline_md(t)}</p>" for t in sec.text]
        for t in sec.tables:
            out.append("<table><tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in t.headers) + "</tr>")
            out += ["<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in t.rows]
            out.append("</table>")
        for path, cap in sec.figures:
            data = base64.b64encode((root / path).read_bytes()).decode()
            out.append(f"<figure><img alt='{html.escape(cap)}' src='data:image/png;base64,{data}'>"
                       f"<figcaption>{html.escape(cap)}</figcaption></figure>")
    out.append("</body></html>")
    return "\n".join(out) + "\n"


def write_report(run_dir: Path, config: Config | None = None) -> list[Path]:
    """Write report.md, report.html and figures/*.png into `run_dir`; returns the paths written."""
    rec = read_run(run_dir, config)
    rows, widths = dynamics_rows(rec), layer_widths(rec)
    sections = build_sections(rec, rows, widths)
    figs = rec.root / FIGURES
    figs.mkdir(exist_ok=True)
    written = []
    jobs = {"dynamics.png": (figure_dynamics, rows), "widths.png": (figure_widths, widths),
            "latency.png": (figure_latency, rec.summary)}
    for name, (draw, data) in jobs.items():
        path = figs / name
        if not data:
            path.unlink(missing_ok=True)  # a figure of an earlier run would contradict this report
            continue
        draw(data, path)
        written.append(path)
    for sec in sections:
        sec.figures = [(p, c) for p, c in sec.figures if (rec.root / p).is_file()]
    atomic_write(rec.root / REPORT_MD, render_md(sections).encode())
    atomic_write(rec.root / REPORT_HTML, render_html(sections, rec.root).encode())
    return [rec.root / REPORT_MD, rec.root / REPORT_HTML, *written]
