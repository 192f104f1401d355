"""`compress report RUN_DIR`: report.md, a self-contained report.html and figures/*.png from a run directory.

Everything comes from the run's own records (manifest.json, summary.json, the stage checkpoints' plain
state), so a report can be made for any run: finished, failed, interrupted or stopped with --until.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from core.context import SUMMARY
from core.errors import UserInputError
from core.records import FIGURES, ReportSection, RunRecords, Table, f2, f4, pct, pts
from core.rundir import RunDir, atomic_write, load_checkpoint, sha256
from export.validation import contended
from pipeline._report_figures import (
    figure_dynamics,
    figure_frontier,
    figure_latency,
    figure_latency_model,
    figure_widths,
)
from pipeline._report_render import render_html, render_md
from pipeline.config import Config

REPORT_MD, REPORT_HTML = "report.md", "report.html"


# ---------------------------------------------------------------------------------------------- records


def read_run(run_dir: Path, config: Config | None = None) -> RunRecords:
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
    damage = {n: rd.corrupted_files(e) for n, e in manifest["stages"].items() if e.get("status") == "done"}
    damage = {n: bad for n, bad in damage.items() if bad}
    entry = manifest["stages"].get("validate", {})
    path = rd.root / "summary.json"
    frontier = manifest.get("frontier") or {}
    if frontier.get("selected") and path.is_file():  # a frontier run: the shipped point's summary, as published
        if rd.file_hashes([path]).get(SUMMARY) == frontier.get("files", {}).get(SUMMARY):
            summary = json.loads(path.read_text())
        else:
            damage["frontier"] = [SUMMARY]
    elif path.is_file() and "validate" not in damage:
        if entry.get("status") == "done":
            summary = json.loads(path.read_text())
        else:
            note = "summary.json is from an earlier validation (stages before it have re-run since); ignored"
    states, structures = {}, {}
    for name in PIPELINE:
        e = manifest["stages"].get(name, {})
        if e.get("status") == "done" and e.get("checkpoint") and name not in damage:
            ckpt = load_checkpoint(rd.root / e["checkpoint"])
            states[name] = ckpt.get("state") or {}
            if ckpt.get("structure") is not None:
                structures[name] = ckpt["structure"]
    return RunRecords(rd.root, manifest, summary, note, config, states, structures, damage)


def run_status(rec: RunRecords) -> tuple[str, str]:
    """(one word, the rest of the sentence) on how far the run got: "Status: **word** rest."."""
    from stages import PIPELINE

    stages = rec.manifest["stages"]
    if rec.damage:
        return "damaged", ("(files changed or missing since they were written: " + "; ".join(
            f"stage `{n}`: {', '.join(files)}" for n, files in rec.damage.items()) + "); their figures are not "
            "shown. Re-run with --from the first damaged stage to recompute them")
    for name in PIPELINE:
        entry = stages.get(name, {})
        st = entry.get("status")
        if st == "failed":
            return "failed", f"in stage `{name}`: {entry.get('error', 'no error recorded')}"
        if st == "interrupted":
            return "interrupted", (f"in stage `{name}` by {entry.get('signal', 'a signal')}; re-run the same command "
                                   f"to resume from it")
        if st == "running":
            return "interrupted", (f"in stage `{name}` (the process was killed or crashed while it ran); re-run the "
                                   f"same command to resume from it")
        if st == "outdated":
            return "interrupted", (f"before stage `{name}` re-ran (a re-run was stopped); its record and every later "
                                   f"one belong to the previous run. Re-run the same command to finish")
    if rec.summary is not None:
        gates = rec.summary.get("gates", {})
        if gates.get("passed", True):
            return "finished", "with every stage done and the validation gates passed"
        return "gates failed", "with every stage done; failed: " + "; ".join(gates.get("failures", []))
    done = [n for n in PIPELINE if stages.get(n, {}).get("status") in ("done", "skipped")]
    if not done:
        return "not started", "(no stage has finished)"
    nxt = PIPELINE[PIPELINE.index(done[-1]) + 1] if done[-1] != PIPELINE[-1] else None
    return "stopped", f"after stage `{done[-1]}`" + (f"; `{nxt}` and later have not run" if nxt else "")


def dynamics_rows(rec: RunRecords) -> list[dict[str, Any]]:
    """One row per pruning step and truncation decision, then fine-tuning and the deployed artifact: each stage
    gives its own rows (its `dynamics` method), in pipeline order."""
    from core.context import STAGES
    from stages import PIPELINE

    rows: list[dict[str, Any]] = []
    for name in PIPELINE:
        if (own := getattr(STAGES.get(name), "dynamics", None)) is not None:
            rows += own(rec, rows)
    return rows


def layer_widths(rec: RunRecords) -> list[dict[str, Any]]:
    """Output width of every conv and linear layer in the base model and in the latest model checkpoint."""
    from torch import nn

    from core.models import build_model
    from stages import PIPELINE

    if rec.config is None or not rec.structures:
        return []
    latest = next(rec.structures[n] for n in reversed(PIPELINE) if n in rec.structures)
    attrs, replaced = latest.get("attrs", {}), latest.get("replaced", {})
    rows = []
    try:
        fresh = build_model(rec.config.model, with_weights=False)
    except UserInputError as exc:  # e.g. a factory file relative to another folder, or a model object
        rec.notes.append(f"Per-layer widths are not shown: the base model cannot be built here ({exc}).")
        return []
    for name, mod in fresh.named_modules():
        if isinstance(mod, nn.Conv2d | nn.Linear):
            base = mod.out_channels if isinstance(mod, nn.Conv2d) else mod.out_features
            key = "out_channels" if isinstance(mod, nn.Conv2d) else "out_features"
            removed = any(name == r or name.startswith(r + ".") for r in replaced)
            now = 0 if removed else attrs.get(name, {}).get(key, base)
            rows.append({"layer": name, "type": type(mod).__name__, "base": base, "compressed": now,
                         "removed": removed})
    return rows


# ---------------------------------------------------------------------------------------------- sections


def build_sections(rec: RunRecords, rows: list[dict[str, Any]], widths: list[dict[str, Any]]) -> list[ReportSection]:
    """The run's sections (status, settings, results, dynamics, widths, recovery, stages, artifacts) around each
    stage's own, which it writes itself (`report`), in pipeline order."""
    from core.context import STAGES
    from stages import PIPELINE

    word, sentence = run_status(rec)
    name = rec.manifest.get("name", rec.root.name)
    intro = ReportSection(f"Compression report: {name}", [
        f"Model `{rec.manifest.get('model', '?')}`, run directory `{rec.root}`.",
        f"Status: **{word}** {sentence}."])
    if rec.summary_note:
        intro.text.append(rec.summary_note)
    intro.text += rec.notes
    if rec.summary is not None and (busy := contended(rec.summary["latency_ms"])):
        intro.text.append(f"**The latency figures are CONTENDED**: {busy}. Speedups below may not hold on the next "
                          f"run, and no latency gate passed on them.")
    for tname, t in ((rec.summary or {}).get("targets") or {}).items():
        intro.text.append(f"Target {tname} {t['requested']:g}: " + (
            f"met (achieved {t['achieved']:.3f})." if t["met"] else
            f"**MISSED** (achieved {t['achieved']:.3f}; "
            f"{t.get('short_because', {}).get('reason') or t.get('stop_reason', 'no stop reason recorded')})."))
    sections = [intro]
    settings = settings_rows(rec)
    if settings:
        sections.append(ReportSection("Settings", ["What this run was asked to do (from its config.json)."],
                                      [Table(["setting", "value"], settings)]))
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
            ["latency, p10-p90 (ms)", f"{lat.get('base_p10', 0):.3f}-{lat.get('base_p90', 0):.3f}",
             f"{lat.get('compressed_p10', 0):.3f}-{lat.get('compressed_p90', 0):.3f}",
             f"speedup {lat.get('speedup_low', 0):.2f}-{lat.get('speedup_high', 0):.2f}x across blocks"],
        ])
        sec = ReportSection("Base vs compressed", [
            f"Accuracy: {s.get('accuracy_source', 'validation split')}. GMACs are multiply-accumulates at the "
            f"model's input size (summary.json `gflops`). Parity with PyTorch: max |difference| "
            f"{s['parity']['max_abs_diff']:.2e} over {s['parity']['samples']} images."
            + (f" **CONTENDED**: {busy}." if (busy := contended(lat)) else "")], [t])
        sections.append(sec)
        if s.get("quantized"):
            sections.append(quantized_section(s))
        if s.get("frontier"):
            sections.append(frontier_section(s))
    if rows:
        base_top1 = rows[0]["top1"]
        t = Table(["stage", "step", "params (M)", "GMACs", "top-1 (%)", "top-5 (%)", "Δ top-1 (pts)", "kept"],
                  [[r["stage"], r["what"], "-" if r["params_m"] is None else f"{r['params_m']:.3f}", f4(r["gflops"]),
                    f2(r["top1"]), f2(r["top5"]), pts(r["top1"], base_top1), "yes" if r["accepted"] else
                    "rolled back"] for r in rows])
        sections.append(ReportSection("Dynamics", [
            "One row per pruning step and truncation decision (after its recovery), then fine-tuning and the "
            "deployed artifact; Δ top-1 is against the first row. Rolled-back rows were measured, then undone."],
            [t], [(f"{FIGURES}/dynamics.png", "GMACs, parameters and top-1 across the run")]))
    if widths:
        changed = [w for w in widths if w["compressed"] != w["base"]]
        t = Table(["layer", "type", "base width", "compressed width", "retained"],
                  [[w["layer"], w["type"], str(w["base"]), "removed" if w["removed"] else str(w["compressed"]),
                    f"{100.0 * w['compressed'] / w['base']:.0f}%"] for w in widths])
        sections.append(ReportSection("Per-layer widths", [
            f"{len(changed)} of {len(widths)} conv/linear layers changed (output channels or features; "
            f"`removed` = inside a block replaced by the identity)."], [t],
            [(f"{FIGURES}/widths.png", "retained output width per layer")]))
    elif rec.config is None and rec.structures:
        sections.append(ReportSection("Per-layer widths", [
            "Not shown: the run has no config.json (it is written when an invocation completes); pass the "
            "run's YAML with `compress report RUN_DIR --config CONFIG`."]))
    rec_rows = [[r["stage"], r["what"], str(r["recovery_rounds"]), str(r["recovery_stop"])] for r in rows
                if r["recovery_rounds"] is not None or r["recovery_stop"] is not None]
    if rec_rows:
        sections.append(ReportSection("Recovery", [
            "Rounds of recovery training after each step (fine-tuning: epochs) and what stopped them "
            "(`recovery.stopping`)."], [Table(["stage", "step", "rounds / epochs", "stopped by"], rec_rows)]))
    for name in PIPELINE:  # each stage's own section(s), from its records
        if (own := getattr(STAGES.get(name), "report", None)) is not None:
            sections += own(rec)
    st = rec.manifest["stages"]
    sections.append(ReportSection("Stages", [], [Table(["#", "stage", "status", "seconds", "finished"], [
        [str(i), n, st.get(n, {}).get("status", "not run"), f"{st[n]['seconds']:.1f}" if "seconds" in st.get(n, {})
         else "-", st.get(n, {}).get("finished", "-")] for i, n in enumerate(PIPELINE)])]))
    sections.append(ReportSection("Artifacts", [
        "Files of the run (report files excluded), with their size and sha256."],
        [Table(["file", "bytes", "sha256"], artifact_rows(rec))]))
    return sections


