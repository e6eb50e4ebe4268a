"""One data dispatcher for every dataset: MNIST, CIFAR-10 and any ImageFolder (folder or .tar.gz).

Small sets are decoded once into uint8 tensors (cached on disk) and served by an in-memory loader that
normalizes and augments whole batches in torch: decoding 60,000 JPEGs per run would dominate a prune.
Large folders are streamed (folder.py). Both kinds answer `batches`, `subset` and `calibration_set`.
"""
from __future__ import annotations

import functools
import hashlib
import json
import os
import warnings
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F

from .folders import LABELS, FolderSet, decode_all, labelled, load_folder_streamed, should_stream
from .preprocess import DATASET_NORMALIZATION as NORMALIZATION
from .preprocess import IMAGENET_MEAN, IMAGENET_STD, Preprocess, is_tensor_file, normalize
from ..utils import UserError, atomic_save, cache_root, load_tensors, tensor_digest

DATASETS = ("mnist", "cifar10")
# what --dataset takes, for the messages that ask for one
DATASET_CHOICES = f"{', '.join(DATASETS)}, the path of an ImageFolder folder or .tar.gz with train/ and val/ (or " \
    "test/) subfolders, or a tensor file (.pt) of model inputs"
JPEG_NOTE = "CIFAR-10 JPEG re-encoding (cifar10-jpeg): accuracies are close to, not equal to, canonical CIFAR-10"


@dataclass
class ImageSet:
    images: torch.Tensor  # uint8 (N, C, H, W)
    labels: torch.Tensor  # int64 (N,)
    mean: tuple  # normalization
    std: tuple
    source: str  # where the pixels came from, for reports
    augment: str = "none"  # 'crop-flip' for CIFAR-style training augmentation
    classes: list | None = None  # class names, label i is classes[i] (image folders)

    def __len__(self) -> int:
        return len(self.labels)

    storage: str = "memory"  # decoded uint8 tensors in memory (vs 'streamed' from files, folder.py)

    @property
    def num_classes(self) -> int:
        return int(self.labels.max()) + 1 if len(self.labels) else 0

    @property
    def labelled(self) -> bool:
        return labelled(self.labels)

    def subset(self, idx: torch.Tensor, source: str | None = None) -> ImageSet:
        return replace(self, images=self.images[idx], labels=self.labels[idx], source=source or self.source)

    def batches(self, batch_size: int, device, indices: torch.Tensor | None = None, **kw):
        """(normalized float images, labels) on `device`; kw: shuffle, augment, seed, channels_last."""
        return iter(Loader(self, batch_size, device=device, indices=indices, **kw))

    def loader(self, batch_size: int, device, seed: int = 0, channels_last: bool = False) -> Loader:
        """Training batches: shuffled and augmented, one seeded generator across epochs."""
        return Loader(self, batch_size, shuffle=True, augment=True, seed=seed, device=device,
                      channels_last=channels_last)

    def serve(self, x: torch.Tensor) -> torch.Tensor:
        """A batch of stored images as the model takes them: normalized floats."""
        return normalize(x, self.mean, self.std)


@dataclass
class TensorSet(ImageSet):
    """Model inputs stored as tensors (`--dataset FILE.pt`): 1-D signals, spectrograms, volumes, or images already
    preprocessed; served as they are (no normalization, no augmentation). `images` holds them, (N, ...)."""

    def serve(self, x: torch.Tensor) -> torch.Tensor:
        return x


@functools.lru_cache(maxsize=1)
def _read_tensor_file(path: Path, stamp: tuple[int, int]) -> dict:
    """A tensor file's contents, read once for both of its splits (stamp: its modification time and size, so that
    a file written anew is read anew)."""
    if path.suffix == ".safetensors":
        from ..checkpoints import load_state_dict  # (a flat dict of tensors, what safetensors holds)

        return load_state_dict(path)
    return load_tensors(path, "tensor dataset")


