"""Config sections read below the stages: the model, the data, the run's environment; and their base class.

A stage's own section lives beside the stage (stages/<name>.py); export's beside the converters that read it
(export/config.py). pipeline/config.py composes them all into the one schema a YAML file is checked against.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from core import _hf
from core.errors import UserInputError


class Section(BaseModel):
    """Base of every config section: unknown keys are errors."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


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


class RuntimeConfig(Section):
    """Where and how the run executes; not part of any stage's config hash."""

    device: Literal["auto", "cpu", "cuda"] = Field("cpu", description="where stages run; auto takes CUDA when "
                                                   "visible")
    threads: int | None = Field(None, ge=1, description="torch intra-op threads")
    tf32: bool = Field(False, description="TF32 math for FP32 work on GPUs (Ampere and newer) in ONNX Runtime, "
                       "TensorRT FP32 engines and torch-cuda timing: faster, but logits move by about 1e-3, past "
                       "the default FP32 parity gate")
    progress: bool = Field(True, description="progress display: bars on a terminal, plain lines otherwise")
    progress_interval: float = Field(30.0, gt=0.0, description="off a terminal: seconds between progress lines")


class LoggingConfig(Section):
    """What a run records besides its checkpoints; not part of any stage's config hash."""

    tensorboard: bool = Field(False, description="also write TensorBoard scalars to <run_dir>/tensorboard")
    report: bool = Field(True, description="write report.md/.html and figures/ at the end of `compress pipeline`")


def section_hash(*parts: Any) -> str:
    """Stable sha256 of JSON-able parts (pydantic models are dumped in JSON mode)."""
    norm = [p.model_dump(mode="json", by_alias=True) if isinstance(p, BaseModel) else p for p in parts]
    return hashlib.sha256(json.dumps(norm, sort_keys=True, default=str).encode()).hexdigest()
