"""Where an architecture comes from: timm or torchvision by name, a Hugging Face checkpoint folder, the user's own
factory, or a module object.

`model.source: python` imports the user's own code on purpose (`model.name: path/to/file.py:callable` or
`package.module:callable`); `module` is what the Python API registers for a model object it was given. Each
source is a builder `(spec, pretrained) -> nn.Module` in SOURCES.
"""

from __future__ import annotations

import copy
import hashlib
import importlib
import importlib.util
import inspect
import sys
import traceback
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from core import _hf
from core._weights import load_weights
from core.config import ModelConfig, default_input_size
from core.errors import UserInputError, did_you_mean
from core.registry import Registry

Builder = Callable[[ModelConfig, bool], nn.Module]
SOURCES: Registry[Builder] = Registry("model source")
# Model objects handed to the Python API, by the key it puts in model.name (their class and architecture hash).
MODULES: Registry[nn.Module] = Registry("in-memory model")
_IMPORTED: dict[tuple[str, int], Any] = {}  # (file, mtime) -> module: a factory file is executed once per edit


def known_models(source: str) -> list[str]:
    """Architecture names the source can build by name."""
    if source == "timm":
        import timm

        return timm.list_models()
    if source == "torchvision":
        import torchvision

        return torchvision.models.list_models()
    return []


def check_model_name(spec: ModelConfig) -> None:
    """Raise UserInputError when the architecture cannot be found (close names listed)."""
    if spec.source == "python":
        resolve_factory(spec.name)
        return
    if spec.source == "huggingface":
        _hf.folder(spec.name)
        return
    if spec.source == "module":
        if spec.name not in MODULES:
            raise UserInputError(f"model.source 'module' names a model object given to the Python API "
                                 f"(`from pipeline import compress`); {spec.name!r} is not one in this process. "
                                 f"From YAML, use model.source: python with a factory file:callable")
        return
    names = known_models(spec.source)
    if spec.name not in names:
        raise UserInputError(
            f"model.name {spec.name!r} is not a {spec.source} architecture.{did_you_mean(spec.name, names)} "
            f"Set model.name to one of {spec.source}'s names (model.source: timm | torchvision | python)."
        )


# ------------------------------------------------------------------------------------------- user factories


def _split(name: str) -> tuple[str, str]:
    target, sep, attr = name.rpartition(":")
    if not sep or not target or not attr.isidentifier():
        raise UserInputError(f"model.name {name!r} is not a factory: with model.source: python it is "
                             f"path/to/file.py:callable or package.module:callable, e.g. mynet.py:build")
    return target, attr


def factory_file(name: str) -> Path | None:
    """The source file a python-source model.name points at (for fingerprints), or None."""
    target, _ = _split(name)
    if target.endswith(".py"):
        return Path(target).resolve()
    spec = importlib.util.find_spec(target) if _importable(target) else None
    return Path(spec.origin) if spec is not None and spec.origin else None


def _importable(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def _user_error(what: str, exc: BaseException, fix: str) -> UserInputError:
    """An error in the user's code, with the place in their file (not ours) where it happened."""
    frames = [f for f in traceback.extract_tb(exc.__traceback__) if "site-packages" not in f.filename
              and "/pipeline/" not in f.filename]
    where = f" ({frames[-1].filename}, line {frames[-1].lineno})" if frames else ""
    line = getattr(exc, "lineno", None) if isinstance(exc, SyntaxError) else None
    if line and not where:
        where = f" ({exc.filename}, line {line})"
    return UserInputError(f"{what} raised {type(exc).__name__}: {exc}{where}. {fix}")


def _import_file(path: Path) -> Any:
    if not path.is_file():
        raise UserInputError(f"model.name points at {str(path)!r}, which does not exist; paths are relative to the "
                             f"current folder ({Path.cwd()})")
    key = (str(path), path.stat().st_mtime_ns)
    if key in _IMPORTED:
        return _IMPORTED[key]
    mod_name = "compress_user_" + hashlib.sha256(str(path).encode()).hexdigest()[:12]
    spec = importlib.util.spec_from_file_location(mod_name, path)
    module = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(path.parent))  # the factory's own sibling imports work, as when run as a script
    sys.modules[mod_name] = module
    try:
        spec.loader.exec_module(module)
    except Exception as exc:  # noqa: BLE001 - anything the user's file raises on import is their input's fault
        sys.modules.pop(mod_name, None)
        raise _user_error(f"importing {path}", exc, "Fix the file (it is imported because model.source is "
                          "python), or check that its own imports are installed") from None
    finally:
        sys.path.remove(str(path.parent))
    _IMPORTED[key] = module
    return module


