"""`from pipeline import compress`: the same stages, runner and run directory as the CLI, on a model object.

The model object and the datasets are registered in this process under keys derived from their content
(architecture and weights, dataset samples), so the config names them like any other model and data, config
hashes change when they change, and a second identical call resumes instead of starting over.
"""

from __future__ import annotations

import copy
import hashlib
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from torch import nn
from torch.utils.data import Dataset

from core.errors import GateFailure, UserInputError
from pipeline.config import Config, set_key, validate_config


@dataclass
class Result:
    """What `compress` returns: the compressed module (eval mode), summary.json's content, the run directory."""

    model: nn.Module
    summary: dict[str, Any] | None
    run_dir: Path
    config: Config


def _first(ds: Dataset, what: str) -> tuple[torch.Tensor, int]:
    try:
        n = len(ds)
    except TypeError:
        raise UserInputError(f"{what} has no len(); pass a map-style torch Dataset of (image, label)") from None
    if n == 0:
        raise UserInputError(f"{what} is empty")
    try:
        item = ds[0]
    except Exception as exc:  # noqa: BLE001 - the user's dataset failing is their input's problem
        raise UserInputError(f"{what}[0] raised {type(exc).__name__}: {exc}") from None
    if not (isinstance(item, tuple | list) and len(item) >= 2 and isinstance(item[0], torch.Tensor)
            and item[0].dim() == 3):
        raise UserInputError(f"{what}[0] is not (image, label) with image a C x H x W tensor (got "
                             f"{type(item).__name__}); wrap it so that it yields (tensor, int label)")
    try:
        label = int(item[1])
    except (TypeError, ValueError, RuntimeError):
        raise UserInputError(f"{what}[0]'s label is a {type(item[1]).__name__}, not a class index; wrap the "
                             f"dataset so that it yields (image, int label)") from None
    return item[0], label


class _Pairs(Dataset):
    """A dataset whose items carry more than (image, label) (an id, a mask, a path): the first two of each."""

    def __init__(self, ds: Dataset) -> None:
        self.ds = ds

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, i: int):
        item = self.ds[i]
        return item[0], item[1]


def _pairs(ds: Dataset) -> Dataset:
    """`ds` itself when it yields (image, label); else a view that yields the first two of each item."""
    item = ds[0]
    return _Pairs(ds) if len(item) > 2 else ds


def _arch_key(model: nn.Module) -> str:
    cls = type(model)
    h = hashlib.sha256()
    for k, v in model.state_dict().items():
        h.update(f"{k}:{tuple(v.shape)};".encode())
    return f"{cls.__module__}.{cls.__qualname__}@{h.hexdigest()[:12]}"


