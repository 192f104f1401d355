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
    problems += _runtime_problems(config)
    if config.logging.tensorboard:
        import importlib.util

        if importlib.util.find_spec("tensorboard") is None:
            problems.append("logging.tensorboard is true but the tensorboard package is not installed; "
                            "pip install -e '.[tensorboard]', or set logging.tensorboard: false")
    if problems:
        raise UserInputError("the config cannot run:\n  - " + "\n  - ".join(problems))


def _runtime_problems(config) -> list[str]:
    """TensorRT or the CUDA provider asked for explicitly but missing here: known before any stage runs."""
    from export.tensorrt import AUTO_HINT, INSTALL_HINT, unavailable_reason

    problems = []
    trt_needed = config.export.tensorrt.mode == "required" or config.validate_.runtime == "tensorrt"
    reason = unavailable_reason() if trt_needed else None
    if reason:
        key = "export.tensorrt.mode is 'required'" if config.export.tensorrt.mode == "required" \
            else "validate.runtime is 'tensorrt'"
        problems.append(f"{key} but {reason}; {INSTALL_HINT}; {AUTO_HINT}")
    if config.validate_.runtime == "onnxruntime-cuda":
        import onnxruntime as ort

        if "CUDAExecutionProvider" not in ort.get_available_providers():
            problems.append("validate.runtime is 'onnxruntime-cuda' but this ONNX Runtime has no "
                            "CUDAExecutionProvider; install the gpu extra (onnxruntime-gpu) or use onnxruntime-cpu")
    return problems


def _auto_report(rd, cfg) -> None:
    """The report at the end of `compress pipeline` (rank 0); a failure to write it never changes the exit code."""
    from pipeline import distributed as D

    if not cfg.logging.report or not D.is_main() or not rd.manifest_path.is_file():
        return
    try:
        from pipeline.report import write_report

        paths = write_report(rd.root, cfg)
        console.print(f"report: {paths[0]} and {paths[1].name}")
    except Exception as exc:  # noqa: BLE001 - the run's own result matters more than its report
        console.print(f"warning: the report could not be written ({type(exc).__name__}: {exc}); run "
                      f"`compress report {rd.root}` to retry", style="yellow", markup=False)


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
    par = summary["parity"]
    table.add_row(f"parity vs PyTorch ({par.get('artifact', 'model.onnx')})", "", f"{par['max_abs_diff']:.1e}", "")
    table.add_row("latency precision", "", lat.get("precision", "fp32"), "")
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
    try:
        summary = run_pipeline(cfg, rd, console, start, until, fresh)
    except UserInputError:
        raise  # bad input alters nothing on disk, the report included
    except BaseException:
        _auto_report(rd, cfg)  # what finished and where it stopped
        raise
    _auto_report(rd, cfg)
    if summary is None:
        console.print(f"[green]stopped after --until {until}[/]; checkpoints in {rd.root}")
        return
    console.print(_summary_table(summary))
    engine = summary["artifacts"].get("tensorrt")
    console.print(f"artifacts: {rd.root / 'model.onnx'}" + (f", {rd.root / engine}" if engine else "") +
                  f", {rd.root / 'summary.json'}")
    if summary["artifacts"].get("tensorrt_status") == "skipped":
        console.print(f"TensorRT engine skipped: {summary['artifacts']['tensorrt_reason']}")
    if not summary["gates"]["passed"]:
        raise GateFailure("validation gates failed:\n  - " + "\n  - ".join(summary["gates"]["failures"]) +
                          f"\nArtifacts are kept in {rd.root} for inspection.")


def _input_shape_matches(rt, config, path: Path) -> None:
    spec = config.model
    want = (spec.in_chans, *spec.input_size)
    got = tuple(rt.input_shape)
    if all(isinstance(d, int) and d > 0 for d in got) and got != want:
        raise UserInputError(f"{path.name} takes inputs of shape {'x'.join(map(str, got))} but the config's model "
                             f"gives {'x'.join(map(str, want))}; pass the config the artifact was built with, or set "
                             f"model.in_chans and model.input_size to match")


