"""Build models by name, load local weights, and record/rebuild pruned structure as plain data."""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from core import _hf
from core._sources import SOURCES, check_model_name, factory_file
from core._weights import (
    load_weights,
)
from core.config import ModelConfig
from core.errors import UserInputError

_PRIMITIVES = (int, float, bool, str, type(None))


def build_model(spec: ModelConfig, with_weights: bool = True) -> nn.Module:
    """Build the architecture; with_weights loads `weights` or the cached pretrained weights."""
    check_model_name(spec)
    pretrained = spec.pretrained and with_weights
    try:
        model = SOURCES.get(spec.source)(spec, pretrained)
    except UserInputError:
        raise
    except (OSError, RuntimeError, ValueError) as exc:
        if pretrained:
            raise UserInputError(
                f"pretrained weights for {spec.source}:{spec.name} are not in the local cache and this "
                f"tool never downloads them ({exc}). Put the weights in a file and set model.weights "
                f"to its path, with model.pretrained: false."
            ) from exc
        raise
    except TypeError as exc:
        if spec.kwargs and "keyword argument" in str(exc):
            raise UserInputError(f"{spec.source}:{spec.name} does not take model.kwargs {spec.kwargs}: {exc}; "
                                 f"remove or rename them") from exc
        raise
    if with_weights and spec.weights is not None:
        load_weights(model, spec.weights, f"{spec.source}:{spec.name}", spec)
    return model


def _plain_attrs(mod: nn.Module) -> dict[str, Any]:
    out = {}
    for k, v in vars(mod).items():
        if k.startswith("_") or k == "training":
            continue
        if isinstance(v, _PRIMITIVES) or (isinstance(v, (tuple, list)) and all(isinstance(i, _PRIMITIVES) for i in v)):
            out[k] = list(v) if isinstance(v, tuple) else v
    return out


@dataclass(frozen=True)
class _Fresh:
    kind: type
    attrs: dict[str, Any]


_FRESH: dict[str, dict[str, _Fresh]] = {}  # spec (and factory file version) -> its fresh modules' types and attrs


def _spec_key(spec: ModelConfig) -> str:
    key = spec.model_dump_json()
    if spec.source == "python":
        path = factory_file(spec.name)
        key += f"@{path}:{path.stat().st_mtime_ns}" if path is not None and path.is_file() else ""
    if spec.source == "huggingface":  # the architecture is the checkpoint's config.json
        path = _hf.folder(spec.name) / "config.json"
        key += f"@{path}:{path.stat().st_mtime_ns}"
    return key


def fresh_structure(spec: ModelConfig) -> dict[str, _Fresh]:
    """Type and plain attributes of every module of a fresh build of `spec` (computed once per spec).

    Built on the meta device (no memory, no initialisation); a model whose constructor computes with tensors
    (torchvision's RegNet calls .tolist()) cannot be built there and is built on the CPU instead.
    """
    key = _spec_key(spec)
    if key not in _FRESH:
        try:
            with torch.device("meta"):
                model = build_model(spec, with_weights=False)
        except UserInputError:
            raise
        except Exception:  # noqa: BLE001 - a constructor that needs real tensors: ours to handle, not the user's
            model = build_model(spec, with_weights=False)
        _FRESH[key] = {n: _Fresh(type(m), _plain_attrs(m)) for n, m in model.named_modules()}
        del model
    return _FRESH[key]


