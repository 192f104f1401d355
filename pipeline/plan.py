"""The plan of a run: which stages to reuse, run or leave, and why, from every input each stage's result depends on.

A stage's inputs are its config sections, the versions of the libraries its result depends on (this tool's
included), and for `load` the content of the files the config only names (weights, factory file, the data folder
or the bundled data's package). Each stage's fingerprint chains its own inputs onto its upstream stages', so a
change re-runs that stage and every later one. The inputs are recorded in the manifest with each finished stage,
so that the next plan can say in words what changed ("re-runs: onnxruntime 1.32.0 -> 1.33.0").
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from importlib import metadata
from typing import Any

from rich.console import Console
from rich.table import Table

from core.config import section_hash
from core.errors import UserInputError, did_you_mean
from core.rundir import RunDir
from pipeline.config import Config

TOOL = "idap-compress"
DATA_FILES = "data_files.json"  # the load stage's listing of the data folder, for the next plan's "what changed"

# The distributions whose behaviour a stage's result depends on (beyond torch, which every stage uses). A change
# of version re-runs the stage and every later one; this tool's own version re-runs everything (it is `load`'s).
LIBRARIES: dict[str, tuple[str, ...]] = {
    "load": (TOOL, "torch", "torchvision", "timm", "numpy", "pillow"),
    "train": ("torch",),
    "calibrate": ("torch",),
    "filter_prune": ("torch", "torch-pruning"),
    "layer_truncate": ("torch", "torch-pruning"),
    "finetune": ("torch",),
    "export": ("torch", "onnx", "onnxscript", "onnxruntime", "onnxruntime-gpu"),
    "validate": ("onnx", "onnxruntime", "onnxruntime-gpu", "numpy"),
}
# Measured latency steers these stages under a speedup target: the runtime that times it is one of their inputs.
_TIMED = ("filter_prune", "layer_truncate")
_RUNTIME_LIBS = ("onnx", "onnxruntime", "onnxruntime-gpu")


def library_versions(names: tuple[str, ...]) -> dict[str, str | None]:
    """Installed version of each distribution (None when it is not installed)."""
    out: dict[str, str | None] = {}
    for name in names:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


@dataclass
class PlanItem:
    """What the runner will do with one stage and why.

    `action` is "run", "skip" (reuse the checkpoint), "off" (the config switches the stage off: it only records
    that) or "stop" (after --until); `reason` says why in words, `first` whether the stage never ran here.
    """

    index: int
    name: str
    config_hash: str
    action: str
    reason: str
    inputs: dict[str, Any] = field(default_factory=dict)
    first: bool = False
    data_entries: dict[str, str] | None = None  # load's: the data folder's listing, recorded beside its checkpoint

    @property
    def verb(self) -> str:
        return {"skip": "reused", "off": "off", "stop": "stops"}.get(self.action,
                                                                     "runs" if self.first else "re-runs")

    def describe(self) -> str:
        """'re-runs: data changed (40 files added under data.root)', 'reused', 'runs: first run'."""
        return self.verb if self.action == "skip" else f"{self.verb}: {self.reason}"


@dataclass
class Inputs:
    """Every stage's recorded inputs and chained fingerprints, and the data folder's file listing."""

    per_stage: list[dict[str, Any]]
    hashes: list[str]
    data_entries: dict[str, str] | None


def _off(config: Config, name: str) -> str | None:
    """Why the config switches a stage off, or None."""
    from core.context import STAGES

    cls = STAGES.get(name) if name in STAGES else None
    off = getattr(cls, "off", None)
    return off(config) if off else None


def gather_inputs(config: Config, names: list[str]) -> Inputs:
    """Each stage's inputs (config sections, library versions, named files' content) and the chained hashes."""
    from core.data import data_fingerprint
    from core.models import fingerprint

    engine = "off"
    if config.export.tensorrt.mode != "off":
        from export.tensorrt import engine_fingerprint

        # an engine is rebuilt when TensorRT appears, disappears, is upgraded, or the GPU model changes
        engine = engine_fingerprint()
    data = data_fingerprint(config)
    entries = data.pop("entries", None)
    timed = config.filter_prune.target_speedup is not None
    from export.target import describe

    # where the artifact is scored and timed (runtime, hardware, threads, TF32), resolved on this machine: a
    # timing stage and validate re-run when it changes (another GPU, ONNX Runtime's CUDA provider installed)
    target = {k: v for k, v in describe(config).items() if k != "why"}
    sections = {"load": {"seed": config.seed, "model": config.model, "data": config.data},
                "filter_prune": {"filter_prune": config.filter_prune, "recovery": config.recovery},
                "export": {"export": config.export},
                "validate": {"validate": config.validate_, "runtime.device": config.runtime.device}}
    per_stage, hashes, prev = [], [], ""
    for name in names:
        own_sections = sections.get(name, {name: config.section(name)})
        libs = LIBRARIES.get(name, ("torch",)) + (_RUNTIME_LIBS if timed and name in _TIMED else ())
        if name == "load" and config.model.source == "huggingface":
            libs += ("transformers",)  # it builds the model
        inputs: dict[str, Any] = {
            "config": {k: section_hash(v) for k, v in own_sections.items()},
            "versions": library_versions(tuple(dict.fromkeys(libs))),
        }
        if name == "load":
            inputs.update(files=fingerprint(config.model), data=data)
        if name == "export":
            inputs["engine"] = engine
            if engine != "off":
                inputs["tf32"] = config.runtime.tf32
        if name == "validate" or (timed and name in _TIMED):
            inputs["target"] = target
        prev = section_hash(prev, inputs)
        per_stage.append(inputs)
        hashes.append(prev)
    return Inputs(per_stage, hashes, entries)


def stage_hashes(config: Config, names: list[str]) -> list[str]:
    """Chained fingerprints: a stage's own inputs plus everything upstream."""
    return gather_inputs(config, names).hashes


