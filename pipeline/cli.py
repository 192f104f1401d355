"""The `compress` command line. Exit codes: 0 ok, 1 a bug, 2 bad input, 3 gate failed, 130/143/129 a signal."""

from __future__ import annotations

import contextlib
import errno
import sys
from pathlib import Path
from typing import Any

import typer
from rich.markup import escape
from rich.table import Table

from core.errors import GateFailure, UserInputError
from core.registry import PIPELINE
from pipeline import _cli_artifacts, _cli_info  # noqa: F401 - register the other verbs
from pipeline._cli_app import app, console, one_of, version_text
from pipeline.signals import Interrupted, handling


def _version(value: bool) -> None:
    if value:
        typer.echo(version_text())
        raise typer.Exit(0)


@app.callback()
def root(version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                      help="print the version and exit")) -> None:
    """IDAP++ compression for PyTorch vision models."""


def _auto_report(rd, cfg) -> None:
    """The report at the end of `compress pipeline` (rank 0); a failure to write it never changes the exit code."""
    from core import distributed as D

    if not cfg.logging.report or not D.is_main() or not rd.manifest_path.is_file():
        return
    try:
        from pipeline.report import write_report

        paths = write_report(rd.root, cfg)
        console.print(f"report: {paths[0]} and {paths[1].name}", markup=False, highlight=False)
    except Exception as exc:  # noqa: BLE001 - the run's own result matters more than its report
        console.print(f"warning: the report could not be written ({type(exc).__name__}: {exc}); run "
                      f"`compress report {rd.root}` to retry", style="yellow", markup=False)


def summary_table(summary: dict[str, Any]) -> Table:
    """The console table of a finished run: base vs compressed, latency with its spread, targets."""
    table = Table(title=f"{summary['name']} ({summary['model']})")
    for col in ("", "base", "compressed", "change"):
        table.add_column(col, justify="right")
    b, c, d = summary["base"], summary["compressed"], summary["delta_pct"]
    table.add_row("top-1 %", f"{b['top1']:.2f}", f"{c['top1']:.2f}", f"{d['top1']:+.2f} pts")
    table.add_row("top-5 %", f"{b['top5']:.2f}", f"{c['top5']:.2f}", "")
    table.add_row("GMACs", f"{b['gflops']:.4f}", f"{c['gflops']:.4f}", f"{d['gflops']:+.1f}%")
    table.add_row("params (M)", f"{b['params_m']:.3f}", f"{c['params_m']:.3f}", f"{d['params_m']:+.1f}%")
    lat = summary["latency_ms"]
    spread = f" ({lat['speedup_low']:.2f}-{lat['speedup_high']:.2f})" if "speedup_low" in lat else ""
    busy = lat.get("contended")
    table.add_row(f"latency ms ({lat['backend']}, b{lat['batch']})", f"{lat['base']:.3f}",
                  f"{lat['compressed']:.3f}", f"{lat['speedup']:.2f}x{spread}" + (" CONTENDED" if busy else ""),
                  style="yellow" if busy else None)
    par = summary["parity"]
    table.add_row(f"parity vs PyTorch ({par.get('artifact', 'model.onnx')})", "", f"{par['max_abs_diff']:.1e}", "")
    table.add_row("latency precision", "", lat.get("precision", "fp32"), "")
    q = summary.get("quantized")
    if q:
        v = q["speedup_vs_base"]
        table.add_row(f"INT8 top-1 % ({q['artifact']})", "", f"{q['top1']:.2f}",
                      f"{-q['top1_drop']:+.2f} pts vs FP32, {q['agreement']:.1f}% agree")
        table.add_row(f"INT8 latency ms ({q['runtime']})", "", f"{q['latency_ms']:.3f}",
                      f"{v['speedup']:.2f}x ({v['speedup_low']:.2f}-{v['speedup_high']:.2f})")
    for name, t in (summary.get("targets") or {}).items():
        mark = "met" if t["met"] else "[bold yellow]MISSED[/]"
        table.add_row(f"target {name}", f"{t['requested']:g}", f"{t['achieved']:.3f}", mark)
    return table


