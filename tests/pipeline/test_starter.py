"""`compress init`: a starter config with every key, at its default, that validates and dry-runs as written."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pipeline.cli import run
from pipeline.config import Config
from pipeline.starter import examples, render
from tests.conftest import REPO, run_cli
from tests.test_readme import _keys


def _flat(d: dict, prefix: str = "") -> set[str]:
    out = set()
    for k, v in d.items():
        out |= _flat(v, f"{prefix}{k}.") if isinstance(v, dict) and v else {prefix + k}
    return out


@pytest.mark.parametrize("model, data", [("timm:resnet50", "imagefolder:/data/imagenet"), ("torchvision:resnet18",
                                         "cifar10:/data/c10"), ("timm:vit_tiny_patch16_224", "demo"),
                                         ("mobilenetv3_large_100", "synthetic")])
def test_every_key_at_its_default_and_it_loads_back(model: str, data: str):
    text = render(model, data)
    raw = yaml.safe_load(text)
    assert _flat(raw) == set(_keys(Config)), "the starter lists every config key, no more"
    cfg = Config.model_validate(raw)
    fitted = {"train": {"enabled": True}} if data in ("demo", "digits") else {}  # bundled data: no weights to load
    default = Config.model_validate({"name": cfg.name, "model": raw["model"], "data": raw["data"], **fitted})
    assert cfg == default
    assert text.count("#") > 60, "keys carry their meaning as comments"


def test_init_writes_a_config_that_dry_runs(tmp_path: Path, capsys):
    out = tmp_path / "my.yaml"
    assert run(["init", "--model", "timm:resnet18", "--data", "demo", "--num-classes", "10", "--input-size", "32",
                "32", "--output", str(out)]) == 0
    assert run(["init", "--output", str(out)]) == 2, "init never overwrites a file"
    assert "already exists" in capsys.readouterr().err
    assert run(["pipeline", str(out), "--dry-run", "--run-dir", str(tmp_path / "r")]) == 0
    assert "config is valid" in capsys.readouterr().err
    assert not (tmp_path / "r").exists(), "a dry run writes nothing"


def test_shipped_examples_print_and_validate(capsys):
    assert set(examples()) >= {"demo", "resnet50"}
    assert run(["init", "--example", "demo"]) == 0
    assert yaml.safe_load(capsys.readouterr().out)["name"] == "demo"
    assert run(["init", "--example", "dmeo"]) == 2
    assert "Did you mean 'demo'" in capsys.readouterr().err


def test_bad_model_spec_is_a_usage_error():
    done = run_cli("init", "--model", "timm:resnet18", "--data", "nonsense", timeout=120)
    assert done.returncode == 2 and "data.kind" in done.stderr and "Traceback" not in done.stderr


@pytest.mark.slow
def test_init_and_dry_run_from_a_wheel_install_outside_the_repo(tmp_path: Path):
    """`pip install .` into a fresh venv (which sees this venv's dependencies), then use it from another folder."""
    import site
    import sysconfig

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    # the dependencies come from this environment (no download of torch); the project itself from the wheel
    where_lib = "import sysconfig; print(sysconfig.get_paths()['purelib'])"
    purelib = Path(subprocess.run([str(venv / "bin" / "python"), "-c", where_lib], capture_output=True, text=True,
                                  check=True).stdout.strip())
    (purelib / "zz_deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n" +
                                         "\n".join(site.getsitepackages()) + "\n")
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "--no-deps", "-q"]
    import shutil

    src = tmp_path / "src"  # a copy, so that the build leaves nothing in the repository
    src.mkdir()
    for part in ("pyproject.toml", "README.md", "pipeline", "stages", "export"):
        (shutil.copytree if (REPO / part).is_dir() else shutil.copy)(REPO / part, src / part)
    subprocess.run([*pip, str(src)], check=True, cwd=tmp_path)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    compress = str(venv / "bin" / "compress")
    where = tmp_path / "elsewhere"
    where.mkdir()
    probe = subprocess.run([str(venv / "bin" / "python"), "-c", "import pipeline; print(pipeline.__file__)"],
                           capture_output=True, text=True, cwd=where, env=env, check=True)
    assert str(REPO) not in probe.stdout and "site-packages" in probe.stdout, "the wheel's copy is used"
    with open(where / "my.yaml", "w") as f:
        subprocess.run([compress, "init", "--model", "timm:resnet18", "--data", "demo"], stdout=f, check=True,
                       cwd=where, env=env)
    done = subprocess.run([compress, "pipeline", "my.yaml", "--dry-run"], capture_output=True, text=True, cwd=where,
                          env=env)
    assert done.returncode == 0, done.stderr
    demo = subprocess.run([compress, "init", "--example", "demo"], capture_output=True, text=True, cwd=where, env=env)
    assert demo.returncode == 0 and "name: demo" in demo.stdout
