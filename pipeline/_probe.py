"""One forward of the model before any work: does it take the data's images, does it return logits, and how much
memory will the stages need. Shared by the run's preflight, `--dry-run` and the Python API, so that they agree.

The model is built on the meta device (no memory, no arithmetic) and run on a meta batch of one image; the
outputs of its leaf modules give the activation memory one image costs. A model whose constructor or forward
needs real tensors is probed on the CPU instead.
"""

from __future__ import annotations

import os
import resource
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from core.config import ModelConfig
from core.errors import UserInputError
from pipeline.config import Config


def output_problem(out: Any, num_classes: int | None) -> str | None:
    """What is wrong with a forward's output for a classifier (one logits tensor [batch, classes]), with the fix;
    None when it is right. `num_classes` None: any width."""
    logits = getattr(out, "logits", None)
    if not isinstance(out, torch.Tensor) and isinstance(logits, torch.Tensor):
        return (f"the model's forward returns a {type(out).__name__} (a Hugging Face-style output object), not a "
                f"logits tensor; wrap it so that forward returns its `.logits`: "
                f"`def forward(self, x): return self.model(x).logits`")
    if isinstance(out, tuple | list):
        shapes = ", ".join(str(tuple(o.shape)) if isinstance(o, torch.Tensor) else type(o).__name__ for o in out)
        return (f"the model's forward returns a {type(out).__name__} of {len(out)} ({shapes}), not one logits "
                f"tensor; wrap it so that forward returns the logits alone, e.g. `return self.model(x)[0]`")
    if isinstance(out, dict):
        return (f"the model's forward returns a dict with keys {', '.join(map(str, list(out)[:6]))}, not a logits "
                f"tensor; wrap it so that forward returns the logits alone, e.g. `return self.model(x)['logits']`")
    if not isinstance(out, torch.Tensor):
        return f"the model's forward returns a {type(out).__name__}, not a logits tensor [batch, classes]"
    if out.dim() != 2:
        return (f"the model's forward returns a tensor of shape {tuple(out.shape)} for a batch of one; a classifier "
                f"returns logits of shape [batch, classes] (add pooling and a linear head)")
    if num_classes is not None and out.shape[1] != num_classes:
        return (f"the model returns {out.shape[1]} logits per image but model.num_classes is {num_classes}; set "
                f"model.num_classes: {out.shape[1]}, or give the model a head of {num_classes} outputs")
    return None


@dataclass
class Probe:
    """What one forward of a batch of one image told: the output problem (or None), the activation bytes one
    image costs (leaf modules' outputs), and the parameter bytes."""

    problem: str | None
    activation_bytes: int
    parameter_bytes: int


def _leaf_outputs(model: nn.Module) -> tuple[list[int], list[Any]]:
    sizes: list[int] = []

    def hook(_m, _i, out):
        for t in (out if isinstance(out, tuple | list) else (out,)):
            if isinstance(t, torch.Tensor):
                sizes.append(t.numel() * t.element_size())

    handles = [m.register_forward_hook(hook) for m in model.modules() if not list(m.children())]
    return sizes, handles


def probe(spec: ModelConfig) -> Probe:
    """Run the model built from `spec` on one image of the configured shape (meta device, else CPU)."""
    from core.models import build_model

    def run(device: str) -> Probe:
        with torch.device(device):
            model = build_model(spec, with_weights=False).eval()
        sizes, handles = _leaf_outputs(model)
        x = torch.zeros(1, spec.in_chans, *spec.input_size, device=device)
        try:
            with torch.no_grad():
                out = model(x)
        finally:
            for h in handles:
                h.remove()
        params = sum(p.numel() * p.element_size() for p in model.parameters())
        return Probe(output_problem(out, spec.num_classes), sum(sizes), params)

    try:
        return run("meta")
    except UserInputError:
        raise
    except Exception:  # noqa: BLE001 - an op without a meta kernel: probe for real (seconds on the CPU)
        pass
    try:
        return run("cpu")
    except UserInputError:
        raise
    except Exception as exc:  # noqa: BLE001 - the user's model failing on the configured input is bad input
        text = str(exc).strip().splitlines()
        return Probe(f"the model does not run on one {spec.in_chans}x{spec.input_size[0]}x{spec.input_size[1]} "
                     f"image (model.in_chans x model.input_size): {type(exc).__name__}: "
                     f"{text[0][:300] if text else ''}. Set model.in_chans and model.input_size to what the model "
                     f"takes", 0, 0)