def _artifact_runtime(path: Path, wanted: str, config) -> str:
    from export.runtime import resolve_runtime
    from pipeline.runner import resolve_device

    if wanted != "auto":
        return wanted
    if path.suffix.lower() in (".engine", ".plan"):
        return "tensorrt"
    return resolve_runtime("auto", False, resolve_device(config).type)


@app.command("validate")
def validate_cmd(
    artifact: Path = typer.Argument(..., help="an exported .onnx or TensorRT .engine"),
    config: Path = typer.Option(..., "--config", help="YAML config giving the model input and the dataset"),
    base: Path | None = typer.Option(None, "--base", help="the uncompressed artifact: enables speedup and top-1 "
                                                          "drop gates"),
    runtime: str | None = typer.Option(None, "--runtime", help="onnxruntime-cpu | onnxruntime-cuda | tensorrt "
                                                                "(default: validate.runtime, auto by file type)"),
    output: Path | None = typer.Option(None, "--output", help="write the results as JSON here"),
    set_: list[str] = typer.Option([], "--set", help="override a config key (repeatable)"),
) -> None:
    """Score and time an existing artifact on the config's validation split; gates as in the pipeline (exit 3)."""
    from torch.utils.data import DataLoader

    from export.runtime import RUNTIMES, open_artifact
    from export.validation import accuracy, check_gates, latency
    from pipeline.config import load_config
    from pipeline.data import build_splits
    from pipeline.errors import did_you_mean
    from pipeline.rundir import atomic_json

    cfg = load_config(config, set_)
    vcfg = cfg.validate_
    wanted = runtime or vcfg.runtime
    if wanted not in (*RUNTIMES, "auto"):
        raise UserInputError(f"--runtime {wanted!r} is not a runtime.{did_you_mean(wanted, list(RUNTIMES))} "
                             f"Choose one of: {', '.join(RUNTIMES)}")
    models = {}
    for role, path in (("compressed", artifact), ("base", base)):
        if path is not None:
            rt = open_artifact(path, _artifact_runtime(path, wanted, cfg), vcfg.threads)
            _input_shape_matches(rt, cfg, path)
            models[role] = rt
    if cfg.runtime.threads:
        import torch

        torch.set_num_threads(cfg.runtime.threads)
    loader = DataLoader(build_splits(cfg).validation, batch_size=cfg.data.eval_batch_size,
                        num_workers=cfg.data.num_workers)
    scores = {role: accuracy(rt, loader) for role, rt in models.items()}
    spec = cfg.model
    lat = latency(models, (vcfg.batch, spec.in_chans, *spec.input_size), vcfg.warmup, vcfg.runs)
    comp_rt = models["compressed"]
    result = {
        "artifact": str(artifact), "base_artifact": str(base) if base else None, "config": str(config),
        "compressed": scores["compressed"], "base": scores.get("base"),
        "latency_ms": {"backend": comp_rt.backend, "batch": vcfg.batch, "precision": comp_rt.precision,
                       "compressed": lat["compressed"]["median_ms"], "compressed_p90": lat["compressed"]["p90_ms"],
                       "base": lat["base"]["median_ms"] if base else None,
                       "base_p90": lat["base"]["p90_ms"] if base else None,
                       "speedup": lat["base"]["median_ms"] / lat["compressed"]["median_ms"] if base else None,
                       "runs": vcfg.runs, "warmup": vcfg.warmup},
        "parity": None,
    }
    fails, unchecked = check_gates(result, vcfg.gates)
    result["gates"] = {"passed": not fails, "failures": fails, "unchecked": unchecked}
    table = Table(title=f"{artifact.name} on {comp_rt.backend} ({scores['compressed']['samples']} images)")
    for col in ("", "base", "artifact", "change"):
        table.add_column(col, justify="right")
    b = scores.get("base")
    for key in ("top1", "top5"):
        c = scores["compressed"][key]
        table.add_row(f"{key} %", f"{b[key]:.2f}" if b else "-", f"{c:.2f}", f"{c - b[key]:+.2f} pts" if b else "")
    lm = result["latency_ms"]
    table.add_row(f"latency ms (b{vcfg.batch}, {lm['precision']})", f"{lm['base']:.3f}" if base else "-",
                  f"{lm['compressed']:.3f}", f"{lm['speedup']:.2f}x" if base else "")
    Console().print(table)
    for note in unchecked:
        console.print(f"gate not checked: {note}")
    if output is not None:
        atomic_json(output, result)
        console.print(f"results: {output}")
    if fails:
        raise GateFailure("validation gates failed:\n  - " + "\n  - ".join(fails))


