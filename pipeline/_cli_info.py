"""`compress report`, `init`, `stages` and `criteria`: verbs that read or write configs and reports."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from core.errors import UserInputError
from pipeline._cli_app import app, console


@app.command("report", epilog="Example:\n\n  compress report runs/demo   # then open runs/demo/report.html")
def report_cmd(
    run_dir: Path = typer.Argument(..., metavar="RUN_DIR",
                                   help="a run directory (finished, failed, interrupted or stopped)"),
    config: Path | None = typer.Option(None, "--config", help="the run's config (default: RUN_DIR/config.json); "
                                                             "needed for per-layer widths"),
) -> None:
    """Write report.md, report.html (self-contained) and figures/*.png into the run directory."""
    from core.rundir import RunDir
    from pipeline.config import load_config
    from pipeline.report import write_report

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
    input_size: tuple[int, int] | None = typer.Option(None, "--input-size", metavar="H W",
                                                      help="model input height and width"),
    example: str | None = typer.Option(None, "--example", help="print a shipped example config instead: demo | "
                                       "resnet50"),
    output: Path | None = typer.Option(None, "--output", help="write here instead of to stdout (never overwrites)"),
) -> None:
    """Write a commented starter config with every key at its default."""
    from core.errors import did_you_mean
    from core.rundir import check_writable
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
    from core.rundir import atomic_write

    atomic_write(output, text.encode())
    console.print(f"wrote {output}; check it with `compress pipeline {output} --dry-run`", markup=False,
                  highlight=False)


def print_inspection(result, out: Console) -> None:
    """The pre-flight check as tables a user reads before committing hours."""
    held_share = sum(h["macs_share"] for h in result.held)
    heads = sum(1 for g in result.groups if g["kind"] == "heads")
    joint = [g for g in result.groups if g["kind"] == "heads+channels"]
    n = sum(g["attentions"] for g in joint)
    tied = (f", {len(joint)} of residual channels with the heads of the {n} attention{'s' if n != 1 else ''} "
            "tied to them") if joint else ""
    out.print(f"{result.model}, input {result.input}: {result.gflops:.4g} GMACs, {result.params_m:.4g} M params. "
              f"{len(result.groups)} prunable groups ({heads} of attention heads{tied}); {len(result.held)} held whole "
              f"({held_share:.1%} of the MACs); {len(result.candidates)} blocks truncation could remove.",
              markup=False, highlight=False)
    if result.held:
        table = Table(title="held whole (their widths are not pruned)")
        for col in ("root layer", "kind", "MACs", "layers", "why"):
            table.add_column(col, overflow="fold")
        for h in result.held:
            table.add_row(h["root"], h["kind"], f"{h['macs_share']:.1%}", str(len(h["layers"])), h["reason"])
        out.print(table)
    table = Table(title="prunable groups (the 12 widest)")
    for col in ("root layer", "unit", "width", "coupled layers"):
        table.add_column(col)
    for g in sorted(result.groups, key=lambda g: -g["width"])[:12]:
        unit = {"heads": "head", "heads+channels": "head + its channels"}.get(g["kind"], "channel")
        table.add_row(g["root"], unit, str(g["width"]), str(g["layers"]))
    out.print(table)
    if result.candidates:
        out.print("truncation candidates: " + ", ".join(f"{c['block']} ({c['macs_share']:.1%})"
                                                        for c in result.candidates), markup=False, highlight=False)
    for why, n in result.not_candidates.items():
        out.print(f"not truncation candidates: {n} module(s) {why}", markup=False, highlight=False)
    if result.onnx:
        out.print(f"proof: a few units of every prunable group removed on a copy; it runs and its ONNX export "
                  f"agrees with PyTorch (max relative difference {result.onnx['max_rel_diff']:.1e})",
                  markup=False, highlight=False)
    out.print("seconds: " + ", ".join(f"{k} {v:.1f}" for k, v in result.seconds.items()) +
              (" (the proof's outcome came from the cache: this model's structure was proved before, by an inspect "
               "or a run)" if result.proof_cached else ""), markup=False, highlight=False)


@app.command("inspect", epilog=(
    "Examples:\n\n"
    "  compress inspect configs/resnet50.yaml\n\n"
    "  compress inspect my.yaml --output structure.json --set model.input_size=[160,160]"))
def inspect_cmd(
    config: Path = typer.Argument(..., metavar="CONFIG", help="YAML config (only model, export and the pruning "
                                  "sections are read; no data is loaded)"),
    output: Path | None = typer.Option(None, "--output", help="also write the findings as JSON"),
    no_onnx: bool = typer.Option(False, "--no-onnx", help="skip the ONNX export of the pruned copy"),
    set_: list[str] = typer.Option([], "--set", metavar="KEY=VALUE", help="override a config key (repeatable)"),
) -> None:
    """The pre-flight structural check: prunable groups, what is held whole and why, truncation candidates, and
    a proof on a copy that pruning leaves a model that runs and exports. Seconds, no data, no training."""
    import dataclasses

    from core.rundir import atomic_json, check_writable
    from pipeline.config import load_config
    from pipeline.inspect import inspect_model

    cfg = load_config(config, set_)
    if output is not None:
        check_writable(output, "--output")
    result = inspect_model(cfg, onnx=not no_onnx)
    print_inspection(result, Console())
    if output is not None:
        atomic_json(output, dataclasses.asdict(result))
        console.print(f"wrote {output}", markup=False, highlight=False)


@app.command()
def stages() -> None:
    """List the pipeline's stages in order."""
    import stages  # noqa: F401 - registers every stage in STAGES
    from core.context import STAGES
    from core.registry import PIPELINE

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
