"""The slow architecture matrix (`pytest -m slow`, `make test-slow`): at least 25 models no issue named, each
through the stages to ONNX with parity and a weights-only reload (benchmarks/matrix.py; `make bench-matrix`
writes its table to BENCHMARKS.md)."""

from __future__ import annotations

from pathlib import Path

import pytest

from benchmarks.matrix import MATRIX, run_one


def test_the_matrix_is_wide_enough():
    assert len(MATRIX) >= 25 and len({name for _, name, _ in MATRIX}) == len(MATRIX)


@pytest.mark.slow
@pytest.mark.parametrize("source,name,size", MATRIX, ids=[f"{s}:{n}" for s, n, _ in MATRIX])
def test_model_finishes_with_parity_and_reload(source: str, name: str, size: int, tmp_path: Path):
    row = run_one(source, name, size, tmp_path)
    assert row["parity_rel"] <= 1e-4
    assert row["cut"] >= 0.5 - 0.02 or row["held"] > 0 or row["stop"].startswith("reached"), row