def frontier_section(s: dict[str, Any]) -> ReportSection:
    """Every point of a frontier run as validated, the shipped one marked, each linked to its own report."""
    f = s["frontier"]
    rows = []
    for r in f["points"]:
        if not r.get("validated"):
            rows.append([f"{r['requested']:g}", "-", "-", "-", "-", "-", "-", r.get("reason", "")])
            continue
        mark = " (shipped)" if r["label"] == f["selected"] else ""
        rows.append([f"[{r['label']}](frontier/{r['label']}/report.html){mark}",
                     f"{r['speedup']:.2f}x ({r['speedup_low']:.2f}-{r['speedup_high']:.2f})", f"{r['latency_ms']:.3f}",
                     f2(r["top1"]), f"{-r['top1_drop']:+.2f}", f4(r["gflops"]), f"{r['bytes'] / 1e6:.2f}",
                     r.get("reason", "")])
    return ReportSection("Frontier", [
        f"One pruning trajectory, stopped at each requested point; each point was truncated, fine-tuned, exported "
        f"and validated on its own (frontier/<point>/). Shipped as model.onnx and summary.json: **{f['selected']}**, "
        f"{f['why']}. Speedups are validated on the deployment runtime, with their spread across timing blocks."],
        [Table(["point", "speedup (spread)", "latency (ms)", "top-1 (%)", "Δ top-1 (pts)", "GMACs", "size (MB)",
                "note"], rows)],
        [(f"{FIGURES}/frontier.png", "top-1 against measured latency, every point and the base")])