def frontier_table(summary: dict[str, Any]) -> Table:
    """The console table of a frontier run: every point as validated, the shipped one marked."""
    f = summary["frontier"]
    table = Table(title=f"frontier: shipped {f['selected']} ({f['why']})")
    for col in ("point", "speedup (spread)", "latency ms", "top-1 %", "GMACs", "MB", "note"):
        table.add_column(col, justify="right")
    for r in f["points"]:
        if not r.get("validated"):
            table.add_row(f"{r['requested']:g}", "-", "-", "-", "-", "-", r.get("reason", ""))
            continue
        table.add_row(r["label"] + (" *" if r["label"] == f["selected"] else ""),
                      f"{r['speedup']:.2f}x ({r['speedup_low']:.2f}-{r['speedup_high']:.2f})", f"{r['latency_ms']:.3f}",
                      f"{r['top1']:.2f}", f"{r['gflops']:.4f}", f"{r['bytes'] / 1e6:.2f}", r.get("reason", ""))
    return table


def _warn_missed_targets(summary: dict[str, Any]) -> None:
    busy = summary["latency_ms"].get("contended")
    if busy:
        console.print(f"WARNING: the latency figures above are CONTENDED: {busy}. No latency gate passed on them.",
                      style="bold yellow", markup=False, highlight=False)
    for name, t in (summary.get("targets") or {}).items():
        if not t["met"]:
            console.print(f"WARNING: target {name} {t['requested']:g} was not met (achieved {t['achieved']:.3f}): "
                          f"{t.get('short_because', {}).get('reason') or t.get('stop_reason', 'see the report')}",
                          style="bold yellow", markup=False,
                          highlight=False)


STAGE_LIST = ", ".join(PIPELINE)


@app.command("pipeline", epilog=(
    "Examples:\n\n"
    "  compress pipeline configs/demo.yaml\n\n"
    "  compress pipeline my.yaml --run-dir runs/r50 --set finetune.max_epochs=2 --set data.root=/data/imagenet\n\n"
    "  compress pipeline my.yaml --dry-run        # check the config and show what would run\n\n"
    "  compress pipeline my.yaml --from finetune  # redo fine-tuning and everything after it"))
def pipeline_cmd(
    config: Path = typer.Argument(..., metavar="CONFIG",
                                  help="YAML config (`compress init` writes one; examples in configs/)"),
    run_dir: Path | None = typer.Option(None, "--run-dir", help="run directory (default: runs/<name>); a folder "
                                        "that is not a run directory is never written into"),
    set_: list[str] = typer.Option([], "--set", metavar="KEY=VALUE", help="override a config key, YAML value: --set "
                                   "finetune.max_epochs=2 (repeatable)"),
    start: str | None = typer.Option(None, "--from", help=f"re-run from this stage on: {one_of(PIPELINE)}"),
    until: str | None = typer.Option(None, "--until", help=f"stop after this stage: {one_of(PIPELINE)}"),
    fresh: bool = typer.Option(False, "--fresh", help="ignore earlier checkpoints of this run directory"),
    dry_run: bool = typer.Option(False, "--dry-run", help="validate the config and print the plan only"),
) -> None:
    """Run load -> \\[train] -> calibrate -> filter_prune -> layer_truncate -> finetune -> export -> validate.

    Re-running the same command resumes: finished stages whose config and inputs are unchanged are reused.
    """
    from core.rundir import RunDir
    from pipeline.config import load_config
    from pipeline.frontier import run_frontier
    from pipeline.plan import make_plan, print_plan
    from pipeline.preflight import preflight
    from pipeline.runner import run_pipeline

    cfg = load_config(config, set_)
    rd = RunDir(run_dir if run_dir is not None else cfg.resolved_run_dir())
    warnings = preflight(cfg, rd, fresh)  # every problem at once, before any work (exit 2)
    for w in warnings:
        console.print(f"WARNING: {w}", style="bold yellow", markup=False, highlight=False)
    if dry_run:
        manifest = {"stages": {}} if fresh else rd.read_manifest()
        print_plan(console, make_plan(cfg, rd, manifest, PIPELINE, start, until), rd)
        if cfg.filter_prune.enabled or cfg.layer_truncate.enabled:
            from pipeline._cli_info import print_inspection
            from pipeline.inspect import inspect_model

            print_inspection(inspect_model(cfg), console)
        console.print("[green]config is valid; the plan above would run.[/]")
        return
    try:
        summary = (run_frontier if cfg.filter_prune.frontier else run_pipeline)(cfg, rd, console, start, until, fresh)
    except UserInputError:
        raise  # bad input alters nothing on disk, the report included
    except Interrupted:
        _auto_report(rd, cfg)  # says where it stopped; a second signal during it still stops at once
        raise
    except BaseException:
        _auto_report(rd, cfg)  # what finished and where it stopped
        raise
    _auto_report(rd, cfg)
    if summary is None:
        console.print(f"[green]stopped after --until {escape(str(until))}[/]; checkpoints in {escape(str(rd.root))}")
        return
    console.print(summary_table(summary))
    if summary.get("frontier"):
        console.print(frontier_table(summary))
    _warn_missed_targets(summary)
    engine = summary["artifacts"].get("tensorrt")
    console.print(f"artifacts: {rd.root / 'model.onnx'}" + (f", {rd.root / engine}" if engine else "") +
                  f", {rd.root / 'summary.json'}", markup=False, highlight=False)
    if summary["artifacts"].get("tensorrt_status") == "skipped":
        console.print(f"TensorRT engine skipped: {summary['artifacts']['tensorrt_reason']}", markup=False)
    if not summary["gates"]["passed"]:
        raise GateFailure("validation gates failed:\n  - " + "\n  - ".join(summary["gates"]["failures"]) +
                          f"\nArtifacts are kept in {rd.root} for inspection.")