def upstream_fingerprint(manifest: dict[str, Any], upstream: list[str]) -> str:
    """Identity of the upstream stages' outputs (their files' sha256), recorded with each finished stage."""
    return section_hash([manifest["stages"].get(n, {}).get("files", {}) for n in upstream])


def _previous_listing(run_dir: RunDir, entry: dict[str, Any]) -> dict[str, str] | None:
    for rel in entry.get("files", {}):
        if rel.endswith("/" + DATA_FILES):
            try:
                return json.loads((run_dir.root / rel).read_text())
            except (OSError, ValueError):
                return None
    return None


def what_changed(before: dict[str, Any], now: dict[str, Any], run_dir: RunDir, entry: dict[str, Any],
                 data_entries: dict[str, str] | None) -> list[str]:
    """A stage's own inputs that differ from those recorded when it last finished, in words."""
    from core._datafiles import describe_change

    out = []
    changed = sorted(k for k in now["config"].keys() | before.get("config", {}).keys()
                     if now["config"].get(k) != before.get("config", {}).get(k))
    if changed:
        out.append(f"config changed ({', '.join(changed)})")
    old_v = before.get("versions", {})
    for lib, v in now["versions"].items():
        if lib in old_v and old_v[lib] != v:
            out.append(f"{lib} {old_v[lib] or 'not installed'} -> {v or 'not installed'}")
    new_libs = sorted(lib for lib in now["versions"] if lib not in old_v and now["versions"][lib])
    if new_libs and old_v:
        out.append(f"now depends on {', '.join(new_libs)}")
    if "data" in now and before.get("data") != now["data"]:
        old, new = before.get("data") or {}, now["data"]
        if old.get("digest") and new.get("digest") and data_entries is not None:
            out.append(describe_change(_previous_listing(run_dir, entry), data_entries))
        else:
            out.append("data changed")
    if "files" in now and before.get("files") != now["files"]:
        keys = sorted(k for k in now["files"].keys() | before.get("files", {}).keys()
                      if now["files"].get(k) != before.get("files", {}).get(k))
        names = {"weights": "model.weights", "factory": "the model factory's file", "module": "the model object"}
        out.append(f"{' and '.join(names.get(k, k) for k in keys)} changed")
    if "target" in now and before.get("target") != now["target"]:
        old, new = before.get("target") or {}, now["target"]
        diff = [f"{k} {old.get(k)} -> {new.get(k)}" for k in sorted(new.keys() | old.keys())
                if old.get(k) != new.get(k)]
        out.append(f"deployment target changed ({', '.join(diff)})")
    if "tf32" in now and before.get("tf32") != now["tf32"]:
        out.append(f"runtime.tf32 {before.get('tf32')} -> {now['tf32']}")
    if "engine" in now and before.get("engine") != now["engine"]:
        out.append(f"TensorRT or the GPU changed ({before.get('engine')} -> {now['engine']})")
    return out