def quantized_section(s: dict[str, Any]) -> ReportSection:
    """The three deployable artifacts side by side, and how the INT8 one was made (export.quantize: int8)."""
    b, c, q, lat = s["base"], s["compressed"], s["quantized"], s["latency_ms"]
    vb, vc = q["speedup_vs_base"], q["speedup_vs_compressed"]

    def mb(x: int | None) -> str:
        return "-" if x is None else f"{x / 1e6:.2f}"

    prec = lat.get("precision", "fp32")
    rows = [[b.get("artifact", "base"), prec, f2(b["top1"]), f2(b["top5"]), f"{lat['base']:.3f}", "1.00x",
             mb(b.get("bytes"))],
            [s["parity"].get("artifact", "model.onnx"), prec, f2(c["top1"]), f2(c["top5"]), f"{lat['compressed']:.3f}",
             f"{lat['speedup']:.2f}x ({lat['speedup_low']:.2f}-{lat['speedup_high']:.2f})", mb(c.get("bytes"))],
            [q["artifact"], q["precision"], f2(q["top1"]), f2(q["top5"]), f"{q['latency_ms']:.3f}",
             f"{vb['speedup']:.2f}x ({vb['speedup_low']:.2f}-{vb['speedup_high']:.2f})", mb(q["bytes"])]]
    cal = q["calibration"]
    text = [f"All three timed in the same interleaved blocks on {q['runtime']} and scored on the same images. The INT8 "
            f"model agrees with the FP32 compressed model's top-1 on {q['agreement']:.1f}% of the images (top-1 "
            f"{-q['top1_drop']:+.2f} pts) and runs {vc['speedup']:.2f}x ({vc['speedup_low']:.2f}-"
            f"{vc['speedup_high']:.2f}) faster than it. Quantized: {q['quantized_layers']} layers, INT8 weights per "
            f"channel and activations per tensor (symmetric, QDQ), {cal['method']} calibration on {cal['samples']} "
            f"calibration images; kept in FP32: {', '.join(q['excluded_layers']) or 'none'}."]
    tables = [Table(["artifact", "precision", "top-1 (%)", "top-5 (%)", "latency (ms)", "speedup vs base",
                     "size (MB)"], rows)]
    if q.get("sensitivity"):
        text.append("The INT8 top-1 drop exceeded `max_top1_drop_int8`: each layer was quantized alone on calibration "
                    "images and compared with the FP32 model; the worst are below. Keep them in FP32 with "
                    "`export.quantize_exclude`.")
        tables.append(Table(["layer", "top-1 agreement alone", "logit error alone"],
                            [[r["layer"], f"{100 * r['agreement']:.1f}%", f"{r['logit_error']:.3f}"]
                             for r in q["sensitivity"]]))
    return ReportSection("Deployed artifacts: FP32 and INT8", text, tables)