def _load_tensor_file(path: Path, train: bool, labels: str) -> TensorSet | None:
    """A split of a tensor file: a dict with 'train' (N, ...) inputs and optionally 'train_labels' (N,) class
    indices, 'test' and 'test_labels'; None for a missing 'test' (the evaluation images are then held out of
    'train', as for a folder of unlabelled images)."""
    stat = path.resolve().stat()
    data = _read_tensor_file(path.resolve(), (stat.st_mtime_ns, stat.st_size))
    split = "train" if train else "test"
    if not isinstance(data, dict) or not isinstance(data.get("train"), torch.Tensor):
        raise UserError(f"{path} is not a tensor dataset: a dict with 'train' (N, ...) model inputs, and optionally "
                        "'train_labels', 'test' and 'test_labels'")
    inputs = data.get(split)
    if inputs is None:
        return None
    given = data.get(f"{split}_labels")
    if given is not None and (given.shape != (len(inputs),) or given.is_floating_point()):
        raise UserError(f"{path}: '{split}_labels' must hold one class index per input ({len(inputs)}), got "
                        f"{given.dtype} {tuple(given.shape)}")
    if not inputs.is_floating_point() or inputs.ndim < 2:
        raise UserError(f"{path}: '{split}' must hold float model inputs (N, ...), got {inputs.dtype} "
                        f"{tuple(inputs.shape)}")
    keep = given is not None and labels != "none"
    return TensorSet(inputs, given.long() if keep else torch.full((len(inputs),), -1), (), (),
                     f"tensor file {path} ({split}, {len(inputs)} inputs of shape {tuple(inputs.shape[1:])})")


def data_root(data_dir: str | os.PathLike | None = None) -> Path:
    """--data-dir, else $CNN_SPARSEGPT_DATA, else ~/.cache/cnn_sparsegpt/data."""
    root = data_dir or os.environ.get("CNN_SPARSEGPT_DATA") or Path.home() / ".cache" / "cnn_sparsegpt" / "data"
    return Path(root).expanduser()


def _torchvision(kind: str, root: Path, train: bool, download: bool):
    import torchvision

    cls = torchvision.datasets.MNIST if kind == "mnist" else torchvision.datasets.CIFAR10
    return cls(str(root), train=train, download=download)


def _offline_help(kind: str, root: Path) -> str:
    where = {"mnist": f"{root}/MNIST/raw/{{train,t10k}}-{{images-idx3,labels-idx1}}-ubyte",
             "cifar10": f"{root}/cifar-10-batches-py/ (torchvision's download), or {root}/cifar10-jpeg.tar.gz "
                        f"or {root}/cifar10-jpeg/{{train,test}}/<class>/*.jpg"}[kind]
    return (f"{kind} not found under {root} and could not be downloaded. Put the files at {where}, "
            f"or point --data-dir (or $CNN_SPARSEGPT_DATA) at the folder that holds them")


def _from_torchvision(kind: str, root: Path, train: bool) -> ImageSet:
    try:
        ds = _torchvision(kind, root, train, download=False)
    except RuntimeError:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                ds = _torchvision(kind, root, train, download=True)
        except Exception:
            raise UserError(_offline_help(kind, root)) from None
    images = torch.as_tensor(ds.data)
    images = images.unsqueeze(1) if images.ndim == 3 else images.permute(0, 3, 1, 2)
    mean, std = NORMALIZATION[kind]
    return ImageSet(images.contiguous(), torch.as_tensor(ds.targets, dtype=torch.long), mean, std,
                    source=f"torchvision {kind} ({root})", augment="crop-flip" if kind == "cifar10" else "none")


def _load_imagefolder(path: Path, train: bool, pre: Preprocess, labels: str = "classes") -> dict | None:
    """A split of a folder decoded into memory (cached on disk); None for the evaluation split of unlabelled images
    that have none."""
    stat = path.stat()
    geometry = f"{pre.resize}|{pre.crop}|{pre.interpolation}|{labels}"
    key = hashlib.sha1(f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}|{geometry}".encode()).hexdigest()[:16]
    cached = cache_root() / "decoded" / f"{path.name.split('.')[0]}-{key}.pt"
    splits = None
    if cached.is_file():
        try:
            splits = torch.load(cached, weights_only=True)
        except Exception:
            splits = None
    if splits is None:
        splits = decode_all(path, pre, labels)
        try:
            atomic_save(splits, cached)
        except (UserError, OSError):
            pass  # an unwritable cache only costs time
    split = "train" if train else next((s for s in ("test", "val") if s in splits), None)
    return splits[split] if split else None


