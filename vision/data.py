"""Datasets, transforms and deterministic, resumable loaders on timm's data factories.

Datasets come from `timm.data.create_dataset` (ImageFolder trees, torchvision datasets) and transforms from
`timm.data.create_transform` (RandomResizedCrop, RandAugment, random erasing). The loaders are our own because timm's
`create_loader` builds a `DistributedSampler` that cannot start in the middle of an epoch: here the sample order and
each sample's augmentation are a pure function of (seed, epoch, position), so a run resumed at step k sees exactly the
batches that an uninterrupted run sees.

Fashion-MNIST (the embedded default) is read from Debian's `dataset-fashion-mnist` (gzipped idx files under
/usr/share/datasets/fashion-mnist), unpacked once into `$PNET_DATA_DIR` (default `<repo>/data`) in the layout that
torchvision's `FashionMNIST` expects; without the package, torchvision downloads it when online.
"""

from __future__ import annotations

import gzip
import hashlib
import random
import shutil
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from timm.data import create_dataset, create_transform
from torch.utils.data import DataLoader, Dataset, Sampler

from runtime.errors import print_error
from runtime.fsutil import atomic_path
from runtime.paths import default_data_dir
from vision.config import TrainConfig

DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_FILES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)
FASHION_MNIST_CLASSES = (
    "t-shirt_top",
    "trouser",
    "pullover",
    "dress",
    "coat",
    "sandal",
    "shirt",
    "sneaker",
    "bag",
    "ankle_boot",
)
# Grayscale statistics of the Fashion-MNIST training set.
FASHION_MNIST_MEAN = (0.2860,)
FASHION_MNIST_STD = (0.3530,)
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff", ".gif")
_SPLIT_SYNONYMS = {
    "train": ("train", "training"),
    "validation": ("validation", "val", "valid", "eval", "evaluation", "test"),
}


def data_root() -> Path:
    return default_data_dir()


def prepare_fashion_mnist(root: Path | None = None, source: Path = DEBIAN_FASHION_MNIST) -> Path | None:
    """Unpack Debian's gzipped idx files into ROOT/FashionMNIST/raw/ (torchvision's layout); return ROOT.

    Returns None when the Debian package is not installed. Each file is unpacked to a temporary name and renamed, so
    an interrupted call never leaves a truncated file that torchvision would accept.
    """
    root = data_root() / "fashion-mnist" if root is None else root
    raw = root / "FashionMNIST" / "raw"
    if all((raw / name).is_file() for name in FASHION_MNIST_FILES):
        return root
    if not all((source / f"{name}.gz").is_file() for name in FASHION_MNIST_FILES):
        return None
    raw.mkdir(parents=True, exist_ok=True)
    for name in FASHION_MNIST_FILES:
        target = raw / name
        if target.is_file():
            continue
        # the umask's mode, not mkstemp's 0600 (a shared cache other users read)
        with atomic_path(target) as tmp, open(tmp, "wb") as out, gzip.open(source / f"{name}.gz", "rb") as src:
            shutil.copyfileobj(src, out)
    return root


def read_idx(path: Path) -> np.ndarray:
    """An idx file (optionally gzipped) as a uint8 array: images [N, 28, 28] or labels [N]."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as fh:
        data = fh.read()
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def write_image_folder(
    images: np.ndarray, labels: np.ndarray, out_dir: Path, class_names: Sequence[str], per_class: int
) -> Path:
    """Write the first `per_class` images of each class as PNGs into out_dir/<class>/ (an ImageFolder tree)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    for cls, name in enumerate(class_names):
        folder = out_dir / name
        folder.mkdir(exist_ok=True)
        for j, idx in enumerate(np.flatnonzero(labels == cls)[:per_class]):
            Image.fromarray(images[idx]).save(folder / f"{j:05d}.png")
    return out_dir