def settings_rows(rec: RunRecords) -> list[list[str]]:
    """The settings that decide what a run does: criterion, targets, budgets, recovery, runtime."""
    cfg = rec.config
    if cfg is None:
        return []
    fp, lt, rc, ft, v = cfg.filter_prune, cfg.layer_truncate, cfg.recovery, cfg.finetune, cfg.validate_
    lat = (rec.summary or {}).get("latency_ms", {})
    fp_stop = rec.manifest["stages"].get("filter_prune", {}).get("metrics", {}).get("stop_reason")
    rows = [["model", f"{cfg.model.source}:{cfg.model.name}, input {cfg.model.in_chans}x{cfg.model.input_size[0]}x"
                      f"{cfg.model.input_size[1]}, {cfg.model.num_classes} classes"],
            ["data", f"{cfg.data.kind}" + (f" at {cfg.data.root}" if cfg.data.root else "")]]
    if fp.enabled:
        rows += [["filter_prune", f"criterion {fp.criterion}, {fp.ranking} ranking, widths in multiples of "
                                  f"{fp.round_to}, at most {fp.steps} steps"],
                 ["target", f"{fp.target_speedup:g}x faster on the validation runtime" if fp.target_speedup
                  else f"-{fp.target_flops_reduction:.0%} MACs"],
                 ["filter_prune budget", f"top-1 at most {fp.max_accuracy_drop:g} points below its start; "
                                         f"recovery {fp.recovery_rounds} x {fp.recovery_steps} steps per step"],
                 ["filter_prune stopped", fp_stop or "-"]]
    else:
        rows.append(["filter_prune", "off"])
    rows.append(["layer_truncate", f"up to {lt.max_layers} blocks, top-1 at most {lt.max_accuracy_drop:g} points "
                                   f"below its start" if lt.enabled and lt.max_layers else "off"])
    rows.append(["recovery", f"stopping {rc.stopping}, distillation weight {rc.distill_weight:g} from the "
                             f"{rc.teacher} model, {rc.optimizer}"])
    rows.append(["finetune", f"up to {ft.max_epochs} epochs at lr {ft.lr:g}" if ft.enabled else "off"])
    rows.append(["validation runtime", f"{lat.get('backend', v.runtime)}, batch {v.batch}, {v.runs} runs in "
                                       f"{v.blocks} blocks, {lat.get('threads') or v.threads or 'all'} threads"
                                       + (f" on {lat['device']}" if lat.get("device") else "")])
    rows.append(["export", f"ONNX opset {cfg.export.opset} ({cfg.export.exporter}); TensorRT "
                           f"{cfg.export.tensorrt.mode} ({cfg.export.tensorrt.precision})"
                           + (f"; INT8 ({cfg.export.calibration} calibration on {cfg.export.calibration_samples} "
                              f"images, {len(cfg.export.quantize_exclude)} layers excluded)"
                              if cfg.export.quantize == "int8" else "")])
    return rows


