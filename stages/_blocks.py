"""Removable blocks, found from the model itself: shape-preserving residual blocks and conv+norm+act units."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from core.models import Skip
from stages._flows import BlockStats

_ACTS = (nn.ReLU, nn.ReLU6, nn.GELU, nn.SiLU, nn.Hardswish, nn.LeakyReLU, nn.Mish, nn.ELU)
_NORMS = (nn.BatchNorm2d, nn.GroupNorm)


@dataclass
class Block:
    """A removal candidate: one module, or a conv+norm+act run inside a Sequential (VGG style)."""

    name: str
    modules: list[str]
    divergence: float
    macs_share: float

    def as_record(self) -> dict[str, Any]:
        return {"block": self.name, "modules": self.modules, "divergence": self.divergence,
                "macs_share": self.macs_share}


def conv_units(model: nn.Module) -> list[list[str]]:
    """conv(+norm)(+act) runs in Sequentials whose conv keeps width and resolution (VGG's 3x3 layers)."""
    units = []
    for seq_name, seq in model.named_modules():
        if not isinstance(seq, nn.Sequential):
            continue
        kids = list(seq.named_children())
        for i, (name, mod) in enumerate(kids):
            if not (isinstance(mod, nn.Conv2d) and mod.in_channels == mod.out_channels
                    and all(s == 1 for s in mod.stride)):
                continue
            names = [name]
            for nxt_name, nxt in kids[i + 1:i + 3]:
                if isinstance(nxt, _NORMS) and len(names) == 1 or isinstance(nxt, _ACTS):
                    names.append(nxt_name)
                    if isinstance(nxt, _ACTS):
                        break
                else:
                    break
            prefix = f"{seq_name}." if seq_name else ""
            units.append([prefix + n for n in names])
    return units


def unit_name(modules: list[str]) -> str:
    return modules[0] if len(modules) == 1 else "+".join(modules)


class UnitDivergence:
    """E||y - x|| / E||x|| for conv+norm+act runs: x enters the first module, y leaves the last."""

    def __init__(self, units: list[list[str]]) -> None:
        self.units = units
        self.sums: dict[str, list[float]] = {}
        self.batches = 0

    def attach(self, model: nn.Module) -> list:
        handles = []
        for unit in self.units:
            key, held = unit_name(unit), {}
            first, last = model.get_submodule(unit[0]), model.get_submodule(unit[-1])

            def pre(mod, inputs, held=held):
                held["x"] = inputs[0].detach().clone()

            def post(mod, inputs, output, key=key, held=held):
                x = held.pop("x", None)
                if x is not None and x.shape == output.shape:
                    s = self.sums.setdefault(key, [0.0, 0.0])
                    s[0] += float((output - x).flatten(1).norm(dim=1).sum())
                    s[1] += float(x.flatten(1).norm(dim=1).sum())

            handles += [first.register_forward_pre_hook(pre), last.register_forward_hook(post)]
        return handles

    def result(self) -> dict[str, float]:
        return {k: d / n for k, (d, n) in self.sums.items() if n > 0}


def _leaf_macs(model: nn.Module, rows: dict[str, Any]) -> dict[str, float]:
    macs = {}
    for name, mod in model.named_modules():
        out = rows.get(name, {}).get("out_shape")
        if out is None:
            continue
        numel = float(torch.tensor(out).prod())
        if isinstance(mod, nn.Conv2d):
            macs[name] = numel * mod.in_channels / mod.groups * mod.kernel_size[0] * mod.kernel_size[1]
        elif isinstance(mod, nn.Linear):
            macs[name] = numel * mod.in_features
    return macs


def find_candidates(model: nn.Module, rows: dict[str, Any], unit_div: dict[str, float],
                    min_macs_share: float) -> tuple[list[Block], dict[str, int]]:
    """Blocks that can become the identity, and a count of why other modules cannot."""
    leaf_macs = _leaf_macs(model, rows)
    total = sum(leaf_macs.values()) or 1.0
    why: Counter[str] = Counter()
    found: dict[str, Block] = {}
    for name, mod in model.named_modules():
        r = rows.get(name)
        if not name or r is None or not any(True for _ in mod.children()):
            continue
        if not any(p.numel() for p in mod.parameters()):
            continue
        if not r["single"]:
            why["takes or returns several tensors (concatenation, dense layer, attention)"] += 1
        elif r["calls"] != 1:
            why["runs more than once per forward"] += 1
        elif r["in_shape"] != r["out_shape"]:
            why["changes shape (downsampling or width change)"] += 1
        elif r["divergence"] is None:
            why["saw no input signal in calibration"] += 1
        elif not r["residual"]:
            why["keeps the shape but is not residual (y != x + f(x)): removing it is no identity"] += 1
        else:
            share = sum(v for k, v in leaf_macs.items() if k.startswith(name + ".")) / total
            found[name] = Block(name, [name], r["divergence"], share)
    unit_keys = set()
    for unit in conv_units(model):
        key = unit_name(unit)
        if key in unit_div and rows.get(unit[0], {}).get("calls") == 1:
            found[key] = Block(key, unit, unit_div[key], leaf_macs.get(unit[0], 0.0) / total)
            unit_keys.add(key)

    def inside(a: str, b: str) -> bool:  # module a is strictly inside block b
        return any(m.startswith(p + ".") for m in found[a].modules for p in found[b].modules)

    def maximal_inside(b: str) -> list[str]:
        within = [a for a in found if a != b and inside(a, b) and a not in unit_keys]
        return [a for a in within if not any(inside(a, c) for c in within if c != a)]

    # A residual module holding two or more separate residual blocks is a stage, not a block.
    containers = {b for b in found if len(maximal_inside(b)) >= 2}
    containers |= {b for b in found if any(inside(c, b) for c in containers)}
    if containers:
        why["holds several candidate blocks (a stage, not a block)"] += len(containers)
    kept = {b for b in found if b not in containers}
    nested = {a for a in kept if any(inside(a, b) for b in kept if b != a)}
    blocks = []
    for b in sorted(kept - nested):
        if found[b].macs_share < min_macs_share:
            why[f"under min_flops_share ({min_macs_share:g} of the model's MACs)"] += 1
        else:
            blocks.append(found[b])
    return blocks, dict(why)


def measure_blocks(model: nn.Module) -> tuple[BlockStats, UnitDivergence]:
    """Collectors for one calibration pass (see stages._flows.calibration_pass)."""
    return BlockStats(), UnitDivergence(conv_units(model))


def replace_with_identity(model: nn.Module, modules: list[str]) -> None:
    """Make a block the identity (`Skip`: its input, whatever else it is called with): its ops vanish from the
    graph."""
    for name in modules:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, Skip())
