"""Weights files: read a state dict without unpickling objects, check that it fits a model, load it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from core.config import ModelConfig
from core.errors import UserInputError

# Checkpoint wrappers seen in the wild: {"state_dict": ...}, {"model": ...}, EMA variants.
_WRAPPER_KEYS = ("state_dict", "model", "model_state_dict", "state_dict_ema", "model_ema", "net", "weights")


def _unwrap(obj: Any) -> dict[str, torch.Tensor]:
    for _ in range(3):
        if isinstance(obj, dict) and not all(isinstance(v, torch.Tensor) for v in obj.values()):
            key = next((k for k in _WRAPPER_KEYS if k in obj and isinstance(obj[k], dict)), None)
            if key is None:
                break
            obj = obj[key]
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise UserInputError("the weights file holds no state dict (expected a dict of tensors, possibly "
                             f"under one of the keys {', '.join(_WRAPPER_KEYS)})")
    prefixes = ("module.", "_orig_mod.")
    return {next((k[len(p):] for p in prefixes if k.startswith(p)), k): v for k, v in obj.items()}


def read_state_dict(path: Path, what: str = "model.weights") -> dict[str, torch.Tensor]:
    """The state dict in a weights file (wrappers and DataParallel/compile prefixes removed), never unpickling
    objects: a whole pickled model gets an error that says how to turn it into a state dict."""
    if not Path(path).is_file():
        raise UserInputError(f"{what} {str(path)!r} does not exist; set it to a local .pt/.pth file")
    try:
        raw = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as exc:  # noqa: BLE001 - any unreadable file is the user's input problem
        text = str(exc)
        if "GLOBAL" in text or "Unsupported global" in text or "Module" in text:
            raise UserInputError(
                f"{what} {str(path)!r} holds a whole pickled model (torch.save(model)), not a state dict. It is "
                f"never unpickled here: that would run code stored in the file. Convert it once, where you trust "
                f"the file:\n"
                f"    model = torch.load({str(path)!r}, weights_only=False)\n"
                f"    torch.save(model.state_dict(), 'weights.pt')\n"
                f"then set model.weights: weights.pt and build the architecture by name (model.source: timm or "
                f"torchvision) or with your own factory (model.source: python, model.name: mynet.py:build)"
            ) from None
        raise UserInputError(f"{what} {str(path)!r} cannot be read as a PyTorch weights file "
                             f"({type(exc).__name__}). Save it with torch.save(model.state_dict(), path).") from None
    try:
        return _unwrap(raw)
    except UserInputError as exc:
        raise UserInputError(f"{what} {str(path)!r}: {exc}") from exc


def fit_problems(model: nn.Module, state: dict[str, torch.Tensor]) -> tuple[list[str], list[str], list[str]]:
    """(missing keys, unexpected keys, shape mismatches) of a state dict against a model."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shape = [f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}" for k, v in own.items()
             if k in state and tuple(state[k].shape) != tuple(v.shape)]
    return missing, unexpected, shape


def _head_hint(model: nn.Module, keys: list[str]) -> str:
    """When every mismatch sits in the last top-level module, the file has its own head on this backbone."""
    tops = [n for n, _ in model.named_children()]
    mismatched = {k.split(".")[0] for k in keys}
    if tops and mismatched and mismatched <= set(tops[-2:]):
        return (f" Only the head ({', '.join(sorted(mismatched))}) differs: the weights were trained with a head of "
                f"their own on this backbone. Build that model with your own factory: model.source: python, "
                f"model.name: mynet.py:build, where build() returns the backbone with your head (see "
                f"docs/own-model.md in the tool's repository).")
    return ""


def check_fit(model: nn.Module, state: dict[str, torch.Tensor], path: Path, arch: str,
              spec: ModelConfig | None = None) -> None:
    """Raise UserInputError listing what does not fit, and the fix; non-finite values are named too."""
    missing, unexpected, shape = fit_problems(model, state)
    if missing or unexpected or shape:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing keys ({', '.join(missing[:6])})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected keys ({', '.join(unexpected[:6])})")
        if shape:
            parts.append(f"{len(shape)} shape mismatches ({'; '.join(shape[:6])})")
        hint = _head_hint(model, missing + unexpected + [s.split(" ")[0] for s in shape])
        fix = hint or (" The file was saved from another architecture or with other num_classes/in_chans; set "
                       "model.name, num_classes and in_chans to the ones it was trained with, or point "
                       "model.weights at the right file.")
        raise UserInputError(f"model.weights {str(path)!r} does not fit {arch}: {'; '.join(parts)}.{fix}")
    bad = nonfinite_tensors(state)
    if bad:
        raise UserInputError(f"model.weights {str(path)!r} holds NaN or Inf values in {len(bad)} tensor(s): "
                             f"{', '.join(bad[:8])}. The model diverged when it was trained (or the file is "
                             f"damaged); use a checkpoint from before that happened")


def nonfinite_tensors(state: dict[str, torch.Tensor]) -> list[str]:
    """Names of floating-point tensors holding NaN or Inf."""
    return [k for k, v in state.items() if torch.is_floating_point(v) and not bool(torch.isfinite(v).all())]


def load_weights(model: nn.Module, path: Path, arch: str, spec: ModelConfig | None = None) -> None:
    """Load a local weights file, explaining any mismatch with the architecture."""
    state = read_state_dict(path)
    check_fit(model, state, path, arch, spec)
    model.load_state_dict(state)