def resolve_factory(name: str) -> Callable[..., Any]:
    """The callable a python-source model.name names, imported on purpose from the user's code."""
    target, attr = _split(name)
    if target.endswith(".py"):
        module = _import_file(Path(target).resolve())
    else:
        try:
            module = importlib.import_module(target)
        except Exception as exc:  # noqa: BLE001
            raise _user_error(f"importing module {target!r}", exc, "Check that it is installed or on PYTHONPATH, "
                              "or give a file path: path/to/file.py:callable") from None
    factory = getattr(module, attr, None)
    if not callable(factory):
        names = [n for n, v in vars(module).items() if callable(v) and not n.startswith("_")]
        raise UserInputError(f"{target} has no callable {attr!r}.{did_you_mean(attr, names)} model.name is "
                             f"{target}:<callable returning an nn.Module>; callables there: "
                             f"{', '.join(sorted(names)[:12]) or 'none'}")
    return factory


@SOURCES.register("python")
def _python(spec: ModelConfig, pretrained: bool) -> nn.Module:
    if pretrained:
        raise UserInputError("model.pretrained applies to timm and torchvision names; with model.source: python "
                             "load your weights with model.weights (a state dict file)")
    factory = resolve_factory(spec.name)
    try:
        model = factory(**spec.kwargs)
    except Exception as exc:  # noqa: BLE001
        sig = ""
        try:
            sig = f" (its signature: {spec.name.rpartition(':')[2]}{inspect.signature(factory)})"
        except (TypeError, ValueError):
            pass
        raise _user_error(f"the factory {spec.name} called with model.kwargs {spec.kwargs}", exc,
                          f"Fix model.kwargs or the factory{sig}") from None
    if not isinstance(model, nn.Module):
        raise UserInputError(f"the factory {spec.name} returned {type(model).__name__}, not a torch.nn.Module; it "
                             f"must build and return the model (weights come from model.weights)")
    return model


@SOURCES.register("module")
def _module(spec: ModelConfig, pretrained: bool) -> nn.Module:
    check_model_name(spec)
    return copy.deepcopy(MODULES.get(spec.name))


# ------------------------------------------------------------------------------------------- model zoos


@SOURCES.register("timm")
def _timm(spec: ModelConfig, pretrained: bool) -> nn.Module:
    if not pretrained:
        return _create_timm(spec, False)
    import huggingface_hub.constants as hf

    # Pretrained weights come from the local cache only: never let the hub client reach the network.
    saved = hf.HF_HUB_OFFLINE
    hf.HF_HUB_OFFLINE = True
    try:
        return _create_timm(spec, True)
    finally:
        hf.HF_HUB_OFFLINE = saved


def _create_timm(spec: ModelConfig, pretrained: bool) -> nn.Module:
    """timm's factory; models with a fixed token grid (ViT and kin) are built for model.input_size."""
    import timm

    kwargs: dict[str, Any] = {"num_classes": spec.num_classes, "in_chans": spec.in_chans, **spec.kwargs}
    if tuple(spec.input_size) != default_input_size("timm", spec.name) and "img_size" not in kwargs:
        try:
            return timm.create_model(spec.name, pretrained=pretrained, img_size=tuple(spec.input_size), **kwargs)
        except TypeError as exc:
            if "img_size" not in str(exc):
                raise  # a convolutional model takes any input size and has no img_size argument
    return timm.create_model(spec.name, pretrained=pretrained, **kwargs)


@SOURCES.register("torchvision")
def _torchvision(spec: ModelConfig, pretrained: bool) -> nn.Module:
    import torchvision

    kwargs: dict[str, Any] = {"num_classes": spec.num_classes, **spec.kwargs}
    with warnings.catch_warnings():
        # Inception/GoogLeNet warn that their default initialisation will change; the current one is used
        warnings.filterwarnings("ignore", message=".*init_weights.*", category=FutureWarning)
        if pretrained:
            from torch.hub import get_dir

            weights = torchvision.models.get_model_weights(spec.name).DEFAULT
            cached = Path(get_dir()) / "checkpoints" / Path(weights.url).name
            if not cached.is_file():
                raise OSError(f"{cached} not found")
            model = torchvision.models.get_model(spec.name, weights=None, **kwargs)
            load_weights(model, cached, f"torchvision:{spec.name}")
        else:
            model = _torchvision_sized(spec, kwargs)
    if spec.in_chans != 3:
        _adapt_first_conv(model, spec.in_chans)
    return model