def available_memory(device: str) -> tuple[int, str] | None:
    """Bytes a run can still allocate on `device` and where that limit comes from; None when unknown."""
    if device == "cuda" and torch.cuda.is_available():
        free, _ = torch.cuda.mem_get_info()
        return int(free), f"free memory of {torch.cuda.get_device_name()}"
    found: list[tuple[int, str]] = []
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                found.append((int(line.split()[1]) * 1024, "available memory (MemAvailable)"))
    except (OSError, ValueError, IndexError):
        pass
    soft, _ = resource.getrlimit(resource.RLIMIT_AS)
    if soft != resource.RLIM_INFINITY:
        try:
            used = int(Path(f"/proc/{os.getpid()}/statm").read_text().split()[0]) * os.sysconf("SC_PAGE_SIZE")
        except (OSError, ValueError, IndexError):
            used = 0
        found.append((max(soft - used, 0), "the address-space limit (ulimit -v)"))
    return min(found) if found else None


def _samples(config: Config) -> int | None:
    """How many images an in-memory dataset holds (demo, digits, synthetic), else None."""
    return {"demo": 5000, "digits": 1797, "synthetic": config.data.synthetic_samples}.get(config.data.kind)


def memory_problems(config: Config, found: Probe, device: str) -> list[str]:
    """Settings whose memory the machine cannot hold, each with the figure needed, the figure free and the setting
    to lower. Estimates are lower bounds (one copy of each activation), so nothing that fits is refused."""
    have = available_memory(device)
    if have is None:
        return []
    free, source = have
    spec, data = config.model, config.data
    size = f"{spec.in_chans}x{spec.input_size[0]}x{spec.input_size[1]}"
    out = []
    n = _samples(config)
    if n is not None:
        need = n * spec.in_chans * spec.input_size[0] * spec.input_size[1] * 4
        if need > free:
            out.append(f"data.kind {data.kind} holds its {n} images in memory at model.input_size {size}: "
                       f"{need / 1e9:,.1f} GB, more than the {free / 1e9:,.1f} GB of {source}; lower "
                       f"model.input_size")
    if found.activation_bytes:
        batch = max(data.batch_size, data.eval_batch_size, config.calibrate.batch_size)
        # training keeps about half of the leaf outputs for the backward pass (in-place activations and views
        # keep none); weights, gradients, momentum and the teacher: four copies of the parameters
        need = batch * found.activation_bytes // 2 + 4 * found.parameter_bytes
        if need > free:
            which = "data.batch_size" if data.batch_size == batch else \
                ("data.eval_batch_size" if data.eval_batch_size == batch else "calibrate.batch_size")
            out.append(f"a batch of {batch} images of {size} needs at least {need / 1e9:,.1f} GB on {device} "
                       f"({found.activation_bytes / 2e6:,.1f} MB of activations per image), more than the "
                       f"{free / 1e9:,.1f} GB of {source}; lower {which} (now {batch}) or model.input_size")
    return out


def out_of_memory(exc: BaseException, stage: str, config: Config) -> UserInputError | None:
    """A stage's allocation failure as bad input (exit 2) naming the stage, the size asked for and the settings to
    lower; None when `exc` is not an allocation failure."""
    text = str(exc)
    oom = isinstance(exc, MemoryError) or type(exc).__name__ == "OutOfMemoryError" or (
        isinstance(exc, RuntimeError) and ("can't allocate memory" in text or "out of memory" in text.lower()))
    if not oom:
        return None
    import re

    asked = re.search(r"allocate (\d+) bytes", text) or re.search(r"allocate ([\d.]+ [KMGT]i?B)", text)
    need = ""
    if asked:
        value = asked.group(1)
        need = f" (it asked for {int(value) / 1e9:,.1f} GB)" if value.isdigit() else f" (it asked for {value})"
    d = config.data
    return UserInputError(f"stage {stage} ran out of memory{need}; lower data.batch_size (now {d.batch_size}), "
                          f"data.eval_batch_size (now {d.eval_batch_size}) or model.input_size (now "
                          f"{list(config.model.input_size)}), or run on a machine with more memory. Every finished "
                          f"stage is intact; the same command resumes")