@app.command("export")
def export_cmd(
    run_dir: Path = typer.Argument(..., help="a run directory whose model stages have finished"),
    fmt: str = typer.Option("onnx", "--format", help="onnx | tensorrt"),
    output: Path | None = typer.Option(None, "--output", help="file to write (default: RUN_DIR/exports/...)"),
    config: Path | None = typer.Option(None, "--config", help="config to use (default: RUN_DIR/config.json)"),
    set_: list[str] = typer.Option([], "--set", help="override a config key, e.g. export.opset=18 or "
                                                     "export.tensorrt.precision=fp16 (repeatable)"),
) -> None:
    """Re-export the compressed model of a finished run, without touching the run's own stages and artifacts."""
    from pipeline.config import load_config
    from pipeline.errors import did_you_mean
    from pipeline.rundir import RunDir
    from pipeline.runner import load_model_upto
    from stages.export import engine_spec, export_onnx

    formats = ("onnx", "tensorrt")
    if fmt not in formats:
        raise UserInputError(f"--format {fmt!r} is not supported.{did_you_mean(fmt, list(formats))} "
                             f"Choose one of: {', '.join(formats)}")
    rd = RunDir(run_dir)
    if not rd.manifest_path.is_file():
        raise UserInputError(f"{run_dir} is not a run directory (no manifest.json); pass the --run-dir of a "
                             f"`compress pipeline` run")
    source = config or run_dir / "config.json"
    if not source.is_file():
        raise UserInputError(f"{source} does not exist; pass the run's YAML with --config")
    cfg = load_config(source, set_)
    if fmt == "tensorrt":
        from export.tensorrt import require

        require("or export ONNX only (--format onnx) and build the engine where TensorRT runs")
    manifest = rd.read_manifest()
    from stages import PIPELINE

    last = next((n for n in reversed(PIPELINE) if manifest["stages"].get(n, {}).get("has_model")
                 and manifest["stages"][n].get("status") == "done"), None)
    if last is None:
        raise UserInputError(f"no finished stage in {run_dir} has saved a model; run the pipeline first")
    bad = rd.corrupted_files(manifest["stages"][last])
    if bad:
        raise UserInputError(f"checkpoint files of stage {last!r} are missing or damaged: {', '.join(bad)}; "
                             f"re-run `compress pipeline ... --from {last}`")
    rd.lock()
    try:
        model = load_model_upto(cfg, rd, manifest, last).eval()
        default_dir = run_dir / "exports"
        if fmt == "onnx":
            path = output or default_dir / "model.onnx"
            path.parent.mkdir(parents=True, exist_ok=True)
            export_onnx(model, cfg, path, "compressed")
            written = [path]
        else:
            from export.tensorrt import build_engine, sidecar_of

            precision = cfg.export.tensorrt.precision
            path = output or default_dir / f"model.{precision}.engine"
            path.parent.mkdir(parents=True, exist_ok=True)
            onnx_path = path.with_suffix(".onnx")
            export_onnx(model, cfg, onnx_path, "compressed")
            build_engine(onnx_path, path, engine_spec(cfg))
            written = [onnx_path, path, sidecar_of(path)]
    finally:
        rd.unlock()
    console.print(f"exported the model of stage {last!r}: " + ", ".join(str(p) for p in written))


@app.command("report")
def report_cmd(
    run_dir: Path = typer.Argument(..., help="a run directory (finished, failed, interrupted or stopped)"),
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
    console.print("wrote " + ", ".join(str(p) for p in paths))


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
