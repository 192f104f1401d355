"""Typed pipeline config: YAML in, every section validated before any work, all errors reported at once."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from pipeline import _hf
from pipeline._sections import (  # noqa: F401 - re-exported: every section is importable from pipeline.config
    ExportConfig,
    GatesConfig,
    LoggingConfig,
    RuntimeConfig,
    Section,
    TensorRTConfig,
    ValidateConfig,
)
from pipeline.errors import UserInputError, did_you_mean


def default_input_size(source: str, name: str) -> tuple[int, int] | None:
    """The architecture's own input size (H, W), or None when the source does not know the name."""
    try:
        if source == "timm":
            import timm

            cfg = timm.models.get_pretrained_cfg(name)
            return tuple(cfg.input_size[-2:]) if cfg is not None and cfg.input_size else None
        if source == "torchvision":
            import torchvision

            crop = torchvision.models.get_model_weights(name).DEFAULT.transforms().crop_size
            return (crop[0], crop[-1])
    except (ValueError, KeyError, AttributeError, RuntimeError):
        return None
    return None


class ModelConfig(Section):
    """What network to compress and where its weights come from."""

    source: Literal["timm", "torchvision", "huggingface", "python", "module"] = Field(
        "timm", description="where model.name is looked up: timm or torchvision by name; huggingface: a folder "
        "written by save_pretrained (an AutoModelForImageClassification checkpoint; needs the hf extra); python: "
        "your own factory (model.name path/to/file.py:callable), imported on purpose; module: a model object given "
        "to the Python API")
    name: str = Field(min_length=1, description="architecture name in the source's model registry, "
                      "file.py:callable / package.module:callable for model.source: python, or the checkpoint "
                      "folder (or a hub id already in the local cache) for model.source: huggingface")
    kwargs: dict[str, Any] = Field(default_factory=dict, description="keyword arguments for the model's "
                                   "factory (your callable, timm.create_model or torchvision's builder)")
    num_classes: int = Field(1000, ge=1, description="classifier outputs (never pruned)")
    in_chans: int = Field(3, ge=1, description="input channels (never pruned)")
    input_size: tuple[int, int] = Field((224, 224), description="H, W of one input image; when unset, the "
                                        "model's own default (timm pretrained config, torchvision weights' crop "
                                        "size: 299 for Inception-v3, 320 for timm EfficientNet-B4)")
    weights: Path | None = Field(None, description="local weights file (state dict or checkpoint wrapper)")
    pretrained: bool = Field(False, description="use the source's pretrained weights from the local cache only; "
                             "with model.source: huggingface, the checkpoint folder's weights (the default when it "
                             "holds them)")

    @staticmethod
    def _checkpoint_defaults(data: dict[str, Any]) -> dict[str, Any]:
        """A Hugging Face checkpoint states its classes, input channels and size: those not set are read from
        its config.json, and its weights are used unless model.pretrained says otherwise. A config that sets all
        of them (a run directory's config.json) is taken as it is: the folder need not exist to read it."""
        if all(data.get(k) is not None for k in ("num_classes", "in_chans", "input_size", "pretrained")):
            return data
        try:
            stated = _hf.defaults(data["name"])
            holds_weights = any((_hf.folder(data["name"]) / f).is_file() for f in _hf.WEIGHT_FILES)
        except UserInputError as exc:
            raise ValueError(str(exc)) from None
        filled = {k: v for k, v in stated.items() if data.get(k) is None}
        if data.get("pretrained") is None:
            filled["pretrained"] = holds_weights
        elif data["pretrained"] is True and not holds_weights:
            raise ValueError(f"model.pretrained is true but {data['name']} holds no weights "
                             f"({' or '.join(_hf.WEIGHT_FILES[::2])}): write them with save_pretrained, or set "
                             f"model.pretrained: false to compress the architecture at random init")
        return {**data, **filled}

    @model_validator(mode="before")
    @classmethod
    def _default_input_size(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("source") == "huggingface" and isinstance(data.get("name"), str):
            data = cls._checkpoint_defaults(data)
        if isinstance(data, dict) and data.get("input_size") is None and isinstance(data.get("name"), str):
            source = data.get("source", "timm")
            if source in ("python", "module", "huggingface"):
                where = ("its config.json states no image_size" if source == "huggingface" else
                         f"it is required with model.source: {source}")
                raise ValueError(f"model.input_size is not set and {where} (your model's own input, e.g. "
                                 f"input_size: [224, 224]): it decides tracing, export and latency")
            size = default_input_size(source, data["name"])
            data = {**data, "input_size": size} if size else {k: v for k, v in data.items() if k != "input_size"}
        return data

    @field_validator("input_size")
    @classmethod
    def _positive(cls, v: tuple[int, int]) -> tuple[int, int]:
        if min(v) < 8:
            raise ValueError(f"input_size {list(v)} is too small; each side must be at least 8 pixels")
        return v


class DataConfig(Section):
    """Dataset and splits (train / calibration slice of train / held-out validation)."""

    kind: Literal["demo", "digits", "synthetic", "imagefolder", "cifar10", "cifar100", "mnist", "fashionmnist",
                  "dataset"] = Field("demo", description="the dataset (dataset: the Python API's own datasets)")
    name: str | None = Field(None, description="data.kind dataset: the key of the datasets the Python API was "
                             "given (set by the API)")
    root: Path | None = Field(None, description="dataset root; required for imagefolder and torchvision sets")
    download: bool = Field(False, description="allow torchvision to download the dataset into root")
    val_fraction: float = Field(0.2, gt=0.0, lt=1.0, description="share of train held out for validation")
    max_train_samples: int | None = Field(None, ge=1, description="cap the training split")
    max_val_samples: int | None = Field(None, ge=1, description="cap the validation split")
    batch_size: int = Field(64, ge=1, description="training batch")
    eval_batch_size: int = Field(256, ge=1, description="evaluation batch")
    num_workers: int = Field(0, ge=0, description="DataLoader worker processes")
    augment: bool = Field(False, description="random crop/flip on train images (not for the demo digits)")
    synthetic_samples: int = Field(512, ge=16, description="size of the synthetic dataset")
    mean: tuple[float, ...] | None = Field(None, description="normalisation mean (default: the dataset's usual)")
    std: tuple[float, ...] | None = Field(None, description="normalisation std (default: the dataset's usual)")
    skip_corrupt: bool = Field(False, description="imagefolder: decode every image once and skip (and list) "
                               "unreadable ones instead of stopping at the first")


class TrainConfig(Section):
    """Train the base model (only when no trained weights exist, e.g. the offline demo)."""

    enabled: bool = Field(False, description="train the base model before compressing it")
    epochs: int = Field(5, ge=1, description="SGD epochs, cosine schedule")
    lr: float = Field(0.05, gt=0.0, description="peak learning rate")
    momentum: float = Field(0.9, ge=0.0, lt=1.0, description="SGD momentum")
    weight_decay: float = Field(5e-4, ge=0.0, description="L2 weight decay (not on norms and biases)")


class CalibrateConfig(Section):
    """Flow calibration: forward hooks over a slice of train, no gradients."""

    batches: int = Field(4, ge=1, description="calibration batches")
    batch_size: int = Field(64, ge=1, description="images per calibration batch")


class FilterPruneConfig(Section):
    """IDAP++ divergence-aware filter pruning (docs/method.md section 2)."""

    @model_validator(mode="after")
    def _one_target(self) -> FilterPruneConfig:
        if self.target_flops_reduction is not None and self.target_speedup is not None:
            raise ValueError("set one target: filter_prune.target_flops_reduction (a share of the MACs) or "
                             "filter_prune.target_speedup (a measured speedup), not both; remove the other (on the "
                             "command line: --set filter_prune.target_flops_reduction=null)")
        if self.target_flops_reduction is None and self.target_speedup is None:
            object.__setattr__(self, "target_flops_reduction", 0.5)
        return self

    @field_validator("round_to")
    @classmethod
    def _round_to(cls, value: int | str) -> int | str:  # a field validator, so it is reported with the other keys
        if isinstance(value, int) and value < 1:
            raise ValueError("must be at least 1 (or auto)")
        return value

    enabled: bool = Field(True, description="run filter pruning")
    criterion: str = Field("divergence_taylor", description="importance criterion; `compress criteria` lists them")
    target_flops_reduction: float | None = Field(None, gt=0.0, lt=1.0, description="fraction of MACs to remove "
                                                 "(0.5 when target_speedup is unset too)")
    target_speedup: float | None = Field(None, gt=1.0, description="instead of a MACs target: the batch latency "
                                         "speedup over the base to reach on the validation runtime (e.g. 2.0)")
    speedup_tolerance: float = Field(0.03, ge=0.0, lt=0.5, description="a measured speedup this close below the "
                                     "target counts as reaching it")
    steps: int = Field(20, ge=1, description="T, the maximum number of pruning steps")
    p0: float = Field(0.05, gt=0.0, lt=1.0, description="first step's fraction of remaining units")
    alpha: float = Field(1.5, ge=0.0, description="growth of the step fraction: p_t = p0 (1 + t/T)^alpha")
    round_to: int | Literal["auto"] = Field(8, description="channel counts are kept at multiples of this; auto: "
                                            "the multiple the validation runtime rewards, measured (8, 16 or 32)")
    ranking: Literal["global", "per_layer"] = Field("global", description="one ranking over all layers, or the "
                                                   "same share from each layer")
    max_layer_pruning_ratio: float = Field(0.9, gt=0.0, lt=1.0, description="cap per layer vs original width")
    max_accuracy_drop: float = Field(5.0, ge=0.0, le=100.0, description="top-1 points below the stage start")
    recovery_steps: int = Field(30, ge=0, description="training steps per recovery round after each step")
    recovery_rounds: int = Field(1, ge=1, description="most recovery rounds after each step (recovery.stopping)")
    recovery_lr: float = Field(0.01, gt=0.0, description="peak learning rate of those recoveries")
    ignore: list[str] = Field(default_factory=list, description="module names never pruned")
    flops_tolerance: float = Field(0.005, ge=0.0, lt=0.1, description="stop when this close to the target")


class LayerTruncateConfig(Section):
    """IDAP++ flow-guided layer truncation (docs/method.md section 3): whole blocks become the identity."""

    enabled: bool = Field(True, description="run layer truncation")
    max_layers: int = Field(2, ge=0, description="most blocks removed")
    max_accuracy_drop: float = Field(1.0, ge=0.0, le=100.0, description="top-1 points below the stage start")
    recovery_steps: int = Field(30, ge=0, description="training steps per recovery round after each removal")
    recovery_rounds: int = Field(1, ge=1, description="most recovery rounds after each removal")
    recovery_lr: float = Field(0.01, gt=0.0, description="peak learning rate of those recoveries")
    min_flops_share: float = Field(0.005, ge=0.0, lt=1.0, description="ignore blocks with a smaller share of MACs")


class RecoveryConfig(Section):
    """Loss, optimiser and stopping rule of every recovery: fine-tuning and the short ones between steps."""

    optimizer: Literal["sgd", "adamw"] = Field("sgd", description="SGD with Nesterov momentum, or AdamW")
    momentum: float = Field(0.9, ge=0.0, lt=1.0, description="SGD momentum")
    weight_decay: float = Field(5e-4, ge=0.0, description="not on norms and biases")
    schedule: Literal["cosine", "step"] = Field("cosine", description="learning-rate schedule over the budget")
    warmup_fraction: float = Field(0.0, ge=0.0, lt=1.0, description="share of the budget spent warming up")
    step_every: int = Field(1, ge=1, description="step schedule: rounds between decays")
    step_gamma: float = Field(0.1, gt=0.0, le=1.0, description="step schedule: factor at each decay")
    grad_clip: float | None = Field(None, gt=0.0, description="max gradient norm")
    label_smoothing: float = Field(0.0, ge=0.0, lt=1.0, description="of the cross-entropy term")
    distill_weight: float = Field(0.5, ge=0.0, le=1.0, description="lambda of the distillation term")
    temperature: float = Field(4.0, gt=0.0, description="distillation temperature tau")
    teacher: Literal["stage_input", "base"] = Field("base", description="distil from the base model or the "
                                                                       "model entering the stage")
    stopping: Literal["fixed", "accuracy", "information_flow", "gradient_flow"] = Field(
        "fixed", description="when a recovery stops early: never (fixed), at the base top-1, or InCoP flow "
        "consistency")
    epsilon: float | None = Field(None, gt=0.0, description="flow distance that stops (default IF 0.11, GF 0.5)")
    amp: bool = Field(True, description="mixed precision on CUDA")
    channels_last: bool = Field(True, description="channels-last memory format on CUDA")

    def threshold(self) -> float:
        """epsilon, or the InCoP authors' default for the stopping rule."""
        return self.epsilon if self.epsilon is not None else {"gradient_flow": 0.5}.get(self.stopping, 0.11)


class FinetuneConfig(Section):
    """Recovery fine-tuning: up to max_epochs, stopped by recovery.stopping."""

    enabled: bool = Field(True, description="run recovery fine-tuning")
    max_epochs: int = Field(3, ge=0, description="most epochs; recovery.stopping may end it sooner")
    lr: float = Field(0.01, gt=0.0, description="peak learning rate")


INT8_RUNTIMES = ("auto", "onnxruntime-cpu", "tensorrt")  # runtimes that run a QDQ model with INT8 kernels


class Config(Section):
    """The whole pipeline config."""

    name: str = Field(min_length=1, pattern=r"^[A-Za-z0-9_.-]+$", description="the run's name (runs/<name>)")
    seed: int = Field(0, description="seeds splits, training and pruning: equal seeds give equal runs")
    run_dir: Path | None = Field(None, description="default runs/<name>")
    model: ModelConfig
    data: DataConfig = Field(default_factory=DataConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    calibrate: CalibrateConfig = Field(default_factory=CalibrateConfig)
    filter_prune: FilterPruneConfig = Field(default_factory=FilterPruneConfig)
    recovery: RecoveryConfig = Field(default_factory=RecoveryConfig)
    layer_truncate: LayerTruncateConfig = Field(default_factory=LayerTruncateConfig)
    finetune: FinetuneConfig = Field(default_factory=FinetuneConfig)
    export: ExportConfig = Field(default_factory=ExportConfig)
    validate_: ValidateConfig = Field(default_factory=ValidateConfig, alias="validate")
    runtime: RuntimeConfig = Field(default_factory=RuntimeConfig)
    logging: LoggingConfig = Field(default_factory=LoggingConfig)

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    @model_validator(mode="after")
    def _data_needs(self) -> Config:
        if self.data.kind in ("imagefolder", "cifar10", "cifar100", "mnist", "fashionmnist") and not self.data.root:
            raise ValueError(f"data.root is required for data.kind={self.data.kind!r}; set it to the dataset folder")
        if self.model.weights is not None and self.model.pretrained:
            raise ValueError("model.weights and model.pretrained are exclusive; keep one")
        if self.validate_.runtime == "tensorrt" and self.export.tensorrt.mode == "off":
            raise ValueError("validate.runtime is 'tensorrt' but export.tensorrt.mode is 'off', so no engine is "
                             "built; set export.tensorrt.mode: required (or validate.runtime: auto)")
        if self.export.quantize == "int8" and self.validate_.runtime not in INT8_RUNTIMES:
            raise ValueError(f"export.quantize: int8 cannot be validated on validate.runtime "
                             f"{self.validate_.runtime!r}: ONNX Runtime's CUDA provider has no INT8 convolutions (it "
                             f"would dequantize and time FP32 work). Set validate.runtime to one of "
                             f"{', '.join(INT8_RUNTIMES)}, or export.quantize: null")
        trt = self.export.tensorrt
        if trt.mode != "off" and self.validate_.runtime in ("auto", "tensorrt") \
                and not trt.min_batch <= self.validate_.batch <= trt.max_batch:
            raise ValueError(f"validate.batch {self.validate_.batch} is outside the engine's optimization profile "
                             f"(export.tensorrt.min_batch {trt.min_batch} to max_batch {trt.max_batch}); the engine "
                             f"could not be timed at it. Set validate.batch within it or widen the profile")
        if self.export.tensorrt.mode != "off" and self.export.tensorrt.max_batch > 1 and not self.export.dynamic_batch:
            raise ValueError("export.dynamic_batch is false, so the ONNX model has batch 1 and its engine cannot "
                             "take export.tensorrt.max_batch > 1; set export.tensorrt.max_batch: 1 and opt_batch: 1, "
                             "or export.dynamic_batch: true")
        return self

    def section(self, name: str) -> BaseModel | None:
        """The config section a stage reads, by the stage's name."""
        return getattr(self, "validate_" if name == "validate" else name, None)

    def resolved_run_dir(self) -> Path:
        """The run directory: `run_dir` if set, else runs/<name>."""
        return self.run_dir or Path("runs") / self.name


def section_hash(*parts: Any) -> str:
    """Stable sha256 of JSON-able parts (pydantic models are dumped in JSON mode)."""
    norm = [p.model_dump(mode="json", by_alias=True) if isinstance(p, BaseModel) else p for p in parts]
    return hashlib.sha256(json.dumps(norm, sort_keys=True, default=str).encode()).hexdigest()


def _fields_at(path: tuple[Any, ...]) -> list[str]:
    """Known keys of the section at a config path, for suggestions."""
    cls: Any = Config
    for part in path:
        fields = getattr(cls, "model_fields", None)
        if not fields:
            return []
        field = next((f for n, f in fields.items() if n == part or f.alias == part), None)
        if field is None:
            return []
        cls = field.annotation
    fields = getattr(cls, "model_fields", {})
    return [f.alias or n for n, f in fields.items()]


def format_validation_error(err: ValidationError, source: str) -> str:
    """All errors of a config, each with its field path and a suggestion."""
    lines = [f"{source}: {err.error_count()} problem(s) in the config:"]
    for e in err.errors():
        loc = tuple(e["loc"])
        path = ".".join(str(p) for p in loc) or "(top level)"
        if e["type"] == "extra_forbidden":
            known = _fields_at(loc[:-1])
            hint = did_you_mean(str(loc[-1]), known) or f" Allowed keys here: {', '.join(known)}."
            lines.append(f"  - {path}: unknown key.{hint}")
        elif e["type"] == "missing":
            lines.append(f"  - {path}: required key is missing; add it to the config.")
        elif e["type"] == "value_error":  # our validators' messages name the keys and the values themselves
            lines.append(f"  - {path}: {e['msg'].removeprefix('Value error, ')}")
        else:
            lines.append(f"  - {path}: {e['msg']} (got {e.get('input')!r}).")
    lines.append("Fix these keys in the YAML file or the --set overrides and run again.")
    return "\n".join(lines)


def set_key(raw: dict[str, Any], key: str, value: Any, origin: str) -> None:
    """Set a dotted key (a.b.c) in a raw config, creating sections; `origin` names the override in errors."""
    parts = [p for p in key.strip().split(".") if p]
    if not parts:
        raise UserInputError(f"{origin} has an empty key; e.g. finetune.max_epochs=2")
    node = raw
    for p in parts[:-1]:
        nxt = node.setdefault(p, {})
        if not isinstance(nxt, dict):
            raise UserInputError(f"{origin}: {p!r} is a value, not a section")
        node = nxt
    node[parts[-1]] = value


def _apply_override(raw: dict[str, Any], override: str) -> None:
    if "=" not in override:
        raise UserInputError(f"--set {override!r} is not of the form a.b=value; e.g. --set finetune.max_epochs=2")
    key, _, value = override.partition("=")
    try:
        parsed = yaml.safe_load(value)
    except yaml.YAMLError as exc:
        raise UserInputError(f"--set {override!r}: value is not valid YAML: {exc}") from exc
    set_key(raw, key, parsed, f"--set {override!r}")


def validate_config(raw: dict[str, Any], source: str) -> Config:
    """Validate a raw config; every problem at once as one UserInputError."""
    try:
        return Config.model_validate(raw)
    except ValidationError as err:
        raise UserInputError(format_validation_error(err, source)) from err


def load_config(path: Path, overrides: list[str] | None = None) -> Config:
    """Read, override and validate a config file; any problem raises UserInputError."""
    from pipeline._yaml import read_yaml

    raw = read_yaml(Path(path))
    for o in overrides or []:
        _apply_override(raw, o)
    return validate_config(raw, str(path))
