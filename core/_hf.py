"""Hugging Face checkpoints (`model.source: huggingface`): where a checkpoint's files are and what its config
says about the input and the classes, read without importing torch or transformers (the config is validated
before any work). The model itself is built in core/_sources.py.

`model.name` is a folder written by `save_pretrained` (config.json beside the weights), or a hub id whose files are
already in the local Hugging Face cache: nothing is downloaded.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from core.errors import UserInputError

INSTALL = "pip install 'idap-compress[hf]' (transformers)"
# The files of a checkpoint folder whose content decides the model (config, weights, shard index).
_MODEL_FILES = ("*.json", "*.safetensors", "*.bin")
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")


def folder(name: str) -> Path:
    """The checkpoint folder `name` names: a local folder holding config.json, or a cached hub snapshot."""
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise UserInputError(f"model.name {name!r} is a folder without config.json: with model.source: "
                                 f"huggingface it is a folder written by save_pretrained (config.json and the "
                                 f"weights) or a hub id in the local cache")
        return path.resolve()
    try:
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(name, "config.json")
    except Exception:  # noqa: BLE001 - not a valid hub id either: the message below says what is expected
        cached = None
    if isinstance(cached, str):
        return Path(cached).parent
    raise UserInputError(f"model.name {name!r} is neither a folder nor a hub id in the local Hugging Face cache "
                         f"(relative paths start from {Path.cwd()}). With model.source: huggingface, give the "
                         f"folder your model's save_pretrained wrote; nothing is downloaded at run time")


def config_json(name: str) -> dict[str, Any]:
    """The checkpoint's config.json as a dict."""
    path = folder(name) / "config.json"
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise UserInputError(f"{path} cannot be read as JSON ({exc}); write the folder again with "
                             f"save_pretrained") from None
    if not isinstance(data, dict):
        raise UserInputError(f"{path} holds no config object; write the folder again with save_pretrained")
    return data


def defaults(name: str) -> dict[str, Any]:
    """model.num_classes, in_chans and input_size as the checkpoint's config states them (only those it states)."""
    cfg = config_json(name)
    out: dict[str, Any] = {}
    labels = cfg.get("num_labels") or (len(cfg["id2label"]) if isinstance(cfg.get("id2label"), dict) else None)
    if isinstance(labels, int) and labels > 0:
        out["num_classes"] = labels
    if isinstance(cfg.get("num_channels"), int):
        out["in_chans"] = cfg["num_channels"]
    size = cfg.get("image_size")
    if isinstance(size, int):
        out["input_size"] = (size, size)
    elif isinstance(size, (list, tuple)) and len(size) == 2 and all(isinstance(s, int) for s in size):
        out["input_size"] = tuple(size)
    return out


def model_files(name: str) -> list[Path]:
    """The files of the checkpoint that decide the model, for its fingerprint."""
    root = folder(name)
    return sorted({p for pattern in _MODEL_FILES for p in root.glob(pattern) if p.is_file()})