class Skip(nn.Identity):
    """What a removed block becomes: its input, for any call signature. A block called with more than its input
    (a transformer block given `rope=`, an attention mask, a size) takes and ignores the rest, as the block's
    residual path would; nn.Identity accepts only the input and broke such models."""

    def forward(self, input: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:  # noqa: A002 - nn.Identity's
        return input


def structure_of(model: nn.Module, spec: ModelConfig) -> dict[str, Any]:
    """Plain-data description of how `model` differs structurally from a fresh build of `spec`.

    Holds the changed plain attributes of every module (widths, groups, head counts) and the
    modules replaced by identity; together with a state dict it rebuilds the model.
    """
    fresh = fresh_structure(spec)
    attrs: dict[str, dict[str, Any]] = {}
    replaced: dict[str, str] = {}
    for name, mod in model.named_modules():
        ref = fresh.get(name)
        if ref is None:
            continue
        if ref.kind is not type(mod):
            if isinstance(mod, nn.Identity):
                replaced[name] = "identity"
                continue
            raise ValueError(f"module {name} changed type {ref.kind.__name__} -> {type(mod).__name__}; "
                             f"only replacement by nn.Identity can be recorded")
        now = _plain_attrs(mod)
        diff = {k: v for k, v in now.items() if ref.attrs.get(k, object()) != v}
        if diff:
            attrs[name] = diff
    return {"attrs": attrs, "replaced": replaced}


def parameter_shapes(spec: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every parameter and buffer of a fresh build (on the meta device where possible)."""
    try:
        with torch.device("meta"):
            model = build_model(spec, with_weights=False)
    except UserInputError:
        raise
    except Exception:  # noqa: BLE001 - see fresh_structure
        model = build_model(spec, with_weights=False)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def check_deterministic(spec: ModelConfig) -> None:
    """A factory must build the same parameter shapes every time: checkpoints are rebuilt by calling it again."""
    first, calls = parameter_shapes(spec), 1
    second = first
    while first == second and calls < 3:  # a third call: a factory drawing among a few widths repeats in two
        second, calls = parameter_shapes(spec), calls + 1
    if first != second:
        diff = sorted(set(first.items()) ^ set(second.items()))
        raise UserInputError(f"the factory {spec.name} built different models on {calls} calls ({len(diff)} "
                             f"parameter shapes differ, e.g. {diff[:3]}); checkpoints are rebuilt by calling it "
                             f"again, so it must give the same architecture for the same model.kwargs (seed any "
                             f"randomness, or pass it through model.kwargs)")


def rebuild(spec: ModelConfig, structure: dict[str, Any], state: dict[str, torch.Tensor]) -> nn.Module:
    """Rebuild a (pruned, truncated) model from its spec, recorded structure and state dict."""
    model = build_model(spec, with_weights=False)
    for name in sorted(structure.get("replaced", {}), key=len):
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, Skip())
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


def _cpu_attention(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    from torch.utils.flop_counter import sdpa_flop_count

    return sdpa_flop_count(query_shape, key_shape, value_shape)


def count_macs(model: nn.Module, spec: ModelConfig) -> tuple[float, float]:
    """(GMACs, million params) at the spec's input size, batch 1 (ResNet-50 at 224 = 4.1 GMACs).

    MACs are counted on the ops the forward actually runs (torch.utils.flop_counter: convolutions, matrix
    products, fused attention), so functional calls on module weights (`F.linear(x, self.weight)`, Swin) count
    as much as module calls; a per-module counter misses them (a third of Swin-T's MACs).
    """
    from torch.utils.flop_counter import FlopCounterMode

    device = next(model.parameters()).device
    example = torch.zeros(1, spec.in_chans, *spec.input_size, device=device)
    was_training = model.training
    model.eval()
    # the CPU's fused attention kernel has no formula in torch's counter: the same one as the GPU kernels
    mapping = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_attention}
    try:
        with FlopCounterMode(display=False, custom_mapping=mapping) as counter, torch.no_grad():
            model(example)
    finally:
        model.train(was_training)
    params = sum(p.numel() for p in model.parameters())
    return counter.get_total_flops() / 2e9, params / 1e6


def clone(model: nn.Module) -> nn.Module:
    """Deep copy, for rollback snapshots and teacher copies."""
    return copy.deepcopy(model)


def fingerprint(spec: ModelConfig) -> dict[str, str]:
    """What the model's config does not say but its checkpoints depend on: the content of the weights file, of
    the factory's source file, of a Hugging Face checkpoint's files, or of a model object given to the API. Part
    of the load stage's config hash, so that retrained weights or an edited factory under the same name re-run
    the pipeline."""
    from core._sources import MODULES
    from core.rundir import sha256

    out = {}
    if spec.weights is not None and Path(spec.weights).is_file():
        out["weights"] = sha256(Path(spec.weights))
    if spec.source == "python":
        path = factory_file(spec.name)
        if path is not None and path.is_file():
            out["factory"] = sha256(path)
    if spec.source == "module" and spec.name in MODULES:
        out["module"] = state_digest(MODULES.get(spec.name))
    if spec.source == "huggingface":
        try:
            root = _hf.folder(spec.name)
        except UserInputError:
            root = None  # gone: building the model says so, with the fix
        if root is not None:
            out.update({f"checkpoint/{p.relative_to(root)}": sha256(p) for p in _hf.model_files(spec.name)})
    return out


def state_digest(model: nn.Module) -> str:
    """sha256 over a model's state dict (names, shapes, dtypes and values)."""
    import hashlib

    h = hashlib.sha256()
    for k, v in model.state_dict().items():
        t = v.detach().cpu().contiguous()
        h.update(f"{k}:{tuple(t.shape)}:{t.dtype}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()
