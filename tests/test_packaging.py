"""Packaging: bounded dependencies, and the gpu extra as pip resolves it (a real `pip install --dry-run`)."""

from __future__ import annotations

import json
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

from tests.conftest import REPO

PROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]


def test_every_dependency_has_an_upper_bound():
    reqs = PROJECT["dependencies"] + [r for extra in PROJECT["optional-dependencies"].values() for r in extra]
    for text in reqs:
        req = Requirement(text)
        assert any(s.operator in ("<", "==", "~=") for s in req.specifier), f"{text} is not bounded"


def test_gpu_extra_resolves_to_tensorrt_10_and_a_compatible_onnxruntime_gpu(tmp_path: Path):
    """What `make install-gpu` installs: TensorRT 10.x (never 11) and an onnxruntime-gpu whose version is inside
    the base onnxruntime range, so that its files can stand in for the CPU wheel's (they share one folder)."""
    gpu = [Requirement(r) for r in PROJECT["optional-dependencies"]["gpu"]]
    report = tmp_path / "report.json"
    done = subprocess.run([sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--no-deps",
                           "--quiet", "--report", str(report), *[str(r) for r in gpu]],
                          capture_output=True, text=True, timeout=900)
    if done.returncode != 0 and any(w in done.stderr for w in ("NewConnectionError", "Temporary failure",
                                                               "Could not fetch URL", "ConnectTimeout")):
        pytest.skip(f"the package index is not reachable here: {done.stderr.strip().splitlines()[-1]}")
    assert done.returncode == 0, done.stderr[-2000:]
    resolved = {i["metadata"]["name"].lower(): Version(i["metadata"]["version"])
                for i in json.loads(report.read_text())["install"]}
    assert resolved["tensorrt"].major == 10
    base = next(Requirement(r) for r in PROJECT["dependencies"] if r.startswith("onnxruntime"))
    assert base.specifier.contains(resolved["onnxruntime-gpu"]), (resolved["onnxruntime-gpu"], base)


def test_torch_is_a_range_in_the_package_and_the_tested_pair_in_the_makefile():
    """The package installs beside any torch of the tested minor release; `make install` pins the exact pair
    that the tests ran with, and that pair lies inside the package's range."""
    import re

    ranges = {Requirement(r).name: Requirement(r).specifier for r in PROJECT["dependencies"]}
    make = (REPO / "Makefile").read_text()
    for name in ("torch", "torchvision"):
        assert not any(s.operator == "==" for s in ranges[name]), f"{name} is pinned exactly in the package"
        pinned = re.search(rf"\b{name}==([0-9.]+)", make)
        assert pinned and ranges[name].contains(pinned.group(1)), f"make install's {name} is outside the range"
