"""`compress init`: a commented starter config with every key at its default, generated from the config schema.

The text is built from the same pydantic models that validate configs, so it can never list a key that does
not exist or miss one that does; `render` validates what it produced before returning it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

import yaml
from pydantic import BaseModel

from core.errors import UserInputError
from pipeline.config import Config

EXAMPLES_DIR = Path(__file__).resolve().parent / "configs"
SECTION_NOTES = {
    "model": "what to compress (model.source: timm | torchvision | python)",
    "data": "dataset and splits: train, calibration (a slice of train), validation (held out)",
    "train": "train the base model first (only for models without trained weights)",
    "calibrate": "flow calibration pass",
    "filter_prune": "IDAP++ filter pruning (docs/method.md section 2)",
    "recovery": "every recovery: between pruning steps, truncation decisions and in finetune",
    "layer_truncate": "IDAP++ layer truncation: whole residual blocks become the identity",
    "finetune": "recovery fine-tuning after pruning",
    "export": "ONNX export (and a TensorRT engine where TensorRT and a GPU are present)",
    "validate": "accuracy, parity and latency of the deployed artifact; gates fail the run with exit 3",
    "runtime": "where the run executes (not part of any checkpoint's config hash)",
    "logging": "what a run records besides its checkpoints",
}


def examples() -> dict[str, Path]:
    """The example configs shipped inside the package, by name."""
    return {p.stem: p for p in sorted(EXAMPLES_DIR.glob("*.yaml"))}


def _value(v: Any) -> str:
    """One YAML scalar or flow sequence, as a config file would spell it."""
    if isinstance(v, BaseModel):
        v = v.model_dump(mode="json")
    if isinstance(v, tuple):
        v = list(v)
    if isinstance(v, Path):
        v = str(v)
    text = yaml.safe_dump(v, default_flow_style=True, width=1000).strip()
    return text.removesuffix("\n...").removesuffix("...").strip()


def _field_lines(model: BaseModel, indent: str) -> list[str]:
    lines: list[str] = []
    for name, field in type(model).model_fields.items():
        key = field.alias or name
        value = getattr(model, name)
        if isinstance(value, BaseModel):
            lines.append(f"{indent}{key}:")
            lines += _field_lines(value, indent + "  ")
            continue
        lines.append(f"{indent}{key}: {_value(value)}{_note(field)}")
    return lines


def _note(field: Any) -> str:
    """The field's description, plus its allowed values when it takes a fixed set."""
    parts = [field.description] if field.description else []
    if get_origin(field.annotation) is Literal:
        parts.append("one of: " + " | ".join(str(a) for a in get_args(field.annotation)))
    return f"  # {'; '.join(parts)}" if parts else ""


def _parse_data(data: str) -> dict[str, Any]:
    kind, _, root = data.partition(":")
    out: dict[str, Any] = {"kind": kind}
    if root:
        out["root"] = root
    return out


def _parse_model(model: str) -> dict[str, Any]:
    source, sep, name = model.partition(":")
    if not sep and source not in ("timm", "torchvision", "python"):
        source, name = "timm", model
    if source == "python":
        return {"source": "python", "name": name}
    return {"source": source, "name": name}


# What the bundled datasets are: (classes, channels, the input size the examples use for them)
_BUNDLED = {"demo": (10, 1, [32, 32]), "digits": (10, 1, [32, 32])}


def _fit_to_data(model_part: dict[str, Any], data_part: dict[str, Any]) -> dict[str, Any]:
    """Fill the model keys the named data decides (classes, channels, size) where not given, so that the starter
    config fits its data; bundled data comes without weights for the model, so the base is trained first. Returns
    the other sections to set."""
    kind = data_part["kind"]
    if kind in _BUNDLED:
        classes, chans, size = _BUNDLED[kind]
        model_part.setdefault("num_classes", classes)
        model_part.setdefault("in_chans", chans)
        model_part.setdefault("input_size", size)
        return {"train": {"enabled": True}}
    if kind == "imagefolder" and data_part.get("root") and "num_classes" not in model_part:
        from core.config import DataConfig, ModelConfig
        from core.data import class_info

        probe = Config.model_construct(data=DataConfig(**data_part), model=ModelConfig(source="timm", name="x"))
        count = class_info(probe).count
        if count:
            model_part["num_classes"] = count
    return {}


def render(model: str = "timm:resnet50", data: str = "demo", name: str | None = None,
           num_classes: int | None = None, input_size: tuple[int, int] | None = None) -> str:
    """A commented YAML config with every key at its default, except the ones given here."""
    model_part = _parse_model(model)
    if num_classes is not None:
        model_part["num_classes"] = num_classes
    if input_size is not None:
        model_part["input_size"] = list(input_size)
    data_part = _parse_data(data)
    fitted = _fit_to_data(model_part, data_part)
    run_name = name or model_part["name"].rsplit(":", 1)[-1].rsplit("/", 1)[-1].replace(".py", "") or "run"
    run_name = "".join(c if c.isalnum() or c in "_.-" else "_" for c in run_name)
    raw = {"name": run_name, "model": model_part, "data": data_part, **fitted}
    try:
        from pydantic import ValidationError

        cfg = Config.model_validate(raw)
    except ValidationError as err:
        from pipeline.config import format_validation_error

        raise UserInputError(format_validation_error(err, "compress init")) from err
    lines = ["# Starter config written by `compress init`: every key at its default, with what it means.",
             "# Validate it with `compress pipeline THIS.yaml --dry-run`; run it without --dry-run.", ""]
    for fname, field in Config.model_fields.items():
        key = field.alias or fname
        value = getattr(cfg, fname)
        if isinstance(value, BaseModel):
            lines.append("")
            if key in SECTION_NOTES:
                lines.append(f"# {SECTION_NOTES[key]}")
            lines.append(f"{key}:")
            lines += _field_lines(value, "  ")
        else:
            lines.append(f"{key}: {_value(value)}{_note(field)}")
    text = "\n".join(lines) + "\n"
    # what we wrote must load back to the same config: the template is tested by construction
    again = Config.model_validate(yaml.safe_load(text))
    if json.dumps(again.model_dump(mode="json"), sort_keys=True) != json.dumps(cfg.model_dump(mode="json"),
                                                                              sort_keys=True):
        raise RuntimeError("the starter config does not load back to the config it was rendered from")
    return text
