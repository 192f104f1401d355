"""`make gpu-check` cannot pass by skipping: COMPRESS_REQUIRE_GPU=1 turns a gpu test's skip into a failure."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from export import tensorrt
from tests.conftest import REPO


def _pytest_gpu(require: bool) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("COMPRESS_REQUIRE_GPU", None)
    if require:
        env["COMPRESS_REQUIRE_GPU"] = "1"
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-rs", "-p", "no:cacheprovider",
                           "tests/gpu"], capture_output=True, text=True, cwd=REPO, env=env, timeout=300)


@pytest.mark.skipif(tensorrt.unavailable_reason() is None, reason="this machine has TensorRT and a GPU: the gpu "
                                                                     "tests run instead of skipping")
def test_gpu_tests_skip_with_reasons_and_fail_when_a_gpu_is_required():
    relaxed = _pytest_gpu(require=False)
    assert relaxed.returncode == 0 and "SKIPPED" in relaxed.stdout and "gpu extra" in relaxed.stdout
    strict = _pytest_gpu(require=True)
    assert strict.returncode != 0 and "COMPRESS_REQUIRE_GPU=1 but this gpu test would skip" in strict.stdout
