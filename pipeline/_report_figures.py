"""The report's figures (matplotlib, headless): dynamics per step, retained widths per layer, latency."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

from core.rundir import atomic_write


def _save(fig: Any, path: Path) -> None:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight", metadata={"Software": None})
    atomic_write(path, buf.getvalue())


def _legend(ax: Any, **kwargs: Any) -> None:
    """A legend only when it tells several things apart."""
    handles, labels = ax.get_legend_handles_labels()
    if len(handles) > 1:
        ax.legend(handles, labels, **kwargs)


# one colour per stage's budget line, none of them the series' colours (blue, green, red) or the base's grey
BUDGET_COLORS = ("tab:orange", "tab:purple", "tab:brown", "tab:olive", "tab:cyan")


def figure_dynamics(rows: list[dict[str, Any]], path: Path,
                    budgets: dict[str, tuple[float, float]] | None = None) -> None:
    """GMACs, parameters and top-1 per step; the base top-1 and each stage's accuracy budget as lines.

    `budgets` maps a stage to (its starting top-1, its max_accuracy_drop): its rows must stay above the difference.
    """
    from matplotlib.figure import Figure

    budgets = budgets or {}
    fig = Figure(figsize=(11, 8))
    axes = fig.subplots(3, 1, sharex=True)
    fig.subplots_adjust(top=0.9)
    xs = list(range(len(rows)))
    series = [("gflops", "GMACs (1e9 multiply-accumulates)", "tab:blue"), ("params_m", "parameters (M)", "tab:green"),
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
    top = axes[2]
    if rows and rows[0]["top1"] is not None:
        top.axhline(rows[0]["top1"], color="grey", linewidth=1.0, label=f"base top-1 {rows[0]['top1']:.2f}")
    seen = [r["top1"] for r in rows if r["top1"] is not None]
    for (stage, (start, drop)), color in zip(budgets.items(), BUDGET_COLORS, strict=False):
        span = [x for x, r in zip(xs, rows, strict=True) if r["stage"] == stage]
        # a budget far below every measured point (e.g. max_accuracy_drop: 100) would only squash the axis
        if span and seen and start - drop >= min(seen) - 15:
            top.hlines(start - drop, span[0] - 0.5, span[-1] + 0.5, colors=color, linestyles="--",
                       linewidth=1.4, label=f"{stage} budget: start - {drop:g} pts")
    for ax in axes:
        # beside the panel, never over its points (a legend inside covered the top-1 panel's lower left)
        _legend(ax, loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, borderaxespad=0.0)
    prev, n = None, 0
    for x, r in zip(xs, rows, strict=True):
        if r["stage"] != prev:
            for ax in axes:
                ax.axvline(x - 0.5, color="grey", linestyle="--", linewidth=0.8)
            # alternate heights so that the names of short stages do not overlap
            axes[0].annotate(r["stage"], (x - 0.45, 1.02 + 0.1 * (n % 2)), xycoords=("data", "axes fraction"),
                             fontsize=8, va="bottom", annotation_clip=False)
            prev, n = r["stage"], n + 1
    axes[-1].set_xticks(xs)
    axes[-1].set_xticklabels([r["what"] for r in rows], rotation=60, ha="right", fontsize=7)
    axes[-1].set_xlabel("pruning step / truncation decision / stage (dashed lines: stage boundaries)")
    fig.suptitle("Compression dynamics", y=0.99)
    _save(fig, path)


def figure_widths(widths: list[dict[str, Any]], path: Path) -> None:
    """Retained output width per layer, with the absolute widths (kept/base) on each bar; layers inside removed
    blocks are marked removed (no bar)."""
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    n = len(widths)
    fig = Figure(figsize=(max(8.0, 0.24 * n + 2), 5.0))
    ax = fig.subplots()
    kept = [0.0 if w["removed"] else 100.0 * w["compressed"] / w["base"] for w in widths]
    ax.bar(range(n), kept, color="tab:blue")
    gone = [i for i, w in enumerate(widths) if w["removed"]]
    if gone:
        ax.scatter(gone, [3] * len(gone), marker="x", color="tab:red", s=30, zorder=3)
    if n <= 120:  # the absolute widths, where there is room to read them
        for i, w in enumerate(widths):
            if w["removed"]:
                continue  # its cross says it
            text = f"{w['compressed']}/{w['base']}"
            inside = kept[i] >= 45
            ax.text(i, kept[i] - 2 if inside else kept[i] + 2, text, rotation=90, fontsize=6.5,
                    ha="center", va="top" if inside else "bottom", color="white" if inside else "black")
    ax.set_ylim(0, 112)
    ax.set_yticks(range(0, 101, 20))
    ax.set_ylabel("retained output width (% of the base)")
    ax.set_xlabel("layer (conv / linear, in model order); on each bar: channels kept / base channels")
    step = max(1, n // 60)
    ax.set_xticks(range(0, n, step))
    ax.set_xticklabels([widths[i]["layer"] for i in range(0, n, step)], rotation=90, fontsize=7.5)
    handles = [Patch(color="tab:blue", label="share of the base width kept")]
    if gone:
        handles.append(Line2D([], [], marker="x", color="tab:red", linestyle="none",
                              label="inside a removed block (0%)"))
    # above the axes: inside, it hid the tallest bars (the classifier's 100%)
    ax.legend(handles=handles, loc="lower left", bbox_to_anchor=(0.0, 1.01), ncol=2, fontsize=8, frameon=False)
    ax.set_title("Per-layer retained width", pad=22)
    ax.grid(axis="y", alpha=0.3)
    _save(fig, path)


def figure_latency(summary: dict[str, Any], path: Path) -> None:
    """Median latency of base, compressed (and its INT8 model) with their p10-p90 range; speedups with spreads."""
    from matplotlib.figure import Figure

    lat, q = summary["latency_ms"], summary.get("quantized")
    labels = ["base", f"compressed\n{lat.get('precision', 'fp32')}"]
    med = [lat["base"], lat["compressed"]]
    lo = [lat.get("base_p10", lat["base"]), lat.get("compressed_p10", lat["compressed"])]
    hi = [lat.get("base_p90", lat["base"]), lat.get("compressed_p90", lat["compressed"])]
    colors = ["tab:grey", "tab:blue"]
    if q:
        labels.append(f"compressed\n{q['precision']}")
        med.append(q["latency_ms"])
        lo.append(q["latency_p10"])
        hi.append(q["latency_p90"])
        colors.append("tab:green")
    fig = Figure(figsize=(5.8 if not q else 6.6, 4.2))
    ax = fig.subplots()
    # the medians go in the axis labels: a bar can be too short to hold its own
    ax.bar([f"{label}\n{m:.3f} ms" for label, m in zip(labels, med, strict=True)], med, color=colors)
    ax.errorbar(list(range(len(med))), med, yerr=[[m - low for m, low in zip(med, lo, strict=True)],
                                                  [h - m for h, m in zip(hi, med, strict=True)]],
                fmt="none", ecolor="black", capsize=6)
    # a p90 far above every median (one slow block of a noisy timing) would squash the bars: the axis stops
    # above the medians and the clipped whisker carries its value
    ceiling = 1.6 * max(med)
    if max(hi) > ceiling:
        ax.set_ylim(0, ceiling)
        for i, h in enumerate(hi):
            if h > ceiling:
                ax.annotate(f"p90 {h:.3g} ms (off the axis)", (i, ceiling), xytext=(8, -4),
                            textcoords="offset points", ha="left", va="top", fontsize=8,
                            bbox={"boxstyle": "round,pad=0.2", "fc": "white", "ec": "black", "lw": 0.6})
    ax.set_ylabel("latency per batch (ms): median, whiskers p10-p90")
    spread = f" ({lat['speedup_low']:.2f}-{lat['speedup_high']:.2f})" if lat.get("speedup_low") else ""
    title = f"{lat['backend']}, batch {lat['batch']}: compressed {lat['speedup']:.2f}x{spread}"
    if q:
        v = q["speedup_vs_base"]
        title += (f",\n{q['precision']} {v['speedup']:.2f}x ({v['speedup_low']:.2f}-{v['speedup_high']:.2f}) "
                  f"faster than base")
    else:
        title += " faster"
    if lat.get("contended"):  # the caveat travels with the figure, not only with the log
        title += "\nCONTENDED: timed on a busy machine; may not hold on the next run"
    ax.set_title(title, fontsize=10, color="darkred" if lat.get("contended") else "black")
    ax.grid(axis="y", alpha=0.3)
    _save(fig, path)


def figure_latency_model(latency: dict[str, Any], path: Path, top: int = 30) -> None:
    """Latency-targeted pruning: each step's predicted vs measured saving; milliseconds per layer before/after."""
    from matplotlib.figure import Figure

    steps = latency.get("steps", [])
    layers = sorted(latency["layers_before"], key=lambda k: -latency["layers_before"][k])[:top]
    fig = Figure(figsize=(max(9.0, 0.3 * len(layers) + 3), 8.5))
    ax1, ax2 = fig.subplots(2, 1)
    fig.subplots_adjust(hspace=0.5)
    # a timing after untimed steps measured them too: it is plotted against their predictions summed
    timed = [(i + 1, s) for i, s in enumerate(steps) if s.get("timed", True)]
    if timed:
        xs = [i for i, _ in timed]
        ax1.plot(xs, [s.get("predicted_since_ms", s["predicted_ms"]) or 0.0 for _, s in timed], marker="o",
                 label="predicted by the latency model")
        ax1.plot(xs, [s.get("measured_since_ms", s["measured_ms"]) for _, s in timed], marker="s",
                 label="measured (interleaved with the base)")
        ax1.set_xticks(list(range(1, len(steps) + 1)))
        untimed = len(steps) - len(timed)
        ax1.set_xlabel("pruning step" + (f" ({untimed} far from the target not timed: their saving is in the next "
                                         f"timed step's)" if untimed else ""))
        ax1.legend(fontsize=8)
    ax1.set_ylabel("ms saved since the last timing")
    ax1.set_title(f"{latency['runtime']}: {latency['base_ms']:.3g} ms -> {latency['base_ms'] / latency['speedup']:.3g} "
                  f"ms ({latency['speedup']:.2f}x, target {latency['base_ms'] / latency['target_ms']:.2f}x)",
                  fontsize=10)
    ax1.grid(alpha=0.3)
    idx = range(len(layers))
    ax2.bar([i - 0.2 for i in idx], [latency["layers_before"][k] for k in layers], width=0.4, color="tab:grey",
            label="base")
    ax2.bar([i + 0.2 for i in idx], [latency["layers_after"].get(k, 0.0) for k in layers], width=0.4,
            color="tab:blue", label="compressed")
    ax2.set_xticks(list(idx))
    ax2.set_xticklabels(layers, rotation=90, fontsize=7.5)
    ax2.set_ylabel("ms per layer (profiled)")
    ax2.set_title(f"the {len(layers)} slowest layers of the base", fontsize=10)
    ax2.legend(fontsize=8)
    ax2.grid(axis="y", alpha=0.3)
    _save(fig, path)


