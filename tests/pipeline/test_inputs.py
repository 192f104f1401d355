"""Every input of a stage is in its fingerprint, the plan says in words what changed, and a data folder is read once."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from PIL import Image

import stages  # noqa: F401 - registers the stages (their `off` rules)
from core._datafiles import describe_change, fingerprint, scan
from core.data import build_splits
from core.errors import UserInputError
from core.registry import PIPELINE
from core.rundir import RunDir, atomic_json
from pipeline import plan as plan_mod
from pipeline.config import validate_config
from pipeline.plan import make_plan
from tests.conftest import tiny_config


def image_folder(root: Path, classes: int = 2, per_class: int = 10) -> Path:
    for c in range(classes):
        folder = root / f"class{c}"
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            Image.new("RGB", (8, 8), (c * 100, i * 20, 50)).save(folder / f"{i}.png")
    return root


def folder_config(root: Path, **data):
    raw = tiny_config(model={"source": "timm", "name": "resnet18", "num_classes": 2, "in_chans": 3,
                             "input_size": [32, 32]},
                      data={"kind": "imagefolder", "root": str(root), "batch_size": 8, "eval_batch_size": 8, **data})
    return validate_config(raw, "test")


@pytest.fixture(autouse=True)
def _cache(tmp_path: Path, monkeypatch):
    monkeypatch.setenv("COMPRESS_CACHE_DIR", str(tmp_path / "cache"))


def finished_manifest(config, run_dir: RunDir, load_files: dict[str, str] | None = None) -> dict:
    """A manifest as if every planned stage had finished with the inputs recorded now."""
    manifest = {"stages": {}}
    for item in make_plan(config, run_dir, manifest, PIPELINE, None, None):
        manifest["stages"][item.name] = {"status": "done", "config_hash": item.config_hash, "inputs": item.inputs,
                                         "files": {}, "upstream": ""}
    manifest["stages"]["load"]["files"] = load_files or {}
    for i, name in enumerate(PIPELINE):
        manifest["stages"][name]["upstream"] = plan_mod.upstream_fingerprint(manifest, PIPELINE[:i])
    return manifest


def reasons(config, run_dir: RunDir, manifest: dict) -> dict[str, str]:
    return {p.name: p.describe() for p in make_plan(config, run_dir, manifest, PIPELINE, None, None)}


def test_a_folder_fingerprint_follows_added_removed_and_changed_files(tmp_path: Path):
    root = image_folder(tmp_path / "data")
    first = fingerprint(scan(root))
    assert first["files"] == 20 and first["by"] == "content"
    assert fingerprint(scan(root))["digest"] == first["digest"]
    # a fresh copy of the same files (new modification times) is the same data
    os.utime(root / "class0" / "0.png", (1, 1))
    assert fingerprint(scan(root))["digest"] == first["digest"]
    Image.new("RGB", (8, 8), (1, 2, 3)).save(root / "class0" / "0.png")  # same name and size, other pixels
    changed = fingerprint(scan(root))
    assert changed["digest"] != first["digest"]
    assert describe_change(first["entries"], changed["entries"]) == "data changed (1 file changed under data.root)"
    image_folder(root, classes=1, per_class=14)  # rewrites class0/0-9.png as they were first, adds 10-13.png
    (root / "class1" / "9.png").unlink()
    after = fingerprint(scan(root))
    assert describe_change(first["entries"], after["entries"]) == \
        "data changed (4 files added, 1 file removed under data.root)"


def test_plan_says_which_data_files_changed_and_reruns_from_load(tmp_path: Path):
    root = image_folder(tmp_path / "data")
    config = folder_config(root)
    rd = RunDir(tmp_path / "run")
    # the load stage records the listing beside its checkpoint (the runner writes it; here by hand)
    load_dir = rd.root / "00_load"
    load_dir.mkdir(parents=True)
    atomic_json(load_dir / plan_mod.DATA_FILES, fingerprint(scan(root))["entries"])
    manifest = finished_manifest(config, rd, rd.file_hashes([load_dir / plan_mod.DATA_FILES]))
    assert set(reasons(config, rd, manifest).values()) == {"reused"}
    image_folder(root, classes=2, per_class=30)  # 20 new images per class: 40 added
    got = reasons(config, rd, manifest)
    assert got["load"] == "re-runs: data changed (40 files added under data.root)"
    assert all(got[n] == "re-runs: upstream stage load re-runs" for n in PIPELINE[1:])


def test_a_library_upgrade_reruns_the_stages_that_use_it_and_says_so(tmp_path: Path, monkeypatch):
    config = validate_config(tiny_config(), "test")
    rd = RunDir(tmp_path / "run")
    manifest = finished_manifest(config, rd)
    assert set(reasons(config, rd, manifest).values()) == {"reused"}
    real = plan_mod.library_versions

    def upgraded(names):
        return {n: ("9.9.9" if n == "onnxruntime" else v) for n, v in real(names).items()}

    monkeypatch.setattr(plan_mod, "library_versions", upgraded)
    old = real(("onnxruntime",))["onnxruntime"]
    got = reasons(config, rd, manifest)
    assert {n: got[n] for n in PIPELINE[:6]} == {n: "reused" for n in PIPELINE[:6]}
    assert got["export"] == f"re-runs: onnxruntime {old} -> 9.9.9"
    assert got["validate"] == f"re-runs: onnxruntime {old} -> 9.9.9"
    # torch-pruning is filter_prune's: it and everything after it re-run, the earlier stages do not
    monkeypatch.setattr(plan_mod, "library_versions",
                        lambda names: {n: ("0.0.1" if n == "torch-pruning" else v) for n, v in real(names).items()})
    got = reasons(config, rd, manifest)
    assert got["calibrate"] == "reused" and got["filter_prune"].startswith("re-runs: torch-pruning ")
    assert got["finetune"] == "re-runs: upstream stage filter_prune re-runs"
    # this tool's own version is load's: everything re-runs
    monkeypatch.setattr(plan_mod, "library_versions",
                        lambda names: {n: ("0.0.0" if n == plan_mod.TOOL else v) for n, v in real(names).items()})
    assert reasons(config, rd, manifest)["load"].startswith(f"re-runs: {plan_mod.TOOL} ")


def test_a_speedup_target_makes_the_runtime_an_input_of_the_timed_stages(tmp_path: Path):
    macs = validate_config(tiny_config(), "test")
    timed = validate_config(tiny_config(filter_prune={"target_speedup": 2.0, "target_flops_reduction": None}),
                            "test")
    names = ("filter_prune", "layer_truncate")
    ins = {n: i for n, i in zip(PIPELINE, plan_mod.gather_inputs(timed, PIPELINE).per_stage, strict=True)}
    base = {n: i for n, i in zip(PIPELINE, plan_mod.gather_inputs(macs, PIPELINE).per_stage, strict=True)}
    for n in names:
        assert "onnxruntime" in ins[n]["versions"] and "onnxruntime" not in base[n]["versions"]


def test_a_fresh_run_says_first_run_and_a_disabled_stage_is_off(tmp_path: Path):
    config = validate_config(tiny_config(train={"enabled": False}, finetune={"max_epochs": 0}), "test")
    got = reasons(config, RunDir(tmp_path / "run"), {"stages": {}})
    assert got["train"] == "off: train.enabled is false"
    assert got["finetune"] == "off: finetune.max_epochs is 0"
    assert {got[n] for n in PIPELINE if n not in ("train", "finetune")} == {"runs: first run"}


def test_a_link_back_into_the_folder_is_a_loop_error_naming_it(tmp_path: Path):
    root = image_folder(tmp_path / "data")
    (root / "class0" / "again").symlink_to(".")
    with pytest.raises(UserInputError, match=r"again is a symbolic link to .*class0, a folder that contains it"):
        scan(root)
    with pytest.raises(UserInputError, match="a loop"):
        build_splits(folder_config(root))


def test_a_class_folder_that_links_to_itself_is_an_error_not_a_crash(tmp_path: Path):
    root = image_folder(tmp_path / "data")
    os.symlink("selfloop", root / "selfloop")  # ELOOP when followed
    with pytest.raises(UserInputError, match="selfloop is a symbolic link that points to itself"):
        scan(root)
    with pytest.raises(UserInputError, match="points to itself"):
        make_plan(folder_config(root), RunDir(tmp_path / "run"), {"stages": {}}, PIPELINE, None, None)


def test_each_image_is_read_once_and_never_in_both_splits(tmp_path: Path):
    root = image_folder(tmp_path / "data")
    (root / "class1" / "copy_of_0").symlink_to(root / "class0")  # a second way into a folder already listed
    os.link(root / "class1" / "0.png", root / "class1" / "hardlink.png")  # the same file twice
    found = scan(root)
    assert len(found.files) == 20 and sorted(found.repeated) == ["class1/copy_of_0", "class1/hardlink.png"]
    splits = build_splits(folder_config(root, val_fraction=0.3))
    train = {splits.train.dataset.samples[i][0] for i in splits.train.indices}
    val = {splits.validation.dataset.samples[i][0] for i in splits.validation.indices}
    assert len(train) + len(val) == 20 and not {os.path.realpath(p) for p in train} & \
        {os.path.realpath(p) for p in val}


def test_the_same_file_in_train_and_val_folders_is_refused(tmp_path: Path):
    root = tmp_path / "data"
    image_folder(root / "train")
    image_folder(root / "val", per_class=2)
    (root / "val" / "class0" / "leak.png").symlink_to(root / "train" / "class0" / "3.png")
    with pytest.raises(UserInputError, match="same file in"):
        build_splits(folder_config(root))