def load_dataset(name: str, train: bool, data_dir: str | os.PathLike | None = None,
                 preprocess: Preprocess | None = None, streaming: str = "auto",
                 labels: str = "classes") -> ImageSet | FolderSet | None:
    """`name` is mnist, cifar10, or a path to an ImageFolder folder / .tar.gz. `preprocess` (preprocess.py)
    sets the normalization, and for folders the resize and crop; without it a folder keeps its images'
    size (the first image's) and ImageNet statistics. `streaming`: auto | on | off (folders only). `labels`: what a
    folder's subfolders are (folders.list_folder): classes, none (unlabelled images, label -1) or auto; None for the
    evaluation split of unlabelled images that have none."""
    if labels not in LABELS:
        raise UserError(f"labels must be one of {', '.join(LABELS)}, got {labels!r}")
    root = data_root(data_dir)
    if name in DATASETS:
        if preprocess is not None and (preprocess.resize or preprocess.crop):
            raise UserError(f"--image-size / --crop-pct and --preprocess imagenet apply to image folders; {name} "
                            "is served at its own size")
        if name == "mnist":
            data = _from_torchvision("mnist", root, train)
        elif (root / "cifar-10-batches-py").is_dir():
            data = _from_torchvision("cifar10", root, train)
        else:
            data = None
            for candidate in (root / "cifar10-jpeg", root / "cifar10-jpeg.tar.gz"):
                if candidate.exists():
                    d = _load_imagefolder(candidate, train, Preprocess())
                    mean, std = NORMALIZATION["cifar10"]
                    data = ImageSet(d["images"], d["labels"], mean, std, JPEG_NOTE, augment="crop-flip")
                    break
            data = data or _from_torchvision("cifar10", root, train)
        return replace(data, mean=preprocess.mean, std=preprocess.std) if preprocess is not None else data
    path = Path(name).expanduser()
    if not path.exists():
        raise UserError(f"unknown dataset '{name}': use {DATASET_CHOICES}")
    if path.is_file() and is_tensor_file(path):
        return _load_tensor_file(path, train, labels)
    pre = preprocess or Preprocess(IMAGENET_MEAN, IMAGENET_STD, source="imagenet statistics, images at their size")
    if should_stream(path, pre, streaming, labels):
        return load_folder_streamed(path, train, pre, labels)
    d = _load_imagefolder(path, train, pre, labels)
    if d is None:
        return None
    split = "train" if train else "test/val"
    kind = "ImageFolder" if d["classes"] else "unlabelled images"
    return ImageSet(d["images"], d["labels"], pre.mean, pre.std, f"{kind} {path} ({split}, in memory)",
                    classes=list(d["classes"]))


def load_splits(name: str, data_dir: str | os.PathLike | None = None, preprocess: Preprocess | None = None,
                streaming: str = "auto", workers: int | None = None, labels: str = "classes"):
    """(training, evaluation) splits of a dataset (load_dataset; the evaluation split None where a folder of
    unlabelled images has none); workers: decoding processes of streamed sets."""
    splits = [load_dataset(name, train, data_dir, preprocess, streaming, labels) for train in (True, False)]
    if workers is not None:
        splits = [replace(d, workers=workers) if isinstance(d, FolderSet) else d for d in splits]
    return tuple(splits)


