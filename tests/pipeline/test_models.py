"""Model building, weight loading, and the plain-data structure record that rebuilds pruned models."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch_pruning as tp

from core._weights import load_weights
from core.config import ModelConfig
from core.errors import UserInputError
from core.models import build_model, count_macs, rebuild, structure_of
from core.rundir import atomic_torch_save, load_checkpoint

SPEC = ModelConfig(source="timm", name="resnet18", num_classes=5, in_chans=1, input_size=(32, 32))


def _prune_some(model: torch.nn.Module) -> None:
    dg = tp.DependencyGraph().build_dependency(model, example_inputs=torch.zeros(1, 1, 32, 32))
    for conv, idxs in ((model.layer1[0].conv1, [0, 3, 5]), (model.layer3[1].conv1, list(range(40)))):
        dg.get_pruning_group(conv, tp.prune_conv_out_channels, idxs=idxs).prune()


def test_unknown_model_lists_close_names():
    with pytest.raises(UserInputError) as err:
        build_model(SPEC.model_copy(update={"name": "resnet-18"}))
    assert "resnet18" in str(err.value) and "not a timm architecture" in str(err.value)


def test_torchvision_in_chans_adapts_stem():
    spec = ModelConfig(source="torchvision", name="resnet18", num_classes=3, in_chans=1, input_size=(32, 32))
    out = build_model(spec)(torch.zeros(2, 1, 32, 32))
    assert out.shape == (2, 3)


def test_pruned_structure_round_trips_through_weights_only_checkpoint(tmp_path: Path):
    torch.manual_seed(0)
    model = build_model(SPEC).eval()
    _prune_some(model)
    x = torch.randn(3, 1, 32, 32)
    expected = model(x)
    atomic_torch_save(tmp_path / "c.pt", {"model": model.state_dict(), "structure": structure_of(model, SPEC)})
    ckpt = load_checkpoint(tmp_path / "c.pt")
    assert ckpt["structure"]["attrs"]["layer1.0.conv1"]["out_channels"] == 61
    again = rebuild(SPEC, ckpt["structure"], ckpt["model"]).eval()
    assert torch.equal(again(x), expected)
    assert count_macs(again, SPEC) == count_macs(model, SPEC)


def test_replaced_block_is_recorded_and_rebuilt():
    model = build_model(SPEC).eval()
    model.layer2[1] = torch.nn.Identity()
    structure = structure_of(model, SPEC)
    assert structure["replaced"] == {"layer2.1": "identity"}
    again = rebuild(SPEC, structure, model.state_dict())
    assert isinstance(again.layer2[1], torch.nn.Identity)


def test_weights_of_another_architecture_are_rejected(tmp_path: Path):
    other = ModelConfig(source="timm", name="resnet34", num_classes=5, in_chans=1)
    torch.save(build_model(other).state_dict(), tmp_path / "w.pt")
    with pytest.raises(UserInputError) as err:
        load_weights(build_model(SPEC), tmp_path / "w.pt", "timm:resnet18")
    msg = str(err.value)
    assert "does not fit timm:resnet18" in msg and "unexpected keys" in msg and "model.name" in msg


def test_checkpoint_wrappers_and_prefixes_are_unwrapped(tmp_path: Path):
    src = build_model(SPEC)
    state = {f"module.{k}": v for k, v in src.state_dict().items()}
    torch.save({"epoch": 3, "state_dict": state}, tmp_path / "w.pth")
    dst = build_model(SPEC)
    load_weights(dst, tmp_path / "w.pth", "x")
    assert all(torch.equal(a, b) for a, b in zip(src.state_dict().values(), dst.state_dict().values(), strict=True))


def test_unreadable_weights_file(tmp_path: Path):
    (tmp_path / "w.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(UserInputError, match="cannot be read"):
        load_weights(build_model(SPEC), tmp_path / "w.pt", "x")


def test_pretrained_without_cache_says_how_to_fix(monkeypatch, tmp_path: Path):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    spec = ModelConfig(source="torchvision", name="resnet18", num_classes=1000, pretrained=True)
    with pytest.raises(UserInputError, match="never downloads"):
        build_model(spec)


def test_timm_pretrained_never_reaches_the_network(monkeypatch, tmp_path: Path):
    import huggingface_hub.constants as hf
    import timm

    monkeypatch.setattr(hf, "HF_HUB_CACHE", str(tmp_path))
    seen, real = [], timm.create_model

    def spy(*args, **kwargs):
        seen.append(hf.HF_HUB_OFFLINE)
        return real(*args, **kwargs)

    monkeypatch.setattr(timm, "create_model", spy)
    offline_before = hf.HF_HUB_OFFLINE
    with pytest.raises(UserInputError, match="never downloads.*model.weights"):
        build_model(ModelConfig(source="timm", name="resnet18", pretrained=True))
    assert seen == [True], "the hub client must be in offline mode while pretrained weights are looked up"
    assert hf.HF_HUB_OFFLINE == offline_before
