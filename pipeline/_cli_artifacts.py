"""`compress validate` and `compress export`: score, time and rebuild artifacts outside a pipeline run."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from core.errors import GateFailure, UserInputError
from pipeline._cli_app import app, console, one_of

RUNTIME_CHOICES = ("auto", "onnxruntime-cpu", "onnxruntime-cuda", "tensorrt")
FORMATS = ("onnx", "tensorrt")


def _input_shape_matches(rt, config, path: Path) -> None:
    spec = config.model
    want = (spec.in_chans, *spec.input_size)
    got = tuple(rt.input_shape)
    if all(isinstance(d, int) and d > 0 for d in got) and got != want:
        raise UserInputError(f"{path.name} takes inputs of shape {'x'.join(map(str, got))} but the config's model "
                             f"gives {'x'.join(map(str, want))}; pass the config the artifact was built with, or set "
                             f"model.in_chans and model.input_size to match")


def _artifact_runtime(path: Path, wanted: str, config) -> str:
    """The runtime that opens `path`: as asked, else by file type and the config's deployment target (the
    runtime `compress pipeline` validates on; a file where that target is an engine or PyTorch runs on the
    same device through ONNX Runtime)."""
    from export.target import resolve

    if wanted != "auto":
        return wanted
    if path.suffix.lower() in (".engine", ".plan"):
        return "tensorrt"
    target = resolve(config)
    if target.runtime == "tensorrt":
        target = target.without_engine(int8=False)
    return "onnxruntime-cpu" if target.runtime == "torch-cuda" else target.runtime


@app.command("validate", epilog=(
    "Examples:\n\n"
    "  compress validate runs/demo/model.onnx --config configs/demo.yaml --base runs/demo/07_validate/base.onnx\n\n"
    "  compress validate model.engine --config deploy.yaml --runtime tensorrt --output v.json "
    "--set validate.gates.max_latency_ms=5"))
def validate_cmd(
    artifact: Path = typer.Argument(..., metavar="ARTIFACT", help="an exported .onnx or TensorRT .engine"),
    config: Path = typer.Option(..., "--config", help="YAML config giving the model input and the dataset"),
    base: Path | None = typer.Option(None, "--base", help="the uncompressed artifact: enables speedup and top-1 "
                                                          "drop gates"),
    runtime: str | None = typer.Option(None, "--runtime", help=f"{one_of(RUNTIME_CHOICES)} (default: "
                                       f"validate.runtime; auto picks by file type)"),
    output: Path | None = typer.Option(None, "--output", help="write the results as JSON here"),
    set_: list[str] = typer.Option([], "--set", metavar="KEY=VALUE", help="override a config key (repeatable)"),
) -> None:
    """Score and time an existing artifact on the config's validation split; gates as in the pipeline (exit 3)."""
    from torch.utils.data import DataLoader

    from core.data import build_splits
    from core.errors import did_you_mean
    from core.rundir import atomic_json, check_writable
    from export.runtime import RUNTIMES, open_artifact
    from export.validation import accuracy, check_gates, clean_latency, latency_record
    from pipeline.config import load_config

    cfg = load_config(config, set_)
    vcfg = cfg.validate_
    wanted = runtime or vcfg.runtime
    if wanted not in RUNTIME_CHOICES:
        raise UserInputError(f"--runtime {wanted!r} is not a runtime.{did_you_mean(wanted, list(RUNTIMES))} "
                             f"Choose one of: {', '.join(RUNTIMES)} (or auto)")
    if output is not None:
        check_writable(output, "--output")
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
    comp_rt = models["compressed"]
    lat, load = clean_latency(models, (vcfg.batch, spec.in_chans, *spec.input_size), vcfg.warmup, vcfg.runs,
                              getattr(comp_rt, "threads", None), blocks=vcfg.blocks, block_seconds=vcfg.block_seconds,
                              warn=lambda m: console.print(f"WARNING: {m}", markup=False, highlight=False))
    result = {
        "artifact": str(artifact), "base_artifact": str(base) if base else None, "config": str(config),
        "compressed": scores["compressed"], "base": scores.get("base"),
        "latency_ms": latency_record(lat, comp_rt, vcfg.batch, vcfg.warmup, load),
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
    change = f"{lm['speedup']:.2f}x ({lm['speedup_low']:.2f}-{lm['speedup_high']:.2f})" if base else ""
    table.add_row(f"latency ms (b{vcfg.batch}, {lm['precision']}, {lm['threads']} threads)",
                  f"{lm['base']:.3f}" if base else "-", f"{lm['compressed']:.3f}", change)
    Console().print(table)
    for note in unchecked:
        console.print(f"gate not checked: {note}", markup=False)
    if load["contended"]:
        console.print(f"WARNING: CONTENDED: {load['contended']}; these latency figures may not hold on the next run",
                      markup=False, highlight=False)
    if output is not None:
        atomic_json(output, result)
        console.print(f"results: {output}", markup=False, highlight=False)
    if fails:
        raise GateFailure("validation gates failed:\n  - " + "\n  - ".join(fails))


def _int8_source(rd, manifest) -> Path:
    """The run's model.int8.onnx (QDQ) as its export stage recorded it, or the command that writes it."""
    from stages.export import INT8

    path = rd.root / INT8
    entry = manifest["stages"].get("export", {})
    if not path.is_file() or entry.get("status") != "done" or rd.corrupted_files(entry):
        raise UserInputError(f"export.tensorrt.precision int8 builds the engine from the run's {INT8} (the QDQ model "
                             f"that export.quantize: int8 writes), and {rd.root} has no intact one; run `compress "
                             f"pipeline CONFIG --set export.quantize=int8 --from export` first")
    return path


@app.command("export", epilog=(
    "Examples:\n\n"
    "  compress export runs/demo                      # RUN_DIR/exports/model.onnx\n\n"
    "  compress export runs/r50 --format tensorrt --set export.tensorrt.precision=fp16"))
def export_cmd(
    run_dir: Path = typer.Argument(..., metavar="RUN_DIR", help="a run directory whose model stages have finished"),
    fmt: str = typer.Option("onnx", "--format", help=one_of(FORMATS)),
    output: Path | None = typer.Option(None, "--output", help="file to write (default: RUN_DIR/exports/...)"),
    config: Path | None = typer.Option(None, "--config", help="config to use (default: RUN_DIR/config.json)"),
    set_: list[str] = typer.Option([], "--set", metavar="KEY=VALUE", help="override a config key, e.g. "
                                   "export.opset=18 or export.tensorrt.precision=fp16 (repeatable)"),
) -> None:
    """Re-export the compressed model of a finished run, without touching the run's own stages and artifacts."""
    from core.context import load_model_upto
    from core.errors import did_you_mean
    from core.registry import PIPELINE
    from core.rundir import RunDir, check_writable
    from pipeline.config import load_config
    from pipeline.frontier import shipped_point
    from stages.export import engine_spec, export_onnx

    if fmt not in FORMATS:
        raise UserInputError(f"--format {fmt!r} is not supported.{did_you_mean(fmt, list(FORMATS))} "
                             f"Choose one of: {', '.join(FORMATS)}")
    rd = RunDir(run_dir)
    if not rd.manifest_path.is_file():
        raise UserInputError(f"{run_dir} is not a run directory (no manifest.json); pass the --run-dir of a "
                             f"`compress pipeline` run")
    default_dir = run_dir / "exports"
    point = shipped_point(run_dir)
    if point != run_dir:  # a frontier run: the model it shipped is its selected point's
        console.print(f"frontier run: exporting the shipped point, {point}", markup=False, highlight=False)
        run_dir, rd = point, RunDir(point)
    source = config or run_dir / "config.json"
    if not source.is_file():
        raise UserInputError(f"{source} does not exist; pass the run's YAML with --config")
    cfg = load_config(source, set_)
    if fmt == "tensorrt":
        from export.tensorrt import require

        require("or export ONNX only (--format onnx) and build the engine where TensorRT runs")
    manifest = rd.read_manifest()
    last = next((n for n in reversed(PIPELINE) if manifest["stages"].get(n, {}).get("has_model")
                 and manifest["stages"][n].get("status") == "done"), None)
    if last is None:
        raise UserInputError(f"no finished stage in {run_dir} has saved a model; run the pipeline first")
    bad = rd.corrupted_files(manifest["stages"][last])
    if bad:
        raise UserInputError(f"checkpoint files of stage {last!r} are missing or damaged: {', '.join(bad)}; "
                             f"re-run `compress pipeline ... --from {last}`")
    precision = cfg.export.tensorrt.precision
    path = output or (default_dir / ("model.onnx" if fmt == "onnx" else f"model.{precision}.engine"))
    check_writable(path, "--output" if output else "the run's exports/ folder")
    rd.lock()
    try:
        model = load_model_upto(cfg, rd, manifest, last).eval()
        path.parent.mkdir(parents=True, exist_ok=True)
        if fmt == "onnx":
            export_onnx(model, cfg, path, "compressed")
            written = [path]
        else:
            from export.tensorrt import build_engine, sidecar_of

            if precision == "int8":  # an INT8 engine is built from the QDQ model the pipeline quantized
                onnx_path = _int8_source(rd, manifest)
                written = [path, sidecar_of(path)]
            else:
                onnx_path = path.with_suffix(".onnx")
                export_onnx(model, cfg, onnx_path, "compressed")
                written = [onnx_path, path, sidecar_of(path)]
            build_engine(onnx_path, path, engine_spec(cfg))
    finally:
        rd.unlock()
    console.print(f"exported the model of stage {last!r}: " + ", ".join(str(p) for p in written), markup=False,
                  highlight=False)