def _click_error_types() -> tuple[type, ...]:
    """The usage-error base classes of the click that typer uses (typer >= 0.29 vendors its own copy)."""
    found: list[type] = []
    for module in ("typer._click.exceptions", "click.exceptions"):
        try:
            found.append(__import__(module, fromlist=["ClickException"]).ClickException)
        except (ImportError, AttributeError):
            continue
    return tuple(found)


def _is_click_abort(exc: BaseException) -> bool:
    return type(exc).__name__ == "Abort" and "click" in type(exc).__module__


ENVIRONMENT_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM}


def _bug(exc: BaseException) -> int:
    console.print_exception(max_frames=8)
    console.print(f"unexpected error (a bug; please report it with the traceback above): {type(exc).__name__}: "
                  f"{exc}", style="bold red", markup=False)
    return 1


def run(argv: list[str] | None = None) -> int:
    """Run the CLI and return the documented exit code (never raises, never exits)."""
    try:
        with handling():
            returned = app(args=argv, standalone_mode=False, prog_name="compress")
    except (UserInputError, GateFailure) as exc:
        console.print(f"error: {exc}", style="bold red", highlight=False, markup=False, soft_wrap=True)
        return exc.exit_code
    except Interrupted as exc:
        with contextlib.suppress(OSError):  # after SIGHUP the terminal may be gone
            console.print(f"stopped by {exc.name}: the current stage is marked interrupted and every finished "
                          f"checkpoint is intact; run the same command again to resume.", style="bold yellow",
                          markup=False, soft_wrap=True)
        return exc.exit_code
    except KeyboardInterrupt:  # a SIGINT outside our handler's reach (e.g. while it was being installed)
        console.print("stopped by SIGINT", style="bold yellow", markup=False)
        return 130
    except OSError as exc:
        if exc.errno not in ENVIRONMENT_ERRNOS:
            return _bug(exc)
        # the machine, not the code: a full or read-only disk, a missing permission
        console.print(f"error: {exc.strerror or exc}: {exc.filename or ''}; nothing finished was lost. Free space or "
                      f"choose a writable location, then run the same command again to resume", style="bold red",
                      markup=False, highlight=False, soft_wrap=True)
        return 2
    except Exception as exc:
        if isinstance(exc, _click_error_types()):  # usage errors: missing argument, unknown option or command
            exc.show()
            return 2
        if _is_click_abort(exc):
            return 130
        return _bug(exc)
    # typer returns the exit code of --help, --version and a typer.Exit; a command returns None
    return returned if isinstance(returned, int) else 0


def main(argv: list[str] | None = None) -> None:
    """Entry point with the documented exit codes."""
    sys.exit(run(argv))


if __name__ == "__main__":
    main()