def resolve_split_dir(data_dir: str, split: str, field_name: str) -> Path:
    root = Path(data_dir)
    if not root.is_dir():
        raise FileNotFoundError(
            f"data_dir={data_dir!r} does not exist; point it at an ImageFolder root holding "
            f"{split}/<class>/<image> trees"
        )
    names = _SPLIT_SYNONYMS.get(split, (split,))
    for name in names:
        if (root / name).is_dir():
            return root / name
    tried = ", ".join(str(root / n) for n in names)
    raise FileNotFoundError(
        f"{field_name}={split!r}: no split folder under data_dir={data_dir!r} (tried {tried}); create it or set "
        f"--{field_name.replace('_', '-')} to the folder's name"
    )


def check_image_folder(split_dir: Path) -> list[str]:
    """The class names of an ImageFolder split; refuse empty trees and empty class folders.

    timm builds its class list from the images it finds, so an empty class folder would silently shift every later
    class index and mislabel the data.
    """
    classes = sorted(p.name for p in split_dir.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise ValueError(f"{split_dir}: no class folders; expected {split_dir}/<class name>/<images>")
    for name in classes:
        has_image = any(f.suffix.lower() in IMAGE_EXTENSIONS for f in (split_dir / name).rglob("*") if f.is_file())
        if not has_image:
            raise ValueError(
                f"{split_dir / name}: class folder '{name}' has no images ({', '.join(IMAGE_EXTENSIONS)}); "
                f"add images or remove the folder (an empty class would shift every later class index)"
            )
    return classes


@dataclass
class Splits:
    train: Dataset
    val: Dataset
    num_classes: int
    class_names: list[str]


def _class_names(ds: Any) -> list[str]:
    if hasattr(ds, "reader") and hasattr(ds.reader, "class_to_idx"):
        mapping = ds.reader.class_to_idx
        return [name for name, _ in sorted(mapping.items(), key=lambda kv: kv[1])]
    if hasattr(ds, "classes"):
        return [str(c) for c in ds.classes]
    raise ValueError(f"cannot read the class list of {type(ds).__name__}; set num_classes explicitly")


def build_datasets(cfg: TrainConfig) -> Splits:
    """Both splits through timm's dataset factory, with no transform attached (see `SeededTransformDataset`)."""
    if cfg.dataset == "folder":
        train_dir = resolve_split_dir(cfg.data_dir, cfg.train_split, "train_split")
        val_dir = resolve_split_dir(cfg.data_dir, cfg.val_split, "val_split")
        classes = check_image_folder(train_dir)
        val_classes = check_image_folder(val_dir)
        extra = sorted(set(val_classes) - set(classes))
        if extra:
            raise ValueError(f"{val_dir}: classes {extra} are not in the training split {train_dir}")
        class_map = {name: i for i, name in enumerate(classes)}
        img_mode = "L" if cfg.in_chans == 1 else "RGB"
        folder_args = dict(search_split=False, class_map=class_map, input_img_mode=img_mode)
        train = create_dataset("", root=str(train_dir), **folder_args)
        val = create_dataset("", root=str(val_dir), **folder_args)
        return Splits(train, val, len(classes), classes)

    root = cfg.data_dir
    download = False
    if cfg.dataset == "torch/fashion_mnist" and not root:
        prepared = prepare_fashion_mnist()
        if prepared is None:
            # No Debian package: let torchvision fetch it (needs network).
            root, download = str(data_root() / "fashion-mnist"), True
        else:
            root = str(prepared)
    elif not root:
        raise ValueError(f"data_dir is empty: dataset={cfg.dataset!r} needs data_dir=<torchvision root>")
    elif not Path(root).is_dir() and not download:
        raise FileNotFoundError(f"data_dir={root!r} does not exist (dataset={cfg.dataset!r})")
    try:
        train = create_dataset(cfg.dataset, root=root, split=cfg.train_split, download=download)
        val = create_dataset(cfg.dataset, root=root, split=cfg.val_split, download=download)
    except RuntimeError as err:
        hint = (
            "install Debian's dataset-fashion-mnist (bash scripts/install_system_data.sh) or go online"
            if cfg.dataset == "torch/fashion_mnist"
            else "download it into data_dir first"
        )
        raise FileNotFoundError(f"dataset={cfg.dataset!r} under data_dir={root!r}: {err}; {hint}") from err
    names = _class_names(train)
    return Splits(train, val, len(names), names)


def sample_seed(seed: int, epoch: int, position: int) -> int:
    """A 63-bit seed for one sample's augmentation, independent of rank, worker and batch layout."""
    digest = hashlib.blake2b(f"{seed}:{epoch}:{position}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


class UnreadableImage(ValueError):
    """An image file that PIL cannot decode (truncated, not an image): bad input, named by its path.

    Raised in a DataLoader worker, it reaches the trainer re-raised by torch with the worker's traceback as its
    message: the constructor keeps only our own line (the traceback's last)."""

    rank_specific = True  # met by the rank whose loader read the file: that rank prints it (runtime.errors.run_trainer)

    def __init__(self, message: str) -> None:
        if "Traceback" in message:
            message = message.strip().splitlines()[-1].split("UnreadableImage: ", 1)[-1]
        super().__init__(message)


class SeededTransformDataset(Dataset):
    """Applies a transform under RNGs seeded per sample, so augmentation does not depend on worker or history.

    Indexed by `(index, seed)` keys produced by the samplers below. An image file that cannot be decoded raises
    UnreadableImage naming it, or, with `skip_bad`, is replaced by the next readable image of the split and counted
    in `skipped` (shared with the loader's worker processes, which fork from this one).
    """

    def __init__(self, base: Dataset, transform: Any, img_mode: str, skip_bad: bool = False) -> None:
        import multiprocessing

        self.base = base
        self.transform = transform
        self.img_mode = img_mode
        self.skip_bad = skip_bad
        self.skipped = multiprocessing.Value("q", 0)
        if hasattr(base, "transform"):
            base.transform = None  # type: ignore[attr-defined]

    def __len__(self) -> int:
        return len(self.base)  # type: ignore[arg-type]

    def _load(self, index: int) -> tuple[Any, int]:
        """The image and target at `index`. An image folder is read here rather than by timm's dataset, which
        skips an unreadable file to its neighbour with a log line that does not name it."""
        reader = getattr(self.base, "reader", None)
        if reader is None or not hasattr(reader, "filename"):
            return self.base[index]  # type: ignore[index]  (torchvision datasets: decoded arrays in memory)
        for attempt in range(len(self)):
            position = (index + attempt) % len(self)
            handle, target = reader[position][:2]
            try:
                with Image.open(handle) as opened:
                    return opened.convert(self.img_mode), target  # convert decodes: a truncated file fails here
            # PIL: UnidentifiedImageError and "image file is truncated" are OSErrors, "broken PNG file" a SyntaxError
            except (OSError, SyntaxError) as err:
                path = reader.filename(position, absolute=True)
                if not self.skip_bad:
                    raise UnreadableImage(
                        f"{path}: unreadable image ({err}); replace or remove the file, or pass --skip_bad_images "
                        f"true to train without such images (counted in summary.json)"
                    ) from None
                with self.skipped.get_lock():
                    self.skipped.value += 1
                print_error(f"skipped unreadable image {path} ({err})", kind="warning", prog="vision.train")
            finally:
                if hasattr(handle, "close"):
                    handle.close()
        raise UnreadableImage(f"{getattr(reader, 'root', 'the split')}: no image of the split can be read")

    def __getitem__(self, key: tuple[int, int]) -> tuple[torch.Tensor, int]:
        index, seed = key
        img, target = self._load(index)
        if isinstance(img, Image.Image) and img.mode != self.img_mode:
            img = img.convert(self.img_mode)
        # Save and restore: with num_workers=0 this runs in the training process.
        py_state, np_state, torch_state = random.getstate(), np.random.get_state(), torch.get_rng_state()
        random.seed(seed)
        np.random.seed(seed % 2**32)
        torch.manual_seed(seed)
        try:
            return self.transform(img), int(target)
        finally:
            random.setstate(py_state)
            np.random.set_state(np_state)
            torch.set_rng_state(torch_state)


def subset_indices(n: int, subset: int, seed: int) -> np.ndarray:
    """All indices, or a fixed seeded subset of `subset` of them (in ascending order)."""
    if subset <= 0 or subset >= n:
        return np.arange(n)
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(n, size=subset, replace=False))


class TrainBatchSampler(Sampler[list[tuple[int, int]]]):
    """This rank's micro-batches for one epoch, from optimizer step `start_step` on.

    The epoch's order is a permutation seeded by (seed, epoch). Optimizer step s consumes positions
    [s*G, (s+1)*G) of it (G = global batch), laid out as accumulation micro-step a, rank r:
    offset (a * world + r) * micro. The last incomplete global batch is dropped.
    """

    def __init__(
        self,
        indices: np.ndarray,
        *,
        seed: int,
        epoch: int,
        micro_batch_size: int,
        world_size: int,
        rank: int,
        grad_accum: int,
        start_step: int = 0,
    ) -> None:
        self.indices = indices
        self.seed, self.epoch = seed, epoch
        self.micro, self.world, self.rank, self.accum = micro_batch_size, world_size, rank, grad_accum
        self.global_batch = micro_batch_size * world_size * grad_accum
        self.steps = len(indices) // self.global_batch
        self.start_step = start_step

    def __len__(self) -> int:
        return max(0, self.steps - self.start_step) * self.accum

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        gen = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        order = torch.randperm(len(self.indices), generator=gen).numpy()
        for step in range(self.start_step, self.steps):
            for micro_step in range(self.accum):
                start = step * self.global_batch + (micro_step * self.world + self.rank) * self.micro
                yield [
                    (int(self.indices[order[p]]), sample_seed(self.seed, self.epoch, p))
                    for p in range(start, start + self.micro)
                ]


class EvalBatchSampler(Sampler[list[tuple[int, int]]]):
    """Rank r evaluates indices r, r+world, ... exactly once (no padding, so counts summed over ranks are exact)."""

    def __init__(self, indices: np.ndarray, batch_size: int, world_size: int, rank: int) -> None:
        self.indices = indices[rank::world_size]
        self.batch_size = batch_size

    def __len__(self) -> int:
        return (len(self.indices) + self.batch_size - 1) // self.batch_size

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        for start in range(0, len(self.indices), self.batch_size):
            yield [(int(i), 0) for i in self.indices[start : start + self.batch_size]]


def resolve_mean_std(cfg: TrainConfig, model_cfg: dict[str, Any]) -> tuple[tuple[float, ...], tuple[float, ...]]:
    if cfg.mean is not None and cfg.std is not None:
        return tuple(cfg.mean), tuple(cfg.std)
    if cfg.dataset == "torch/fashion_mnist" and cfg.in_chans == 1:
        return FASHION_MNIST_MEAN, FASHION_MNIST_STD
    mean, std = tuple(model_cfg["mean"]), tuple(model_cfg["std"])
    if cfg.in_chans == 1:
        # Grayscale input: the mean of the RGB statistics.
        return (sum(mean) / 3,), (sum(std) / 3,)
    return mean, std


def build_transforms(cfg: TrainConfig, mean: tuple[float, ...], std: tuple[float, ...]) -> tuple[Any, Any]:
    size = (cfg.in_chans, cfg.img_size, cfg.img_size)
    train = create_transform(
        size,
        is_training=True,
        scale=tuple(cfg.scale),
        hflip=cfg.hflip,
        color_jitter=cfg.color_jitter,
        auto_augment=cfg.auto_augment,
        interpolation=cfg.interpolation,
        mean=mean,
        std=std,
        re_prob=cfg.re_prob,
        re_mode="pixel",
    )
    val = create_transform(
        size, is_training=False, interpolation=cfg.interpolation, mean=mean, std=std, crop_pct=cfg.crop_pct
    )
    return train, val


def make_loader(dataset: Dataset, batch_sampler: Sampler, num_workers: int) -> DataLoader:
    return DataLoader(
        dataset,
        batch_sampler=batch_sampler,
        num_workers=num_workers,
        persistent_workers=False,
        pin_memory=torch.cuda.is_available(),
    )
