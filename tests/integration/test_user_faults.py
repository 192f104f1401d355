"""Failures a user can cause end with exit 2 and the right fix, in the real run as in --dry-run, through the CLI and
the Python API; a closed terminal is handled like SIGTERM; a model whose blocks take keyword arguments compresses."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.data import Dataset, TensorDataset

from core.errors import UserInputError
from tests.conftest import REPO, run_cli, run_here, tiny_config, write_config
from tests.integration.test_faults import expect

FACTORIES = '''
import torch
from torch import nn


class Net(nn.Module):
    """A small CNN; `out` picks what forward returns."""

    def __init__(self, out="tensor", num_classes=4, in_chans=1, fail_above=0):
        super().__init__()
        self.out, self.fail_above = out, fail_above
        self.body = nn.Sequential(nn.Conv2d(in_chans, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                                  nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Linear(16, num_classes)

    def forward(self, x):
        if self.fail_above and x.shape[0] > self.fail_above:
            raise RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory: "
                               "you tried to allocate 335544320000 bytes. Error code 12 (Cannot allocate memory)")
        logits = self.head(self.body(x))
        if self.out == "tuple":
            return logits, self.body(x)
        if self.out == "dict":
            return {"logits": logits}
        return logits


class Block(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.conv = nn.Conv2d(dim, dim, 3, padding=1)
        self.bn = nn.BatchNorm2d(dim)

    def forward(self, x, scale=None, *, shift=0.0):
        return x + torch.relu(self.bn(self.conv(x))) * scale + shift


class KwargNet(nn.Module):
    """Blocks called with keyword arguments, as transformer blocks are given `rope=` or masks."""

    def __init__(self, num_classes=4, in_chans=1):
        super().__init__()
        self.stem = nn.Conv2d(in_chans, 32, 3, padding=1)
        self.blocks = nn.ModuleList(Block(32) for _ in range(4))
        self.head = nn.Linear(32, num_classes)

    def forward(self, x):
        x = self.stem(x)
        scale = torch.ones(1, device=x.device)
        for blk in self.blocks:
            x = blk(x, scale=scale, shift=0.0)
        return self.head(x.mean((2, 3)))


def tuple_net(num_classes=4, in_chans=1):
    return Net("tuple", num_classes, in_chans)


def dict_net(num_classes=4, in_chans=1):
    return Net("dict", num_classes, in_chans)


def oom_net(num_classes=4, in_chans=1):
    return Net("tensor", num_classes, in_chans, fail_above=8)


def kwarg_net(num_classes=4, in_chans=1):
    return KwargNet(num_classes, in_chans)
'''


@pytest.fixture
def factory(tmp_path: Path) -> Path:
    path = tmp_path / "nets.py"
    path.write_text(FACTORIES)
    return path


def own(tmp_path: Path, factory: Path, fn: str, **sections) -> Path:
    return write_config(tmp_path / f"{fn}.yaml", tiny_config(
        model={"source": "python", "name": f"{factory}:{fn}", "num_classes": 4, "in_chans": 1,
               "input_size": [32, 32]}, **sections))


def both(config: Path, tmp_path: Path, code: int, *needles: str) -> None:
    """The dry run and the real run refuse alike: the same exit code and message, and no traceback."""
    for extra in (["--dry-run"], []):
        expect(run_here("pipeline", str(config), "--run-dir", str(tmp_path / "run"), *extra), code, *needles)


@pytest.mark.parametrize("fn, needle", [("tuple_net", "returns a tuple of 2"),
                                        ("dict_net", "returns a dict with keys logits")])
def test_a_model_that_returns_a_tuple_or_dict_is_exit_2_in_the_run_as_in_the_dry_run(tmp_path, factory, fn,
                                                                                    needle):
    both(own(tmp_path, factory, fn), tmp_path, 2, needle, "wrap it so that forward returns the logits alone")


def test_a_dangling_symlink_run_directory_is_exit_2(tmp_path: Path):
    config = write_config(tmp_path / "c.yaml", tiny_config())
    (tmp_path / "run").symlink_to(tmp_path / "nowhere")
    both(config, tmp_path, 2, "is a symbolic link to", "which does not exist")


@pytest.mark.parametrize("override, needle", [
    ("model.input_size=[4096,4096]", "lower model.input_size"),
    ("data.batch_size=100000", "lower data.batch_size (now 100000)"),
])
def test_settings_the_machine_cannot_hold_are_refused_before_any_work(tmp_path: Path, override: str, needle: str):
    config = write_config(tmp_path / "c.yaml", tiny_config(
        model={"source": "timm", "name": "resnet18", "num_classes": 10, "in_chans": 1, "input_size": [224, 224]},
        data={"kind": "demo"}))
    for extra in (["--dry-run"], []):
        expect(run_here("pipeline", str(config), "--run-dir", str(tmp_path / "run"), "--set", override, *extra), 2,
               needle, "GB")
    assert not (tmp_path / "run" / "00_load").exists(), "refused before any stage"


def test_a_stage_that_runs_out_of_memory_is_exit_2_naming_the_stage_and_settings(tmp_path, factory):
    done = run_here("pipeline", str(own(tmp_path, factory, "oom_net", train={"enabled": False})), "--run-dir",
                   str(tmp_path / "run"))
    expect(done, 2, "ran out of memory (it asked for 335.5 GB)", "lower data.batch_size (now 32)",
           "the same command resumes")


def test_blocks_called_with_keyword_arguments_are_truncated_and_exported(tmp_path, factory):
    config = own(tmp_path, factory, "kwarg_net", layer_truncate={"max_layers": 2, "min_flops_share": 0.0,
                                                                 "max_accuracy_drop": 100.0})
    done = run_here("pipeline", str(config), "--run-dir", str(tmp_path / "run"))
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["removed_blocks"], "a block called with scale= and shift= was removed"
    assert summary["gates"]["passed"]


def test_when_the_torchscript_exporter_fails_auto_falls_back_and_names_both_causes(tmp_path: Path, monkeypatch):
    import export.torch2onnx as T
    from export.config import ExportConfig

    model, x = nn.Sequential(nn.Conv2d(1, 4, 3), nn.Flatten(), nn.LazyLinear(3)), torch.zeros(1, 1, 8, 8)
    model(x)

    def fails(*_a, **_k):
        raise TypeError("Identity.forward() got an unexpected keyword argument 'rope'")

    monkeypatch.setattr(T, "_torchscript", fails)
    proto = T.torch2onnx(model, x, tmp_path / "m.onnx", ExportConfig(exporter="auto"), {})
    assert {p.key: p.value for p in proto.metadata_props}["exporter"] == "dynamo"
    monkeypatch.setattr(T, "_dynamo", lambda *_a, **_k: (_ for _ in ()).throw(ValueError("no meta kernel")))
    with pytest.raises(UserInputError, match="torchscript failed with TypeError: Identity.forward.*dynamo "
                                             r"\(torch.export\) failed with ValueError: no meta kernel"):
        T.torch2onnx(model, x, tmp_path / "m.onnx", ExportConfig(exporter="auto"), {})


def test_export_gives_the_callers_model_back_as_it_was(tmp_path: Path):
    from export.config import ExportConfig
    from export.torch2onnx import torch2onnx

    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(144, 3)).train()
    model[1].eval()  # a frozen norm inside a training model
    before = {k: v.clone() for k, v in model.state_dict().items()}
    torch2onnx(model, torch.zeros(1, 1, 8, 8), tmp_path / "m.onnx", ExportConfig(), {})
    assert model.training and not model[1].training and model[0].training
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_sighup_stops_like_sigterm_and_the_run_resumes(tmp_path: Path):
    config = write_config(tmp_path / "c.yaml", tiny_config(finetune={"max_epochs": 40}))
    run = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "pipeline.cli", "pipeline", str(config), "--run-dir", str(run)],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        end = time.monotonic() + 300
        while time.monotonic() < end and proc.poll() is None:
            log = run / "log.txt"
            if log.is_file() and "finetune epoch 1/40" in log.read_text():
                break
            time.sleep(0.02)
        proc.send_signal(signal.SIGHUP)
        out, _ = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 129, out[-3000:]
    assert "stopped by SIGHUP" in out
    entry = json.loads((run / "manifest.json").read_text())["stages"]["finetune"]
    assert entry["status"] == "interrupted" and entry["signal"] == "SIGHUP"
    resumed = run_cli("pipeline", str(config), "--run-dir", str(run), "--set", "finetune.max_epochs=1")
    assert resumed.returncode == 0, resumed.stderr[-3000:]


@pytest.mark.parametrize("weights, needle", [("folder", "is a folder; point it at the weights file inside it"),
                                             ("/dev/zero", "is not a regular file")])
def test_weights_that_are_not_a_file_say_what_they_are(tmp_path: Path, weights: str, needle: str):
    path = str(tmp_path) if weights == "folder" else weights
    config = write_config(tmp_path / "c.yaml", tiny_config(train={"enabled": False}))
    expect(run_here("pipeline", str(config), "--dry-run", "--run-dir", str(tmp_path / "run"),
                   "--set", f"model.weights={path}"), 2, needle)


def test_a_huge_config_file_is_refused_at_once(tmp_path: Path):
    big = tmp_path / "big.yaml"
    with big.open("w") as f:
        f.write("name: big\nnotes:\n")
        f.writelines(f"  - item {i} with some text to make the file large\n" for i in range(1_000_000))
    t0 = time.monotonic()
    expect(run_here("pipeline", str(big), "--dry-run"), 2, "a config is a few KB", "Is it the right file?")
    assert time.monotonic() - t0 < 60  # was three minutes of parsing before it could say anything


def test_a_batch_larger_than_the_data_warns(tmp_path: Path):
    config = write_config(tmp_path / "c.yaml", tiny_config(data={"batch_size": 500}))
    done = run_here("pipeline", str(config), "--dry-run", "--run-dir", str(tmp_path / "run"))
    expect(done, 0, "WARNING: data.batch_size 500 is larger than the 154 training images")


def test_an_untrained_model_warns_and_an_accuracy_gate_refuses_it(tmp_path: Path):
    config = write_config(tmp_path / "c.yaml", tiny_config(train={"enabled": False}))
    done = run_here("pipeline", str(config), "--dry-run", "--run-dir", str(tmp_path / "run"))
    expect(done, 0, "WARNING: model timm:resnet18 has no weights", "randomly initialised network")
    gated = write_config(tmp_path / "g.yaml", tiny_config(train={"enabled": False},
                                                          validate={"gates": {"max_top1_drop": 1.0}}))
    both(gated, tmp_path, 2, "validate.gates.max_top1_drop would judge it")


def test_init_writes_a_config_that_fits_the_data_it_names(tmp_path: Path):
    done = run_here("init", "--model", "torchvision:resnet18", "--data", "demo")
    assert done.returncode == 0, done.stderr
    path = tmp_path / "starter.yaml"
    path.write_text(done.stdout)
    import yaml

    raw = yaml.safe_load(done.stdout)
    assert raw["model"]["num_classes"] == 10 and raw["model"]["in_chans"] == 1
    assert raw["model"]["input_size"] == [32, 32] and raw["train"]["enabled"] is True
    dry = run_here("pipeline", str(path), "--dry-run", "--run-dir", str(tmp_path / "run"))
    assert dry.returncode == 0 and "WARNING" not in dry.stderr, dry.stderr[-2000:]


def test_the_api_names_the_fix_for_tuple_outputs_and_takes_items_with_extras(tmp_path: Path):
    from pipeline import compress

    class Tuple(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                                     nn.Flatten(), nn.Linear(8, 4))

        def forward(self, x):
            return self.net(x), x

    g = torch.Generator().manual_seed(0)
    images, labels = torch.randn(64, 1, 16, 16, generator=g), torch.randint(0, 4, (64,), generator=g)
    data = TensorDataset(images, labels)
    with pytest.raises(UserInputError, match=r"returns a tuple of 2 .* wrap it so that forward returns the logits"):
        compress(Tuple(), data, data, tmp_path / "a")

    class WithIds(Dataset):
        def __len__(self):
            return 64

        def __getitem__(self, i):
            return images[i], int(labels[i]), f"id-{i}"

    result = compress(Tuple().net, WithIds(), WithIds(), tmp_path / "b", overrides={
        "filter_prune.steps": 1, "layer_truncate.enabled": False, "finetune.max_epochs": 0,
        "validate.runs": 5, "validate.block_seconds": 0.01, "runtime.progress": False})
    assert result.summary["gates"]["passed"]


def test_an_api_interrupt_says_to_call_compress_again(tmp_path: Path, monkeypatch):
    import pipeline.runner as R
    from pipeline import compress
    from pipeline.signals import Interrupted

    def stopped(*_a, **_k):
        raise Interrupted(signal.SIGINT)

    monkeypatch.setattr(R, "run_pipeline", stopped)
    data = TensorDataset(torch.randn(16, 1, 8, 8), torch.randint(0, 2, (16,)))
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 2))
    with pytest.raises(Interrupted, match=r"Call compress\(\.\.\.\) again with run_dir=") as info:
        compress(model, data, data, tmp_path / "run")
    assert "same command" not in str(info.value) and info.value.exit_code == 130


UNEXPORTABLE = '''
import torch
from torch import nn


class Net(nn.Module):
    """Nothing to prune (the only layer is the classifier) and an operation ONNX has no counterpart for."""

    def __init__(self, num_classes=4):
        super().__init__()
        self.head = nn.Linear(8, num_classes)

    def forward(self, x):
        return self.head(torch.linalg.svdvals(x.mean(1))[:, :8])


def build(num_classes=4):
    return Net(num_classes)
'''


def test_a_model_that_cannot_be_exported_is_refused_before_training_even_with_nothing_to_prune(tmp_path: Path):
    """The pre-flight export check ran only when prunable groups existed: such a model passed `compress inspect`
    and --dry-run, trained, and failed at export. Now both refuse it at once with exit 2."""
    (tmp_path / "unexportable.py").write_text(UNEXPORTABLE)
    cfg = write_config(tmp_path / "c.yaml", tiny_config(
        model={"source": "python", "name": "unexportable.py:build", "num_classes": 4, "in_chans": 1,
               "input_size": [16, 16]}))
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        for args in (["inspect", str(cfg)], ["pipeline", str(cfg), "--dry-run"]):
            res = run_here(*args)
            err = " ".join(res.stderr.split())
            assert res.returncode == 2, (args, err[-1500:])
            assert "pre-flight check failed (export): the model does not export to ONNX" in err
            assert "\x1b[" not in res.stderr, "no terminal colour codes from the exporter's message"
        assert not (tmp_path / "runs").exists()
    finally:
        os.chdir(cwd)
