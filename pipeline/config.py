"""The pipeline's config schema, composed of the sections where they live: YAML in, every section validated
before any work, all errors reported at once.

Each stage's section is defined beside the stage (stages/<name>.py); export's and the gates' beside the code that
reads them (export/config.py); the model, data, runtime and logging sections, read below the stages, in
core/config.py. This module only composes them, checks what spans sections, and loads YAML.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from core.config import DataConfig, LoggingConfig, ModelConfig, RuntimeConfig, Section
from core.errors import UserInputError, did_you_mean
from export.config import INT8_RUNTIMES, ExportConfig
from stages._recovery import RecoveryConfig
from stages.calibrate import CalibrateConfig
from stages.filter_prune import FilterPruneConfig
from stages.finetune import FinetuneConfig
from stages.layer_truncate import LayerTruncateConfig
from stages.train import TrainConfig
from stages.validate import ValidateConfig


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
    from core._yaml import read_yaml

    raw = read_yaml(Path(path))
    for o in overrides or []:
        _apply_override(raw, o)
    return validate_config(raw, str(path))
