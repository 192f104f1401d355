"""Config parsing and validation: every example config, and each kind of bad input."""

from __future__ import annotations

from pathlib import Path

import pytest

from core.errors import UserInputError
from pipeline.config import load_config
from pipeline.plan import stage_hashes
from stages import PIPELINE
from tests.conftest import REPO, tiny_config, write_config

EXAMPLES = sorted((REPO / "configs").glob("*.yaml"))


def test_examples_exist():
    names = {p.name for p in EXAMPLES}
    assert {"demo.yaml", "resnet50.yaml"} <= names


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_every_example_config_validates(path: Path):
    cfg = load_config(path)
    assert cfg.name
    # every stage has a section and a hash
    assert len(set(stage_hashes(cfg, PIPELINE))) == len(PIPELINE)


def test_malformed_yaml_reports_line(tmp_path: Path):
    p = tmp_path / "bad.yaml"
    p.write_text("name: x\nmodel:\n  name: resnet18\n   source: timm\n")
    with pytest.raises(UserInputError, match=r"malformed YAML at line \d+"):
        load_config(p)


def test_unknown_key_suggests_the_right_one(tmp_path: Path):
    cfg = tiny_config(filter_prune={"critrion": "l1"})
    with pytest.raises(UserInputError) as err:
        load_config(write_config(tmp_path / "c.yaml", cfg))
    assert "filter_prune.critrion: unknown key" in str(err.value)
    assert "Did you mean 'criterion'" in str(err.value)


def test_all_errors_are_reported_together(tmp_path: Path):
    cfg = tiny_config(filter_prune={"target_flops_reduction": 1.5, "round_to": 0}, data={"batchsize": 3})
    with pytest.raises(UserInputError) as err:
        load_config(write_config(tmp_path / "c.yaml", cfg))
    msg = str(err.value)
    assert "3 problem(s)" in msg
    assert "filter_prune.target_flops_reduction" in msg and "less than 1" in msg
    assert "filter_prune.round_to" in msg
    assert "Did you mean 'batch_size'" in msg


def test_overrides_apply_and_validate(tmp_path: Path):
    p = write_config(tmp_path / "c.yaml", tiny_config())
    cfg = load_config(p, ["finetune.max_epochs=7", "filter_prune.criterion=l2"])
    assert cfg.finetune.max_epochs == 7 and cfg.filter_prune.criterion == "l2"
    with pytest.raises(UserInputError, match="a.b=value"):
        load_config(p, ["finetune.max_epochs"])
    with pytest.raises(UserInputError, match="finetune.max_epochs"):
        load_config(p, ["finetune.max_epochs=-1"])


def test_dataset_root_required_for_folder_kinds(tmp_path: Path):
    cfg = tiny_config(data={"kind": "cifar10"})
    with pytest.raises(UserInputError, match="data.root is required"):
        load_config(write_config(tmp_path / "c.yaml", cfg))


def test_hash_chain_changes_downstream_only(tmp_path: Path):
    a = load_config(write_config(tmp_path / "a.yaml", tiny_config()))
    b = load_config(write_config(tmp_path / "b.yaml", tiny_config(finetune={"max_epochs": 2})))
    ha, hb = stage_hashes(a, PIPELINE), stage_hashes(b, PIPELINE)
    i = PIPELINE.index("finetune")
    assert ha[:i] == hb[:i]
    assert all(x != y for x, y in zip(ha[i:], hb[i:], strict=True))
    c = load_config(write_config(tmp_path / "c.yaml", tiny_config(runtime={"progress": True, "threads": 1})))
    assert stage_hashes(c, PIPELINE) == ha, "runtime settings must not invalidate checkpoints"