def make_plan(config: Config, run_dir: RunDir, manifest: dict[str, Any], names: list[str],
              start: str | None, until: str | None) -> list[PlanItem]:
    """Decide per stage: reuse the checkpoint, run it, or stop before it, and say why."""
    for flag, value in (("--from", start), ("--until", until)):
        if value is not None and value not in names:
            raise UserInputError(f"{flag} {value!r} is not a stage.{did_you_mean(value, names)} "
                                 f"Stages in order: {', '.join(names)}.")
    start_i = names.index(start) if start else len(names)
    until_i = names.index(until) if until else len(names) - 1
    if start and until and start_i > until_i:
        raise UserInputError(f"--from {start} comes after --until {until}; stages run in the order "
                             f"{', '.join(names)}")
    inputs = gather_inputs(config, names)
    plan: list[PlanItem] = []
    rerun: str | None = None  # the first upstream stage that (re-)runs
    for i, name in enumerate(names):
        h, own = inputs.hashes[i], inputs.per_stage[i]
        entry = manifest["stages"].get(name)
        item = PlanItem(i, name, h, "run", "", own, first=entry is None,
                        data_entries=inputs.data_entries if name == "load" else None)
        if i > until_i:
            item.action, item.reason = "stop", f"after --until {until}"
            plan.append(item)
            continue
        if entry is None:
            item.reason = "first run"
        elif i >= start_i:
            item.reason = f"forced by --from {start}"
        elif entry.get("status") not in ("done", "skipped", "outdated"):
            item.reason = f"previous attempt ended as {entry.get('status')!r}"
        else:
            changes = what_changed(entry["inputs"], own, run_dir, entry, inputs.data_entries) \
                if "inputs" in entry else ([] if entry.get("config_hash") == h else
                                           ["recorded by an older version of this tool"])
            if changes:
                item.reason = "; ".join(changes)
            elif rerun:
                item.reason = f"upstream stage {rerun} re-runs"
            elif entry.get("status") == "outdated":
                item.reason = f"a re-run started at {entry.get('outdated_since')} did not finish it"
            elif entry.get("config_hash") != h:
                item.reason = "its inputs changed"
            elif entry.get("upstream") != upstream_fingerprint(manifest, names[:i]):
                item.reason = "an upstream checkpoint changed after it ran"
            else:
                bad = run_dir.corrupted_files(entry)
                if bad:
                    raise UserInputError(
                        f"checkpoint files of finished stage {name!r} are missing or do not match their recorded "
                        f"sha256: {', '.join(bad)} (damaged or edited outside the tool). Nothing was changed. "
                        f"Re-run with --from {name} to recompute it and every later stage."
                    )
                item.action, item.reason = "skip", f"{entry['status']}, unchanged"
                plan.append(item)
                continue
        off = _off(config, name)
        if off:
            item.action, item.reason = "off", off
        rerun = rerun or name
        plan.append(item)
    return plan


def print_plan(console: Console, plan: list[PlanItem], run_dir: RunDir) -> None:
    table = Table(title=f"plan for {run_dir.root}")
    for col in ("#", "stage", "action", "why"):
        table.add_column(col)
    for p in plan:
        table.add_row(str(p.index), p.name, p.verb, "" if p.action == "skip" else p.reason)
    console.print(table)