def _data_key(train: Dataset, val: Dataset) -> str:
    """A digest of the datasets' sizes and a few samples: cheap, and different for different data."""
    h = hashlib.sha256()
    for ds in (train, val):
        n = len(ds)
        h.update(str(n).encode())
        for i in sorted({0, 1, n // 2, n - 1} & set(range(n))):
            x, y = ds[i][0], ds[i][1]
            h.update(x.detach().cpu().float().contiguous().numpy().tobytes())
            h.update(str(int(y)).encode())
    return h.hexdigest()[:16]


def _class_info(train: Dataset, val: Dataset):
    from core.data import ClassInfo

    for ds in (train, val):
        classes = getattr(ds, "classes", None)
        if isinstance(classes, list | tuple) and classes:
            return ClassInfo(len(classes), True, f"the dataset's `classes` ({len(classes)})")
    counts = []
    for ds in (train, val):
        targets = getattr(ds, "targets", None)
        if targets is None and isinstance(ds, torch.utils.data.TensorDataset) and len(ds.tensors) >= 2:
            targets = ds.tensors[1]
        if targets is not None and len(targets):
            counts.append(int(torch.as_tensor(targets).max()) + 1)
    if counts:
        return ClassInfo(max(counts), False, "the largest label + 1")
    return ClassInfo(None, False, "unknown (the datasets declare no classes)")


def _output_width(model: nn.Module, x: torch.Tensor) -> int:
    probe = copy.deepcopy(model).cpu().eval()
    try:
        with torch.no_grad():
            out = probe(x.unsqueeze(0).float())
    except Exception as exc:  # noqa: BLE001
        raise UserInputError(f"the model does not run on the dataset's first image (shape {tuple(x.shape)}): "
                             f"{type(exc).__name__}: {exc}") from None
    from pipeline._probe import output_problem

    problem = output_problem(out, None)
    if problem:
        raise UserInputError(problem)
    return int(out.shape[1])


def _raw_config(config: Config | dict[str, Any] | str | Path | None) -> dict[str, Any]:
    if config is None:
        return {}
    if isinstance(config, Config):
        return config.model_dump(mode="json", by_alias=True)
    if isinstance(config, dict):
        return copy.deepcopy(config)
    from core._yaml import read_yaml

    return read_yaml(Path(config))


def compress(model: nn.Module, train: Dataset, val: Dataset, run_dir: str | Path,
             config: Config | dict[str, Any] | str | Path | None = None,
             overrides: dict[str, Any] | None = None, fresh: bool = False, until: str | None = None,
             start: str | None = None, console: Console | None = None) -> Result:
    """Compress `model` with the pipeline (load -> calibrate -> filter_prune -> layer_truncate -> finetune ->
    export -> validate) and return the compressed module.

    Args:
        model: any trained classifier (nn.Module returning logits); it is copied, never changed.
        train: training Dataset of (image tensor C x H x W, int label); calibration is a seeded slice of it.
        val: held-out Dataset of the same kind: every accept/reject decision and every reported accuracy.
        run_dir: the run directory (created; a folder that is not a run directory is never written into).
        config: a Config, a dict or a YAML path with any sections (model and data are set from the objects).
        overrides: dotted keys as with `--set`, e.g. {"filter_prune.target_flops_reduction": 0.6}.
        fresh, until, start: as `--fresh`, `--until`, `--from` on the command line.
        console: where progress and log lines go (default: stderr).

    Raises:
        UserInputError: bad input (exit code 2 on the command line), all problems of a config at once.
        GateFailure: a validation gate failed; its `result` attribute holds the Result.
        pipeline.signals.Interrupted: SIGINT/SIGTERM/SIGHUP during the run (the run resumes on the next call).
    """
    from core._sources import MODULES
    from core.context import load_model_upto
    from core.data import DATA_OBJECTS, DataObjects
    from core.registry import PIPELINE
    from core.rundir import RunDir
    from pipeline.frontier import run_frontier, selected_run
    from pipeline.preflight import preflight
    from pipeline.runner import run_pipeline
    from pipeline.signals import Interrupted, handling

    if not isinstance(model, nn.Module):
        raise UserInputError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    x, _ = _first(train, "train")
    _first(val, "val")
    train, val = _pairs(train), _pairs(val)  # (image, label, extra...) items: the extras are not the pipeline's
    raw = _raw_config(config)
    if any(raw.get("model", {}).get(k) for k in ("source", "name")) or raw.get("data", {}).get("kind"):
        raise UserInputError("config sets model.source/name or data.kind, but the model and data are the objects "
                             "passed to compress(); remove those keys (other model/data keys are kept)")
    model_key = _arch_key(model)
    MODULES.put(model_key, copy.deepcopy(model).cpu().eval())
    data_key = _data_key(train, val)
    DATA_OBJECTS.put(data_key, DataObjects(train, val, _class_info(train, val), data_key))
    name = re.sub(r"[^A-Za-z0-9_.-]", "_", Path(run_dir).name) or "run"
    raw.setdefault("name", name)
    raw["model"] = {"num_classes": _output_width(model, x), "in_chans": int(x.shape[0]),
                    "input_size": [int(x.shape[1]), int(x.shape[2])], **raw.get("model", {}),
                    "source": "module", "name": model_key}
    raw["data"] = {**raw.get("data", {}), "kind": "dataset", "name": data_key}
    raw.setdefault("train", {}).setdefault("enabled", False)
    for key, value in (overrides or {}).items():
        set_key(raw, key, value, f"override {key!r}")
    cfg = validate_config(raw, "compress(...)")
    rd = RunDir(Path(run_dir))
    console = console or Console(stderr=True)
    for warning in preflight(cfg, rd, fresh):
        console.print(f"WARNING: {warning}", style="bold yellow", markup=False, highlight=False)
    again = f"Call compress(...) again with run_dir={str(run_dir)!r}"
    try:
        with handling():
            summary = (run_frontier if cfg.filter_prune.frontier else run_pipeline)(cfg, rd, console, start, until,
                                                                                   fresh, again=again)
            if cfg.logging.report:
                from pipeline.report import write_report

                write_report(rd.root, cfg)
    except Interrupted as exc:
        raise Interrupted(exc.signum, f"stopped by {exc.name}: the current stage is marked interrupted and every "
                                      f"finished checkpoint is intact. {again} to resume") from None
    mcfg, mrd = selected_run(cfg, rd, summary)  # a frontier run's model is the point it shipped
    manifest = mrd.read_manifest()
    last = next(n for n in reversed(PIPELINE) if manifest["stages"].get(n, {}).get("has_model")
                and manifest["stages"][n].get("status") == "done")
    result = Result(load_model_upto(mcfg, mrd, manifest, last).eval(), summary, rd.root, cfg)
    if summary is not None and not summary["gates"]["passed"]:
        failure = GateFailure("validation gates failed:\n  - " + "\n  - ".join(summary["gates"]["failures"]))
        failure.result = result
        raise failure
    return result
