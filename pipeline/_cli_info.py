"""`compress report`, `init`, `stages` and `criteria`: verbs that read or write configs and reports."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from pipeline._cli_app import app, console
from pipeline.errors import UserInputError


@app.command("report", epilog="Example:\n\n  compress report runs/demo   # then open runs/demo/report.html")
def report_cmd(
    run_dir: Path = typer.Argument(..., metavar="RUN_DIR",
                                   help="a run directory (finished, failed, interrupted or stopped)"),
    config: Path | None = typer.Option(None, "--config", help="the run's config (default: RUN_DIR/config.json); "
                                                             "needed for per-layer widths"),
) -> None:
    """Write report.md, report.html (self-contained) and figures/*.png into the run directory."""
    from pipeline.config import load_config
    from pipeline.report import write_report
    from pipeline.rundir import RunDir

    cfg = load_config(config) if config else None
    rd = RunDir(run_dir)
    if not rd.manifest_path.is_file():
        raise UserInputError(f"{run_dir} is not a run directory (no manifest.json); pass the --run-dir of a "
                             f"`compress pipeline` run")
    rd.lock()
    try:
        paths = write_report(run_dir, cfg)
    finally:
        rd.unlock()
    console.print("wrote " + ", ".join(str(p) for p in paths), markup=False, highlight=False)
    stages = rd.read_manifest()["stages"]
    damage = {n: bad for n, e in stages.items() if e.get("status") == "done" and (bad := rd.corrupted_files(e))}
    if damage:
        raise UserInputError("the run directory is damaged (files changed or missing since the pipeline wrote "
                             "them): " + "; ".join(f"stage {n!r}: {', '.join(f)}" for n, f in damage.items()) +
                             f". The report says so and leaves their figures out; re-run `compress pipeline ... "
                             f"--from {next(iter(damage))}` to recompute them")


@app.command("init", epilog=(
    "Examples:\n\n"
    "  compress init --model timm:resnet50 --data imagefolder:/data/imagenet > r50.yaml\n\n"
    "  compress init --model python:mynet.py:build --data demo --input-size 32 32 --output mine.yaml\n\n"
    "  compress init --example demo > demo.yaml     # the offline demo config"))
def init_cmd(
    model: str = typer.Option("timm:resnet50", "--model", help="SOURCE:NAME, SOURCE = timm | torchvision | python "
                              "(python:path/to/file.py:callable)"),
    data: str = typer.Option("demo", "--data", help="KIND or KIND:ROOT, KIND = demo | digits | synthetic | "
                             "imagefolder | cifar10 | cifar100 | mnist | fashionmnist"),
    name: str | None = typer.Option(None, "--name", help="the run's name (default: the model's)"),
    num_classes: int | None = typer.Option(None, "--num-classes", help="classifier outputs"),
    input_size: tuple[int, int] | None = typer.Option(None, "--input-size", help="H W"),
    example: str | None = typer.Option(None, "--example", help="print a shipped example config instead: demo | "
                                       "resnet50"),
    output: Path | None = typer.Option(None, "--output", help="write here instead of to stdout (never overwrites)"),
) -> None:
    """Write a commented starter config with every key at its default."""
    from pipeline.errors import did_you_mean
    from pipeline.rundir import check_writable
    from pipeline.starter import examples, render

    if example is not None:
        shipped = examples()
        if example not in shipped:
            raise UserInputError(f"--example {example!r} is not a shipped config.{did_you_mean(example, shipped)} "
                                 f"Choose one of: {', '.join(shipped)}")
        text = shipped[example].read_text()
    else:
        text = render(model, data, name, num_classes, input_size)
    if output is None:
        typer.echo(text, nl=False)
        return
    if output.exists():
        raise UserInputError(f"--output {output} already exists; init never overwrites a file: choose another "
                             f"name or remove it first")
    check_writable(output, "--output")
    from pipeline.rundir import atomic_write

    atomic_write(output, text.encode())
    console.print(f"wrote {output}; check it with `compress pipeline {output} --dry-run`", markup=False,
                  highlight=False)


@app.command()
def stages() -> None:
    """List the pipeline's stages in order."""
    from pipeline.runner import PIPELINE, STAGES

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
