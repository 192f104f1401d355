"""The pre-flight structural check (`compress inspect CONFIG`, also run by `--dry-run`): in seconds, before any
data or training, what filter_prune and layer_truncate will find in this model, and a proof that pruning works.

It builds the model (random weights: structure does not depend on them), runs it once, traces its dependency
graph, lists the prunable groups and what is held whole and why (with the MACs it keeps), finds the blocks
layer truncation could remove, then removes a few units of every prunable group on a copy and checks that the
copy runs, exports to ONNX and agrees with PyTorch there. A model that would fail later fails here: exit 2 with
the class of problem.
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from core.errors import UserInputError, first_line
from pipeline.config import Config


@dataclass
class Inspection:
    """What the structural check found."""

    model: str
    input: str
    gflops: float
    params_m: float
    groups: list[dict[str, Any]] = field(default_factory=list)
    held: list[dict[str, Any]] = field(default_factory=list)
    candidates: list[dict[str, Any]] = field(default_factory=list)
    not_candidates: dict[str, int] = field(default_factory=dict)
    onnx: dict[str, Any] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)
    proof_cached: bool = False  # the proof came from the cache (a run or an inspect of the same structure made it)


def _fail(kind: str, what: str, fix: str) -> UserInputError:
    return UserInputError(f"pre-flight check failed ({kind}): {what}. {fix}")


def _onnx_check(model: nn.Module, example: torch.Tensor, config: Config) -> dict[str, Any]:
    """Export the trial-pruned copy and compare it with PyTorch on random inputs (relative to the logits)."""
    from export.runtime import OrtModel
    from export.torch2onnx import torch2onnx

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "check.onnx"
        cfg = config.export.model_copy(update={"dynamic_batch": False})
        torch2onnx(model, example, path, cfg, {})
        rt = OrtModel(path, threads=1)
        x = torch.randn(example.shape, generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            ref = model(x).numpy()
        diff = float(np.abs(rt(x.numpy()) - ref).max())
    return {"max_abs_diff": diff, "max_rel_diff": diff / max(float(np.abs(ref).max()), 1e-12)}


def inspect_model(config: Config, onnx: bool = True) -> Inspection:
    """Run the structural check on the config's model; UserInputError (exit 2) names the class of problem."""
    from core.models import build_model, count_macs
    from stages._blocks import find_candidates, measure_blocks
    from stages._graph import build_graph, in_attention
    from stages._pruning import classifier_layers, producers_of
    from stages._structure import Held, every_attention, fill_shares, groups_of_found, module_macs, prove, remove_spread

    spec = config.model
    seconds: dict[str, float] = {}
    t0 = time.perf_counter()
    torch.manual_seed(0)
    model = build_model(spec, with_weights=False).eval()
    example = torch.zeros(1, spec.in_chans, *spec.input_size)
    try:
        with torch.no_grad():
            out = model(torch.randn_like(example))
    except Exception as exc:  # noqa: BLE001
        raise _fail("forward", f"{spec.source}:{spec.name} does not run on an input of shape "
                    f"1x{spec.in_chans}x{spec.input_size[0]}x{spec.input_size[1]} ({first_line(exc)})",
                    "Set model.input_size and model.in_chans to what the model takes") from None
    logits = out if isinstance(out, torch.Tensor) else next((t for t in out if isinstance(t, torch.Tensor)), None)
    if logits is None or logits.dim() != 2 or logits.shape[1] != spec.num_classes:
        raise _fail("output", f"the model returns {getattr(logits, 'shape', type(out).__name__)}, not logits of "
                    f"shape (batch, {spec.num_classes})", "Only classifiers are compressed; set model.num_classes "
                    "to the model's output width")
    gflops, params = count_macs(model, spec)
    seconds["build"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    try:
        graph = build_graph(model, example)
    except Exception as exc:  # noqa: BLE001
        raise _fail("tracing", f"Torch-Pruning cannot trace {spec.source}:{spec.name} ({first_line(exc)})",
                    "Set filter_prune.enabled: false to only truncate and fine-tune it") from None
    ignored = classifier_layers(model, spec.num_classes, graph.output_layers)
    names = dict(model.named_modules())
    ignored += [names[n] for n in config.filter_prune.ignore if n in names]
    found, held = graph.groups(model, ignored, {})
    seconds["graph"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    groups_of = groups_of_found(model, found)  # once, for the proof and the ONNX check
    broken = prove(model, example, [f[0] for f in found], build_graph, groups_of=groups_of)
    proof_cached = prove.last_cached
    attention = every_attention(model)
    broken_alone = broken.held()  # a coupling's roots prune jointly: one group, listed under its residual root
    tied = {h for heads in broken.coupled.values() for h in heads}
    groups = []
    for name, module, _, group in found:
        layers = producers_of(graph, group, model)
        if name in broken_alone:
            held.append(Held(name, in_attention(layers, attention, f"removing some of its units breaks the model "
                                                                   f"({broken[name]})"), "breaks forward", layers))
        elif name in broken.coupled:
            heads = broken.coupled[name]
            groups.append({"root": name, "width": _heads_of(model, heads[0]), "layers": len(layers),
                           "kind": "heads+channels", "attentions": len(heads)})
        elif name not in tied:
            pruner = graph.get_pruner_of_module(module)
            groups.append({"root": name, "width": pruner.get_out_channels(module), "layers": len(layers),
                           "kind": "heads" if module in _head_roots(model) else "channels"})
    macs = module_macs(model, example)
    fill_shares(held, macs)
    seconds["proof"] = time.perf_counter() - t0
    result = Inspection(f"{spec.source}:{spec.name}", f"{spec.in_chans}x{spec.input_size[0]}x{spec.input_size[1]}",
                        gflops, params, groups, [h.record() for h in sorted(held, key=lambda h: -h.macs_share)])

    t0 = time.perf_counter()
    rows, unit_div = measure_blocks(model)
    handles = [h for c in (rows, unit_div) for h in c.attach(model)]
    try:
        with torch.no_grad():
            model(torch.randn(2, spec.in_chans, *spec.input_size, generator=torch.Generator().manual_seed(1)))
    finally:
        for h in handles:
            h.remove()
    rows.batches = unit_div.batches = 1
    rows.finish(model)
    blocks, why = find_candidates(model, rows.result(), unit_div.result(), config.layer_truncate.min_flops_share)
    result.candidates = [{"block": b.name, "macs_share": round(b.macs_share, 4)} for b in blocks]
    result.not_candidates = why
    seconds["blocks"] = time.perf_counter() - t0

    if onnx:
        # the model as pruning leaves it (a few units of every group removed), or as it is when nothing can be
        # pruned: either way the run ends by exporting it, and a model that cannot be exported must fail here,
        # not after training
        t0 = time.perf_counter()
        if groups:  # in place, through the graph traced above: nothing after this needs the full-width model, and
            # a copy traced again cost a deep copy and a trace per inspect
            remove_spread(model, graph, [g["root"] for g in groups], groups_of, broken.coupled)
        what = "the pruned model" if groups else "the model"
        try:
            result.onnx = _onnx_check(model, example, config)
        except Exception as exc:  # noqa: BLE001
            raise _fail("export", f"{what} does not export to ONNX ({first_line(exc)})",
                        "Try export.exporter: dynamo, or another export.opset; the model's forward must use "
                        "operations ONNX has") from None
        if result.onnx["max_rel_diff"] > 1e-4:
            raise _fail("export", f"{what}'s ONNX export differs from PyTorch by "
                        f"{result.onnx['max_rel_diff']:.1e} (relative)", "Try export.exporter: dynamo")
        seconds["onnx"] = time.perf_counter() - t0
    result.seconds = {k: round(v, 2) for k, v in seconds.items()}
    result.proof_cached = proof_cached
    return result


def _head_roots(model: nn.Module) -> list[nn.Module]:
    """The projections that root each head-prunable attention's group."""
    from stages._attention import attention_modules, layout

    return [layout(m).root for m in attention_modules(model).values()]


def _heads_of(model: nn.Module, root: str) -> int:
    """The head count of the attention whose head group is rooted at `root`."""
    from stages._attention import attention_modules, heads_of, layout

    projection = model.get_submodule(root)
    return next(heads_of(a) for a in attention_modules(model).values() if layout(a).root is projection)