def budget_lines(rec: RunRecords) -> dict[str, tuple[float, float]]:
    """Each pruning stage's starting top-1 and accuracy budget, for the dynamics figure."""
    if rec.config is None:
        return {}
    out = {}
    for stage, drop in (("filter_prune", rec.config.filter_prune.max_accuracy_drop),
                        ("layer_truncate", rec.config.layer_truncate.max_accuracy_drop)):
        start = rec.manifest["stages"].get(stage, {}).get("metrics", {}).get("top1_start")
        if start is not None:
            out[stage] = (start, drop)
    return out


def artifact_rows(rec: RunRecords) -> list[list[str]]:
    skip = {REPORT_MD, REPORT_HTML, ".lock", "log.txt", "metrics.jsonl"}
    rows = []
    for p in sorted(rec.root.rglob("*")):
        rel = p.relative_to(rec.root)
        if p.is_file() and rel.parts[0] not in (FIGURES, "tensorboard") and p.name not in skip \
                and ".tmp" not in p.name:
            rows.append([str(rel), f"{p.stat().st_size:,}", sha256(p)])
    return rows


def write_report(run_dir: Path, config: Config | None = None) -> list[Path]:
    """Write report.md, report.html and figures/*.png into `run_dir`; returns the paths written."""
    rec = read_run(run_dir, config)
    rows, widths = dynamics_rows(rec), layer_widths(rec)
    sections = build_sections(rec, rows, widths)
    drawn_from = {name: data for sec in sections for name, data in sec.data.items()}  # the stages' own figures
    figs = rec.root / FIGURES
    figs.mkdir(exist_ok=True)
    written = []
    jobs = {"dynamics.png": (lambda d, p: figure_dynamics(d, p, budget_lines(rec)), rows),
            "widths.png": (figure_widths, widths), "latency.png": (figure_latency, rec.summary),
            "frontier.png": (figure_frontier, (rec.summary or {}).get("frontier") and rec.summary),
            "latency_model.png": (figure_latency_model, drawn_from.get("latency_model.png"))}
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
