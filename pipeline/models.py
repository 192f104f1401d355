"""Build models by name, load local weights, and record/rebuild pruned structure as plain data."""

from __future__ import annotations

import copy
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pipeline.config import ModelConfig, default_input_size
from pipeline.errors import UserInputError, did_you_mean

# Checkpoint wrappers seen in the wild: {"state_dict": ...}, {"model": ...}, EMA variants.
_WRAPPER_KEYS = ("state_dict", "model", "model_state_dict", "state_dict_ema", "model_ema", "net", "weights")
_PRIMITIVES = (int, float, bool, str, type(None))


def known_models(source: str) -> list[str]:
    """Architecture names the source can build."""
    if source == "timm":
        import timm

        return timm.list_models()
    import torchvision

    return torchvision.models.list_models()


def check_model_name(spec: ModelConfig) -> None:
    """Raise UserInputError listing close names when the architecture is unknown."""
    names = known_models(spec.source)
    if spec.name not in names:
        raise UserInputError(
            f"model.name {spec.name!r} is not a {spec.source} architecture.{did_you_mean(spec.name, names)} "
            f"Set model.name to one of {spec.source}'s names (model.source chooses timm or torchvision)."
        )


def build_model(spec: ModelConfig, with_weights: bool = True) -> nn.Module:
    """Build the architecture; with_weights loads `weights` or the cached pretrained weights."""
    check_model_name(spec)
    pretrained = spec.pretrained and with_weights
    try:
        if spec.source == "timm":
            model = _build_timm(spec, pretrained)
        else:
            model = _build_torchvision(spec, pretrained)
    except (OSError, RuntimeError, ValueError) as exc:
        if pretrained:
            raise UserInputError(
                f"pretrained weights for {spec.source}:{spec.name} are not in the local cache and this "
                f"tool never downloads them ({exc}). Put the weights in a file and set model.weights "
                f"to its path, with model.pretrained: false."
            ) from exc
        raise UserInputError(f"cannot build {spec.source}:{spec.name} with num_classes={spec.num_classes}, "
                             f"in_chans={spec.in_chans}: {exc}") from exc
    if with_weights and spec.weights is not None:
        load_weights(model, spec.weights, f"{spec.source}:{spec.name}")
    return model


def _create_timm(spec: ModelConfig, pretrained: bool) -> nn.Module:
    """timm's factory; models with a fixed token grid (ViT and kin) are built for model.input_size."""
    import timm

    kwargs: dict[str, Any] = {"num_classes": spec.num_classes, "in_chans": spec.in_chans}
    if tuple(spec.input_size) != default_input_size("timm", spec.name):
        try:
            return timm.create_model(spec.name, pretrained=pretrained, img_size=tuple(spec.input_size), **kwargs)
        except TypeError as exc:
            if "img_size" not in str(exc):
                raise  # a convolutional model takes any input size and has no img_size argument
    return timm.create_model(spec.name, pretrained=pretrained, **kwargs)


def _build_timm(spec: ModelConfig, pretrained: bool) -> nn.Module:
    if not pretrained:
        return _create_timm(spec, False)
    import huggingface_hub.constants as hf

    # Pretrained weights come from the local cache only: never let the hub client reach the network.
    saved = hf.HF_HUB_OFFLINE
    hf.HF_HUB_OFFLINE = True
    try:
        return _create_timm(spec, True)
    finally:
        hf.HF_HUB_OFFLINE = saved


def _build_torchvision(spec: ModelConfig, pretrained: bool) -> nn.Module:
    import torchvision

    kwargs: dict[str, Any] = {"num_classes": spec.num_classes}
    if pretrained:
        from torch.hub import get_dir

        weights = torchvision.models.get_model_weights(spec.name).DEFAULT
        cached = Path(get_dir()) / "checkpoints" / Path(weights.url).name
        if not cached.is_file():
            raise OSError(f"{cached} not found")
        model = torchvision.models.get_model(spec.name, weights=None, **kwargs)
        load_weights(model, cached, f"torchvision:{spec.name}")
    else:
        if spec.name.startswith("vit_"):
            if spec.input_size[0] != spec.input_size[1]:
                raise UserInputError(f"torchvision {spec.name} needs a square model.input_size, got "
                                     f"{list(spec.input_size)}")
            kwargs["image_size"] = spec.input_size[0]  # position embeddings are sized for the input
        with warnings.catch_warnings():
            # Inception/GoogLeNet warn that their default initialisation will change; the current one is used
            warnings.filterwarnings("ignore", message=".*init_weights.*", category=FutureWarning)
            model = torchvision.models.get_model(spec.name, weights=None, **kwargs)
    if spec.in_chans != 3:
        _adapt_first_conv(model, spec.in_chans)
    return model


def _adapt_first_conv(model: nn.Module, in_chans: int) -> None:
    """torchvision has no in_chans argument: replace the stem conv's input width."""
    for name, mod in model.named_modules():
        if isinstance(mod, nn.Conv2d) and mod.in_channels == 3:
            new = nn.Conv2d(in_chans, mod.out_channels, mod.kernel_size, mod.stride, mod.padding,
                            mod.dilation, mod.groups, mod.bias is not None)
            parent = model.get_submodule(name.rpartition(".")[0]) if "." in name else model
            setattr(parent, name.rpartition(".")[2], new)
            return
    raise UserInputError(f"cannot set in_chans={in_chans}: no 3-channel input conv found in the model")


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