def figure_frontier(summary: dict[str, Any], path: Path) -> None:
    """A frontier run: top-1 against measured latency of every validated point (latency spread as whiskers), the
    base marked, the shipped point ringed."""
    from matplotlib.figure import Figure

    f, lat, base = summary["frontier"], summary["latency_ms"], summary["base"]
    pts = [r for r in f["points"] if r.get("validated")]
    fig = Figure(figsize=(6.4, 4.4))
    ax = fig.subplots()
    # each point's speedup was timed interleaved with the base in its own validation: placed at the base's median
    # over that speedup, every point sits on one scale, and its spread is the speedup's
    xs, ys = [lat["base"] / r["speedup"] for r in pts], [r["top1"] for r in pts]
    lo = [x - lat["base"] / r["speedup_high"] if r.get("speedup_high") else 0.0 for x, r in zip(xs, pts, strict=True)]
    hi = [lat["base"] / r["speedup_low"] - x if r.get("speedup_low") else 0.0 for x, r in zip(xs, pts, strict=True)]
    ax.errorbar(xs, ys, xerr=[[max(v, 0.0) for v in lo], [max(v, 0.0) for v in hi]], fmt="o-", color="tab:blue",
                ecolor="tab:blue", capsize=4, label="frontier points")
    for i, (x, y, r) in enumerate(zip(xs, ys, pts, strict=True)):  # labels alternate above and below
        ax.annotate(f"{r['label']}: {r['speedup']:.2f}x", (x, y), xytext=(6, 8 if i % 2 == 0 else -14),
                    textcoords="offset points", fontsize=8)
        if r["label"] == f["selected"]:
            ax.scatter([x], [y], s=180, facecolors="none", edgecolors="tab:red", linewidths=1.6, label="shipped")
    ax.scatter([lat["base"]], [base["top1"]], marker="s", color="tab:grey", s=60, label="base", zorder=3)
    ax.annotate(f"base {lat['base']:.3g} ms", (lat["base"], base["top1"]), xytext=(-6, -14),
                textcoords="offset points", ha="right", fontsize=8)
    ax.set_xlabel(f"latency per batch (ms): base median / validated speedup ({lat['backend']}, batch {lat['batch']})")
    ax.set_ylabel("top-1 (%)")
    ax.set_title("accuracy against measured latency")
    ax.grid(alpha=0.3)
    ax.legend(loc="best", fontsize=8)
    _save(fig, path)