class Loader:
    """Batches of normalized float images from an ImageSet, optionally shuffled and augmented, seeded."""

    def __init__(self, data: ImageSet, batch_size: int = 256, shuffle: bool = False, augment: bool = False,
                 seed: int = 0, device: torch.device | str = "cpu", indices: torch.Tensor | None = None,
                 channels_last: bool = False):
        self.data, self.batch_size, self.shuffle = data, batch_size, shuffle
        self.augment = augment and data.augment == "crop-flip"
        self.device, self.channels_last = torch.device(device), channels_last
        self.indices = torch.arange(len(data)) if indices is None else indices
        self.generator = torch.Generator().manual_seed(seed)

    def __len__(self) -> int:
        return (len(self.indices) + self.batch_size - 1) // self.batch_size

    def state_dict(self) -> dict:  # where the next epoch's order and augmentation come from (resumed training)
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])

    def _crop_flip(self, x: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        g = self.generator
        xp = F.pad(x.float(), (4, 4, 4, 4), mode="reflect")  # pixel values stay integers in [0, 255]
        oy, ox = torch.randint(0, 9, (B,), generator=g), torch.randint(0, 9, (B,), generator=g)
        rows = (oy[:, None] + torch.arange(H)).to(x.device)
        cols = (ox[:, None] + torch.arange(W)).to(x.device)
        flip = (torch.rand(B, generator=g) < 0.5).to(x.device)
        cols = torch.where(flip[:, None], cols.flip(1), cols)
        b = torch.arange(B, device=x.device)
        return xp[b[:, None, None, None], torch.arange(C, device=x.device)[None, :, None, None],
                  rows[:, None, :, None], cols[:, None, None, :]]

    def __iter__(self):
        order = self.indices[torch.randperm(len(self.indices), generator=self.generator)] if self.shuffle \
            else self.indices
        for start in range(0, len(order), self.batch_size):
            idx = order[start:start + self.batch_size]
            x = self.data.images[idx].to(self.device, non_blocking=True)
            if self.augment:
                x = self._crop_flip(x)
            x = self.data.serve(x)
            if self.channels_last and x.ndim == 4:
                x = x.contiguous(memory_format=torch.channels_last)
            yield x, self.data.labels[idx].to(self.device, non_blocking=True)


def data_digest(data) -> str | None:
    """What identifies a split's images as a model sees them: its pixels (or tensors), labels and normalization in
    memory; a streamed folder's files (path, size, modification time), labels and preprocessing. None for other
    kinds of data (nothing is cached for them)."""
    h = hashlib.sha256(type(data).__name__.encode())
    if isinstance(data, ImageSet):
        h.update(repr((data.mean, data.std)).encode())
        tensor_digest(h, [data.images, data.labels])
    elif isinstance(data, FolderSet):
        h.update(json.dumps(data.preprocess.as_dict(), sort_keys=True, default=str).encode())
        for f in data.files:
            stat = os.stat(f)
            h.update(f"{f}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
        tensor_digest(h, [data.labels])
    else:
        return None
    return h.hexdigest()


def holdout_split(train, n: int):
    """(the rest, n held-out images) of a training set: a fixed split (seed 12345), the same for `prune
    --holdout` and `finetune --holdout`, so that settings can be chosen on images that neither fits on."""
    if not 0 < n < len(train):
        raise UserError(f"--holdout must be between 1 and {len(train) - 1}, got {n}")
    perm = torch.randperm(len(train), generator=torch.Generator().manual_seed(12345))
    held, rest = perm[-n:], perm[:-n]
    return train.subset(rest), train.subset(held, source=f"{train.source}; {n} held-out training images")


def calibration_indices(data, nsamples: int, seed: int = 0) -> torch.Tensor:
    """Which training images calibrate: a seeded random choice over the whole set (its file list, for a
    streamed folder), the same for every method given the seed."""
    if nsamples < 1:
        raise UserError(f"--nsamples must be at least 1, got {nsamples}")
    if len(data) == 0:
        raise UserError("the calibration (training) set is empty")
    if nsamples > len(data):
        warnings.warn(f"asked for {nsamples} calibration images but only {len(data)} exist; using all of them",
                      RuntimeWarning)
        nsamples = len(data)
    return torch.randperm(len(data), generator=torch.Generator().manual_seed(seed))[:nsamples]


def calibration_set(data, nsamples: int, seed: int = 0, indices: torch.Tensor | None = None) -> torch.Tensor:
    """N random training images (normalized, unaugmented); only these are decoded from a streamed folder.
    `indices`: the choice of `calibration_indices`, when the caller already has it."""
    idx = calibration_indices(data, nsamples, seed) if indices is None else indices
    return torch.cat([x for x, _ in data.batches(min(len(idx), 256), "cpu", indices=idx)])
