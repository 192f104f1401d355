"""Checks before any work, and all that `--dry-run` does: config, run directory, model, weights, data, runtimes.

Everything here costs seconds (the model is built on the meta device, the weights file is memory-mapped), so a
mistake that would surface after an epoch of training surfaces at once, with exit code 2 and all problems
listed together.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from core.errors import UserInputError
from core.rundir import RunDir
from pipeline.config import Config

# A run keeps about this many copies of the model: checkpoints of load, train, filter_prune, layer_truncate and
# finetune, finetune's resumable optimizer state, and the base and compressed ONNX files.
_COPIES = 8


def _problems_of(check) -> list[str]:
    try:
        check()
    except UserInputError as exc:
        return [str(exc)]
    return []


def runtime_problems(config: Config) -> list[str]:
    """TensorRT or the CUDA provider asked for explicitly but missing here: known before any stage runs."""
    from export.tensorrt import AUTO_HINT, INSTALL_HINT, unavailable_reason

    problems = []
    trt_needed = config.export.tensorrt.mode == "required" or config.validate_.runtime == "tensorrt"
    reason = unavailable_reason() if trt_needed else None
    if reason:
        key = "export.tensorrt.mode is 'required'" if config.export.tensorrt.mode == "required" \
            else "validate.runtime is 'tensorrt'"
        problems.append(f"{key} but {reason}; {INSTALL_HINT}; {AUTO_HINT}")
    from export.target import problems as target_problems

    # the deployment target (the runtime validate and the pruning loop time on) cannot run here
    return problems + target_problems(config)


def _config_problems(config: Config) -> list[str]:
    from core._sources import check_model_name
    from stages._criteria import CRITERIA

    problems = _problems_of(lambda: check_model_name(config.model))
    problems += _problems_of(lambda: CRITERIA.get(config.filter_prune.criterion))
    weights = config.model.weights
    if weights is not None and not Path(weights).is_file():
        what = ("is a folder; point it at the weights file inside it (a state dict saved with torch.save, or a "
                ".safetensors file)" if Path(weights).is_dir() else
                "is not a regular file (a device, pipe or socket); point it at a weights file"
                if Path(weights).exists() else
                "does not exist; set it to a local weights file (a state dict saved with torch.save)")
        problems.append(f"model.weights {str(weights)!r} {what}")
    root = config.data.root
    if root is not None and config.data.kind not in ("demo", "synthetic", "digits", "dataset") \
            and not Path(root).is_dir() and not config.data.download:
        problems.append(f"data.root {str(root)!r} does not exist (data.kind={config.data.kind}); point it at the "
                        f"dataset folder, or set data.download: true for torchvision datasets")
    problems += runtime_problems(config)
    if config.logging.tensorboard and importlib.util.find_spec("tensorboard") is None:
        problems.append("logging.tensorboard is true but the tensorboard package is not installed; "
                        "pip install -e '.[tensorboard]', or set logging.tensorboard: false")
    return problems


def _model_problems(config: Config, warnings: list[str]) -> tuple[list[str], int]:
    """Weights that do not fit the architecture, a factory that is not deterministic, the class count; and the
    model's size in bytes (for the free-space check)."""
    from core._weights import fit_problems, nonfinite_tensors, read_state_dict
    from core.data import check_classes, class_info
    from core.models import check_deterministic, parameter_shapes

    spec = config.model
    problems: list[str] = []
    try:
        shapes = parameter_shapes(spec)
    except UserInputError as exc:
        return [str(exc)], 0
    size = 4 * sum(_numel(s) for s in shapes.values())
    problems += exclude_problems(config, shapes, warnings)
    if spec.source == "python":
        problems += _problems_of(lambda: check_deterministic(spec))
    if spec.weights is not None and Path(spec.weights).is_file():
        try:
            state = read_state_dict(spec.weights)
        except UserInputError as exc:
            problems.append(str(exc))
        else:
            import torch

            with torch.device("meta"):
                probe = _ShapeModel(shapes)
            missing, unexpected, shape = fit_problems(probe, state)
            if missing or unexpected or shape:
                from core._weights import check_fit
                from core.models import build_model

                problems += _problems_of(lambda: check_fit(build_model(spec, with_weights=False), state,
                                                           spec.weights, f"{spec.source}:{spec.name}"))
            else:
                bad = nonfinite_tensors(state)
                if bad:
                    problems.append(f"model.weights {str(spec.weights)!r} holds NaN or Inf values in {len(bad)} "
                                    f"tensor(s): {', '.join(bad[:8])}; use a checkpoint from before training "
                                    f"diverged")
    error, warning = check_classes(spec.num_classes, class_info(config))
    problems += [error] if error else []
    warnings += [warning] if warning else []
    if not problems:  # one forward: the output is logits of the right width, and the stages fit in memory
        from pipeline._probe import memory_problems, probe

        found = probe(spec)
        problems += [found.problem] if found.problem else []
        problems += memory_problems(config, found, _device(config))
    problems += _untrained(config, warnings)
    return problems, size