def load_weights(model: nn.Module, path: Path, arch: str) -> None:
    """Load a local weights file, explaining any mismatch with the architecture."""
    if not Path(path).is_file():
        raise UserInputError(f"model.weights {str(path)!r} does not exist; set it to a local .pt/.pth file")
    try:
        raw = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unreadable file is the user's input problem
        raise UserInputError(f"model.weights {str(path)!r} cannot be read as a PyTorch weights file "
                             f"({type(exc).__name__}: {exc}). Save it with torch.save(model.state_dict(), path)."
                             ) from exc
    try:
        state = _unwrap(raw)
    except UserInputError as exc:
        raise UserInputError(f"model.weights {str(path)!r}: {exc}") from exc
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shape = [f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}" for k, v in own.items()
             if k in state and state[k].shape != v.shape]
    if missing or unexpected or shape:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing keys (e.g. {', '.join(missing[:3])})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected keys (e.g. {', '.join(unexpected[:3])})")
        if shape:
            parts.append(f"{len(shape)} shape mismatches (e.g. {'; '.join(shape[:3])})")
        raise UserInputError(
            f"model.weights {str(path)!r} does not fit {arch}: {', '.join(parts)}. The file was saved from "
            f"another architecture or with other num_classes/in_chans; set model.name, num_classes and "
            f"in_chans to the ones it was trained with, or point model.weights at the right file."
        )
    model.load_state_dict(state)


def _plain_attrs(mod: nn.Module) -> dict[str, Any]:
    out = {}
    for k, v in vars(mod).items():
        if k.startswith("_") or k == "training":
            continue
        if isinstance(v, _PRIMITIVES) or (isinstance(v, (tuple, list)) and all(isinstance(i, _PRIMITIVES) for i in v)):
            out[k] = list(v) if isinstance(v, tuple) else v
    return out


def structure_of(model: nn.Module, spec: ModelConfig) -> dict[str, Any]:
    """Plain-data description of how `model` differs structurally from a fresh build of `spec`.

    Holds the changed plain attributes of every module (widths, groups, head counts) and the
    modules replaced by identity; together with a state dict it rebuilds the model.
    """
    with torch.device("meta"):  # only attributes are compared: no memory, no weight initialisation
        fresh = dict(build_model(spec, with_weights=False).named_modules())
    attrs: dict[str, dict[str, Any]] = {}
    replaced: dict[str, str] = {}
    for name, mod in model.named_modules():
        ref = fresh.get(name)
        if ref is None:
            continue
        if type(ref) is not type(mod):
            if isinstance(mod, nn.Identity):
                replaced[name] = "identity"
                continue
            raise ValueError(f"module {name} changed type {type(ref).__name__} -> {type(mod).__name__}; "
                             f"only replacement by nn.Identity can be recorded")
        now, before = _plain_attrs(mod), _plain_attrs(ref)
        diff = {k: v for k, v in now.items() if before.get(k, object()) != v}
        if diff:
            attrs[name] = diff
    return {"attrs": attrs, "replaced": replaced}


def rebuild(spec: ModelConfig, structure: dict[str, Any], state: dict[str, torch.Tensor]) -> nn.Module:
    """Rebuild a (pruned, truncated) model from its spec, recorded structure and state dict."""
    model = build_model(spec, with_weights=False)
    for name in sorted(structure.get("replaced", {}), key=len):
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, nn.Identity())
    for name, diff in structure.get("attrs", {}).items():
        mod = model.get_submodule(name)
        for k, v in diff.items():
            cur = getattr(mod, k, None)
            setattr(mod, k, tuple(v) if isinstance(cur, tuple) and isinstance(v, list) else v)
    for key, tensor in state.items():
        mod_name, _, attr = key.rpartition(".")
        mod = model.get_submodule(mod_name) if mod_name else model
        cur = getattr(mod, attr, None)
        if isinstance(cur, torch.Tensor) and cur.shape != tensor.shape:
            new = torch.empty(tensor.shape, dtype=tensor.dtype)
            if isinstance(cur, nn.Parameter):
                setattr(mod, attr, nn.Parameter(new, requires_grad=cur.requires_grad))
            else:
                mod.register_buffer(attr, new)
    model.load_state_dict(state)
    return model


def count_macs(model: nn.Module, spec: ModelConfig) -> tuple[float, float]:
    """(GMACs, million params) at the spec's input size, batch 1 (ResNet-50 at 224 = 4.1 GMACs)."""
    import torch_pruning as tp

    device = next(model.parameters()).device
    example = torch.zeros(1, spec.in_chans, *spec.input_size, device=device)
    was_training = model.training
    model.eval()
    macs, params = tp.utils.count_ops_and_params(model, example)
    model.train(was_training)
    return float(macs) / 1e9, float(params) / 1e6


def clone(model: nn.Module) -> nn.Module:
    """Deep copy, for rollback snapshots and teacher copies."""
    return copy.deepcopy(model)