def _torchvision_sized(spec: ModelConfig, kwargs: dict[str, Any]) -> nn.Module:
    """torchvision's builder; models whose position embeddings depend on the input (ViT) get its size."""
    import torchvision

    size = tuple(spec.input_size)
    if size != default_input_size("torchvision", spec.name) and "image_size" not in kwargs:
        if size[0] == size[1]:
            try:
                return torchvision.models.get_model(spec.name, weights=None, image_size=size[0], **kwargs)
            except TypeError as exc:
                if "image_size" not in str(exc):
                    raise
    return torchvision.models.get_model(spec.name, weights=None, **kwargs)


def _adapt_first_conv(model: nn.Module, in_chans: int) -> None:
    """torchvision has no in_chans argument: replace the stem conv's input width."""
    for name, mod in model.named_modules():
        if isinstance(mod, nn.Conv2d) and mod.in_channels == 3:
            new = nn.Conv2d(in_chans, mod.out_channels, mod.kernel_size, mod.stride, mod.padding,
                            mod.dilation, mod.groups, mod.bias is not None)
            parent = model.get_submodule(name.rpartition(".")[0]) if "." in name else model
            setattr(parent, name.rpartition(".")[2], new)
            return
    raise UserInputError(f"cannot set in_chans={in_chans}: no 3-channel input conv found in the model")


# ------------------------------------------------------------------------------------------- Hugging Face


class HuggingFaceLogits(nn.Module):
    """A transformers image classifier as the pipeline sees a model: pixels in, logits out. The classifier stays
    whole under `.model`."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.model(pixel_values=pixel_values, return_dict=True).logits


@SOURCES.register("huggingface")
def _huggingface(spec: ModelConfig, pretrained: bool) -> nn.Module:
    """The image classifier of the checkpoint folder `spec.name` (AutoModelForImageClassification), its weights
    loaded when `pretrained` (the default when the folder holds weights), else initialised from its config.
    model.kwargs override config entries; a model.num_classes other than the config's gives a new classifier
    head (fine-tune it)."""
    try:
        import transformers
    except ImportError:
        raise UserInputError(f"model.source: huggingface needs transformers, which is not installed: "
                             f"{_hf.INSTALL}") from None
    root = _hf.folder(spec.name)
    stated = _hf.defaults(spec.name)
    if stated.get("in_chans", spec.in_chans) != spec.in_chans:
        raise UserInputError(f"model.in_chans is {spec.in_chans} but {root / 'config.json'} says num_channels "
                             f"{stated['in_chans']}; leave model.in_chans unset (it is read from the config)")
    overrides = dict(spec.kwargs)
    new_head = spec.num_classes != stated.get("num_classes", spec.num_classes)
    if new_head:
        overrides["num_labels"] = spec.num_classes
    if pretrained and not any((root / f).is_file() for f in _hf.WEIGHT_FILES):
        raise UserInputError(f"{root} holds no weights ({' or '.join(_hf.WEIGHT_FILES[::2])}); write them with "
                             f"save_pretrained, or set model.pretrained: false to compress it at random init")
    auto = transformers.AutoModelForImageClassification
    try:
        config = transformers.AutoConfig.from_pretrained(root, local_files_only=True, **overrides)
        if pretrained:
            model = auto.from_pretrained(root, config=config, local_files_only=True,
                                         ignore_mismatched_sizes=new_head)
        else:
            model = auto.from_config(config)
    except ValueError as exc:
        raise UserInputError(f"transformers cannot build an image classifier from {root}: {exc}. "
                             f"model.source: huggingface takes what AutoModelForImageClassification builds "
                             f"(ViT, DeiT, BEiT, Swin, ConvNeXt, ResNet, MobileViT, EfficientNet, ...)") from None
    return HuggingFaceLogits(model.eval())
