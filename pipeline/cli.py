"""The `compress` command line: pipeline, stages, criteria. Exit codes: 0 ok, 1 unexpected, 2 bad input, 3 gate."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.table import Table

from pipeline.errors import GateFailure, UserInputError

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="IDAP++ compression for PyTorch vision models.")
console = Console(stderr=True)


def _preflight(config) -> None:
    """Checks that need no work: model name, dataset root, weights file, criterion."""
    from pipeline.models import check_model_name
    from stages._criteria import CRITERIA

    problems = []
    for check in (lambda: check_model_name(config.model), lambda: CRITERIA.get(config.filter_prune.criterion)):
        try:
            check()
        except UserInputError as exc:
            problems.append(str(exc))
    if config.model.weights is not None and not Path(config.model.weights).is_file():
        problems.append(f"model.weights {str(config.model.weights)!r} does not exist; set it to a local weights "
                        f"file (a state dict saved with torch.save)")
    root = config.data.root
    if root is not None and config.data.kind not in ("demo", "synthetic") and not Path(root).is_dir() \
            and not config.data.download:
        problems.append(f"data.root {str(root)!r} does not exist (data.kind={config.data.kind}); point it at the "
                        f"dataset folder, or set data.download: true for torchvision datasets")
    if problems:
        raise UserInputError("the config cannot run:\n  - " + "\n  - ".join(problems))


def _summary_table(summary: dict[str, Any]) -> Table:
    table = Table(title=f"{summary['name']} ({summary['model']})")
    for col in ("", "base", "compressed", "change"):
        table.add_column(col, justify="right")
    b, c, d = summary["base"], summary["compressed"], summary["delta_pct"]
    table.add_row("top-1 %", f"{b['top1']:.2f}", f"{c['top1']:.2f}", f"{d['top1']:+.2f} pts")
    table.add_row("top-5 %", f"{b['top5']:.2f}", f"{c['top5']:.2f}", "")
    table.add_row("GMACs", f"{b['gflops']:.4f}", f"{c['gflops']:.4f}", f"{d['gflops']:+.1f}%")
    table.add_row("params (M)", f"{b['params_m']:.3f}", f"{c['params_m']:.3f}", f"{d['params_m']:+.1f}%")
    lat = summary["latency_ms"]
    table.add_row(f"latency ms ({lat['backend']}, b{lat['batch']})", f"{lat['base']:.3f}",
                  f"{lat['compressed']:.3f}", f"{lat['speedup']:.2f}x")
    table.add_row("ONNX parity", "", f"{summary['parity']['max_abs_diff']:.1e}", "")
    return table


@app.command("pipeline")
def pipeline_cmd(
    config: Path = typer.Argument(..., help="YAML config (see configs/)"),
    run_dir: Path | None = typer.Option(None, "--run-dir", help="run directory (default: runs/<name>)"),
    set_: list[str] = typer.Option([], "--set", help="override a key: --set finetune.epochs=2 (repeatable)"),
    start: str | None = typer.Option(None, "--from", help="re-run from this stage on"),
    until: str | None = typer.Option(None, "--until", help="stop after this stage"),
    fresh: bool = typer.Option(False, "--fresh", help="ignore earlier checkpoints of this run directory"),
    dry_run: bool = typer.Option(False, "--dry-run", help="validate the config and print the plan only"),
) -> None:
    """Run load -> [train] -> calibrate -> filter_prune -> finetune -> export -> validate, resuming."""
    from pipeline.config import load_config
    from pipeline.plan import make_plan, print_plan
    from pipeline.rundir import RunDir
    from pipeline.runner import run_pipeline
    from stages import PIPELINE

    cfg = load_config(config, set_)
    rd = RunDir(run_dir or cfg.resolved_run_dir())
    if dry_run:
        manifest = {"stages": {}} if fresh else rd.read_manifest()
        print_plan(console, make_plan(cfg, rd, manifest, PIPELINE, start, until), rd)
        _preflight(cfg)
        console.print("[green]config is valid; the plan above would run.[/]")
        return
    _preflight(cfg)
    summary = run_pipeline(cfg, rd, console, start, until, fresh)
    if summary is None:
        console.print(f"[green]stopped after --until {until}[/]; checkpoints in {rd.root}")
        return
    console.print(_summary_table(summary))
    console.print(f"artifacts: {rd.root / 'model.onnx'}, {rd.root / 'summary.json'}")
    if not summary["gates"]["passed"]:
        raise GateFailure("validation gates failed:\n  - " + "\n  - ".join(summary["gates"]["failures"]) +
                          f"\nArtifacts are kept in {rd.root} for inspection.")


@app.command()
def stages() -> None:
    """List the pipeline's stages in order."""
    from pipeline.runner import STAGES
    from stages import PIPELINE

    table = Table(title="stages")
    table.add_column("#")
    table.add_column("stage (= config key)")
    table.add_column("what it does")
    for i, name in enumerate(PIPELINE):
        table.add_row(str(i), name, STAGES.get(name).description)
    Console().print(table)


@app.command()
def criteria() -> None:
    """List the importance criteria filter_prune.criterion accepts."""
    from stages._criteria import CRITERIA

    table = Table(title="criteria")
    table.add_column("name")
    table.add_column("what it scores")
    for name in CRITERIA:
        table.add_row(name, (CRITERIA.get(name).__doc__ or "").strip().splitlines()[0])
    Console().print(table)


def main(argv: list[str] | None = None) -> None:
    """Entry point with the documented exit codes."""
    try:
        app(args=argv, standalone_mode=False)
    except (UserInputError, GateFailure) as exc:
        console.print(f"error: {exc}", style="bold red", highlight=False, markup=False, soft_wrap=True)
        sys.exit(exc.exit_code)
    except typer.Exit as exc:
        sys.exit(exc.exit_code)
    except Exception as exc:  # click usage errors are bad input too
        import click

        if isinstance(exc, click.exceptions.ClickException):
            exc.show()
            sys.exit(2)
        if isinstance(exc, click.exceptions.Abort):
            sys.exit(130)
        console.print_exception(max_frames=8)
        console.print(f"unexpected error: {type(exc).__name__}: {exc}", style="bold red", markup=False)
        sys.exit(1)
    sys.exit(0)


if __name__ == "__main__":
    main()