def _device(config: Config) -> str:
    import torch

    want = config.runtime.device
    return ("cuda" if torch.cuda.is_available() else "cpu") if want == "auto" else want


def _untrained(config: Config, warnings: list[str]) -> list[str]:
    """A model with no weights that is not trained here is compressed at random initialisation: its accuracy
    means nothing. A warning; an error when an accuracy gate would judge it."""
    spec = config.model
    if spec.weights is not None or spec.pretrained or config.train.enabled or spec.source == "module":
        return []
    what = (f"model {spec.source}:{spec.name} has no weights (model.weights unset, model.pretrained false) and "
            f"train.enabled is false: the pipeline would compress a randomly initialised network, whose accuracy "
            f"means nothing")
    if config.validate_.gates.max_top1_drop is not None:
        return [f"{what}, and validate.gates.max_top1_drop would judge it; set model.weights, or train.enabled: "
                f"true (or remove the gate to compress it anyway)"]
    if spec.source == "python":
        return []  # a factory may load its own weights: nothing here can tell
    warnings.append(f"{what}; set model.weights or train.enabled: true")
    return []


def batch_warnings(config: Config) -> list[str]:
    """data.batch_size larger than the training split: every epoch is one short batch."""
    from pipeline._probe import _samples

    n = _samples(config)
    if n is None:
        return []
    train = n - max(1, int(round(n * config.data.val_fraction)))
    if config.data.max_train_samples:
        train = min(train, config.data.max_train_samples)
    if config.data.batch_size > train:
        return [f"data.batch_size {config.data.batch_size} is larger than the {train} training images: every epoch "
                f"is one batch of {train}; lower data.batch_size"]
    return []


def exclude_problems(config: Config, shapes: dict[str, tuple[int, ...]], warnings: list[str]) -> list[str]:
    """export.quantize_exclude names layers of the model (or ONNX nodes: "/..."), and only with quantize: int8."""
    from core.errors import did_you_mean

    names = config.export.quantize_exclude
    if names and config.export.quantize is None:
        warnings.append("export.quantize_exclude is set but export.quantize is not int8: it has no effect")
    layers = sorted({k.rsplit(".", 1)[0] for k in shapes if "." in k})
    return [f"export.quantize_exclude names {n!r}, which is not a layer of the model.{did_you_mean(n, layers)} Use "
            f"module names as model.named_modules() gives them, or ONNX node names (\"/...\")"
            for n in names if not n.startswith("/") and n not in layers]


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


class _ShapeModel:
    """Stands in for a model where only its state dict's names and shapes matter."""

    def __init__(self, shapes: dict[str, tuple[int, ...]]) -> None:
        import torch

        self._state = {k: torch.empty(s, device="meta") for k, s in shapes.items()}

    def state_dict(self):
        return self._state


def preflight(config: Config, run_dir: RunDir | None = None, fresh: bool = False, deep: bool = True) -> list[str]:
    """Raise UserInputError listing every problem found; return the warnings.

    `deep` also builds the model on the meta device, checks the weights file against it and the class count
    against the data (seconds); the run directory is checked for ownership, writability and free space.
    """
    warnings: list[str] = []
    problems = _config_problems(config)
    size = 0
    if deep and not problems:
        more, size = _model_problems(config, warnings)
        problems += more
    warnings += batch_warnings(config)
    if run_dir is not None:
        problems += _problems_of(lambda: run_dir.check_usable(fresh, _COPIES * size + 20_000_000 if size else 0))
    if problems:
        raise UserInputError("the config cannot run:\n  - " + "\n  - ".join(problems))
    return warnings
