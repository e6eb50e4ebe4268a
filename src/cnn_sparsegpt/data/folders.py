"""ImageFolder data (`train/<class>/*.jpg`, `val/` or `test/`), from a folder or a .tar(.gz); or, for a model that is
not a classifier, a folder of unlabelled images (any layout; `train/` and `val/` or `test/` when it has both).

Two ways to serve it, chosen by size: small sets are decoded once into uint8 tensors (cached on disk)
and served from memory; large folders (ImageNet: 1.28 M files) are streamed. A streamed set holds only
its file list: calibration decodes just the images it draws, and evaluation runs a DataLoader with
worker processes that decode, resize and crop, one batch at a time.
"""
from __future__ import annotations

import io
import os
import tarfile
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset

from .preprocess import Preprocess, normalize
from ..utils import UserError

EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
EVAL_SPLITS = ("test", "val")
STREAM_ABOVE_BYTES = 2 * 2**30  # decoded size above which `auto` streams instead of caching in memory


def _layout_error(path: Path, found) -> UserError:
    return UserError(f"{path} is not an ImageFolder layout with train/ and test/ (or val/) subfolders of "
                     f"<class>/<image> (found: {', '.join(sorted(found)) or 'no images'}); images without labels "
                     "(for a model that is not a classifier) are read with --metric output")


LABELS = ("classes", "none", "auto")  # what a folder's subfolders are (load_dataset's `labels`)


def labelled(labels: torch.Tensor) -> bool:
    """Whether a split's images have classes (an unlabelled image's label is -1)."""
    return bool(len(labels)) and int(labels.min()) >= 0


def _is_image(name: str) -> bool:
    return name.lower().endswith(EXTENSIONS)


def _images_under(root: Path) -> list[str]:
    """Every image file under root, at any depth, sorted by path."""
    return sorted(os.path.join(d, f) for d, _, files in os.walk(root) for f in files if _is_image(f))


def list_unlabelled(path: Path) -> dict[str, list[tuple[None, str]]]:
    """{split: [(None, file path)]} of a folder of images whose subfolders are not classes (a segmentation or
    detection set): train/ and the first of test/, val/ when it has both, else every image under it as train (the
    evaluation images are then held out of it, pipeline.prepare)."""
    evals = [s for s in EVAL_SPLITS if (path / s).is_dir()]
    if (path / "train").is_dir() and evals:
        splits = {"train": _images_under(path / "train"), evals[0]: _images_under(path / evals[0])}
    else:
        splits = {"train": _images_under(path)}
    if not splits["train"]:
        raise UserError(f"{path} holds no images ({', '.join(EXTENSIONS)})"
                        f"{' under train/' if len(splits) > 1 else ''}")
    return {s: [(None, f) for f in files] for s, files in splits.items()}


def list_folder(path: Path, labels: str = "classes") -> dict[str, list[tuple[str | None, str]]]:
    """{split: [(class, file path)]}, sorted by class then file name; reads directory entries only. labels: classes
    (the ImageFolder layout, else an error), none (list_unlabelled: class None) or auto (the ImageFolder layout
    where the folder has one, unlabelled images where it has none). A layout whose evaluation classes train/ lacks
    is an error either way: a misplaced class folder, or subfolders that are not classes (Cityscapes' cities),
    which only the user can tell apart."""
    if labels == "none":
        return list_unlabelled(path)
    try:
        splits = _list_classes(path)
    except UserError:
        if labels == "classes":
            raise
        return list_unlabelled(path)
    class_index(splits)
    return splits


def _list_classes(path: Path) -> dict[str, list[tuple[str, str]]]:
    splits = {}
    for split in ("train",) + EVAL_SPLITS:
        root = path / split
        if not root.is_dir():
            continue
        items = []
        for cls in sorted(e.name for e in os.scandir(root) if e.is_dir()):
            items += [(cls, f.path) for f in sorted(os.scandir(root / cls), key=lambda f: f.name)
                      if _is_image(f.name) and f.is_file()]
        splits[split] = items
    if not splits.get("train") or not any(splits.get(s) for s in EVAL_SPLITS):
        raise _layout_error(path, [s for s, v in splits.items() if v])
    return splits


def class_index(splits: dict) -> list[str]:
    """The classes, sorted by name (for ImageNet's wnid folders: the index order torchvision and timm use); [] for
    unlabelled images. Every evaluation class must be a training class, or labels would silently shift."""
    if splits["train"] and splits["train"][0][0] is None:
        return []
    classes = sorted({c for c, _ in splits["train"]})
    for split in EVAL_SPLITS:
        extra = sorted({c for c, _ in splits.get(split, [])} - set(classes))
        if extra:
            raise UserError(f"{split}/ has classes that train/ lacks ({', '.join(extra[:3])}"
                            f"{', ...' if len(extra) > 3 else ''}): class indices would not match the model's; if "
                            "the subfolders are not classes, read the images without labels with --metric output")
    return classes


def _decode(data: bytes | str, pre: Preprocess, size=None, augment: bool = False, name: str = "") -> torch.Tensor:
    """Bytes or a file path -> uint8 (C, H, W) after the preprocessing's resize and crop (augment: its
    training geometry instead). Without a crop, an image is resized to `size` when it differs (so that a
    batch has one shape). A file that does not decode (truncated, not an image) is a UserError naming it."""
    import torch.nn.functional as F
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data) if isinstance(data, bytes) else data) as img:
            img = img.convert("RGB")
            x = pre.train_geometry(img) if augment else pre.geometry(img)
    except (OSError, ValueError, SyntaxError) as e:  # PIL: truncated or unknown files, bad headers
        raise UserError(f"cannot read image {name or data}: {e}. Remove or replace the file") from None
    if size is not None and not pre.crop and tuple(x.shape[1:]) != tuple(size):
        x = F.interpolate(x[None].float(), size=tuple(size), mode="bilinear", antialias=True)[0]
        x = x.round().clamp(0, 255).to(torch.uint8)
    return x


def _walk_tar(path: Path):
    """Yield (split, class, name, bytes) for every image of a .tar(.gz) in ImageFolder layout."""
    try:
        with tarfile.open(path, "r:*") as tar:
            for member in tar:
                parts = member.name.split("/")
                if member.isfile() and len(parts) >= 3 and parts[-1].lower().endswith(EXTENSIONS):
                    yield parts[-3], parts[-2], parts[-1], tar.extractfile(member).read()
    except (tarfile.TarError, EOFError, OSError) as e:
        raise UserError(f"cannot read {path}: {e}") from None


def decode_all(path: Path, pre: Preprocess, labels: str = "classes") -> dict[str, dict]:
    """Decode every image once; returns {split: {images, labels, classes}} (the in-memory path; labels as in
    list_folder, an unlabelled image's label -1)."""
    from tqdm.auto import tqdm

    if path.is_dir():
        splits = {s: [(c, f, f) for c, f in items] for s, items in list_folder(path, labels).items()}
    elif labels == "none":
        raise UserError(f"{path}: an archive is read as an ImageFolder of classes; unpack unlabelled images into a "
                        "folder")
    else:
        raw: dict[str, list] = {}
        for split, cls, name, data in _walk_tar(path):
            raw.setdefault(split, []).append((cls, name, data))
        splits = {s: sorted(v, key=lambda t: (t[0], t[1])) for s, v in raw.items() if s in ("train",) + EVAL_SPLITS}
        if "train" not in splits or not set(EVAL_SPLITS) & set(splits):
            raise _layout_error(path, raw)
    classes = class_index({s: [(c, n) for c, n, _ in v] for s, v in splits.items()})
    out, size = {}, None
    bar = tqdm(total=sum(len(v) for v in splits.values()), desc=f"decoding {path.name}", unit="img")
    try:
        for split, items in splits.items():
            imgs = []
            for cls, name, data in items:
                where = str(data) if not isinstance(data, bytes) else f"{path}:{split}/{cls}/{name}"
                imgs.append(_decode(data, pre, size, name=where))
                size = size or imgs[-1].shape[1:]  # without a crop, every image is served at the first one's size
                bar.update(1)
            index = {c: i for i, c in enumerate(classes)} | {None: -1}
            out[split] = {"images": torch.stack(imgs), "classes": classes,
                          "labels": torch.tensor([index[c] for c, _, _ in items], dtype=torch.long)}
    finally:  # an error message starts on its own line
        bar.close()
    return out


def should_stream(path: Path, pre: Preprocess, mode: str, labels: str = "classes") -> bool:
    """`on`/`off` as asked; `auto` streams a folder whose decoded images would exceed STREAM_ABOVE_BYTES."""
    if mode not in ("auto", "on", "off"):
        raise UserError(f"--streaming must be auto, on or off, got '{mode}'")
    if mode == "off":
        return False
    if not path.is_dir():
        if mode == "on":
            raise UserError(f"{path}: an archive cannot be streamed; unpack it into a folder, or use --streaming off")
        return False
    if mode == "on":
        return True
    splits = list_folder(path, labels)
    n = sum(len(v) for v in splits.values())
    if pre.crop:
        per_image = 3 * pre.crop * pre.crop
    else:
        from PIL import Image

        with Image.open(splits["train"][0][1]) as img:  # reads the header only
            per_image = 3 * img.width * img.height
    return n * per_image > STREAM_ABOVE_BYTES


class _Files(Dataset):
    def __init__(self, files, labels, pre: Preprocess, augment: bool = False):
        self.files, self.labels, self.pre, self.augment = files, labels, pre, augment

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i):
        return _decode(self.files[i], self.pre, augment=self.augment, name=str(self.files[i])), self.labels[i]


@dataclass
class FolderSet:
    """A streamed ImageFolder split: file paths and labels, decoded batch by batch."""
    files: list  # image paths
    labels: torch.Tensor  # int64 (N,)
    classes: list  # sorted class names; label i is classes[i]
    preprocess: Preprocess
    source: str
    workers: int = min(8, os.cpu_count() or 1)  # decoding processes
    augment: str = "none"  # 'resized-crop-flip' for a training split (Preprocess.train_geometry)
    storage: str = "streamed"

    def __len__(self) -> int:
        return len(self.files)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def labelled(self) -> bool:
        return labelled(self.labels)

    @property
    def mean(self) -> tuple:
        return self.preprocess.mean

    @property
    def std(self) -> tuple:
        return self.preprocess.std

    def loader(self, batch_size: int, device, seed: int = 0, channels_last: bool = False) -> _Epochs:
        """Training batches, shuffled and augmented anew each epoch (see data.Loader for in-memory sets)."""
        return _Epochs(self, batch_size, device, seed, channels_last)

    def subset(self, idx: torch.Tensor, source: str | None = None) -> FolderSet:
        return replace(self, files=[self.files[i] for i in idx.tolist()], labels=self.labels[idx],
                       source=source or self.source)

    def batches(self, batch_size: int, device, indices: torch.Tensor | None = None, shuffle: bool = False,
                augment: bool = False, seed: int = 0, channels_last: bool = False):
        """(normalized float images, labels) on `device`, in file order (or `indices`' order; shuffle: a
        seeded permutation of it; augment: the training geometry, for a training split)."""
        data = self if indices is None else self.subset(indices)
        if shuffle:
            data = data.subset(torch.randperm(len(data), generator=torch.Generator().manual_seed(seed)))
        ds = _Files(data.files, data.labels.tolist(), self.preprocess, augment and self.augment != "none")
        workers = min(self.workers, max(0, len(ds) // batch_size))  # no processes for a batch or two
        loader = DataLoader(ds, batch_size=batch_size, num_workers=workers, pin_memory=False,
                            persistent_workers=False, prefetch_factor=2 if workers else None)
        try:
            for x, y in loader:
                x = normalize(x.to(device, non_blocking=True), self.mean, self.std)
                yield x.contiguous(memory_format=torch.channels_last) if channels_last else x, y.to(device)
        except UserError as e:  # raised in a worker: keep the one line that says which file, not its traceback
            raise UserError(str(e).strip().splitlines()[-1].split("UserError: ")[-1]) from None


class _Epochs:
    """One pass over a streamed training split per iteration, each with its own seeded order."""

    def __init__(self, data: FolderSet, batch_size: int, device, seed: int, channels_last: bool):
        self.data, self.batch_size, self.device = data, batch_size, device
        self.seed, self.channels_last, self.epoch = seed, channels_last, 0

    def __len__(self) -> int:
        return -(-len(self.data) // self.batch_size)

    def state_dict(self) -> dict:  # each epoch's order is seeded by its number (resumed training)
        return {"epoch": self.epoch}

    def load_state_dict(self, state: dict) -> None:
        self.epoch = state["epoch"]

    def __iter__(self):
        self.epoch += 1
        return self.data.batches(self.batch_size, self.device, shuffle=True, augment=True,
                                 seed=self.seed + self.epoch, channels_last=self.channels_last)


def load_folder_streamed(path: Path, train: bool, pre: Preprocess, labels: str = "classes") -> FolderSet | None:
    """A split of a folder (list_folder's `labels`), streamed; None for the evaluation split of unlabelled images
    that have none."""
    if not pre.crop:
        raise UserError(f"streaming {path} needs one image size for every batch: use --preprocess imagenet "
                        "(or auto with a torchvision/timm model), or give --image-size")
    splits = list_folder(path, labels)
    classes = class_index(splits)
    split = "train" if train else next((s for s in EVAL_SPLITS if splits.get(s)), None)
    if split is None:
        return None
    items = splits[split]
    lookup = {c: i for i, c in enumerate(classes)} | {None: -1}
    kind = "ImageFolder" if classes else "unlabelled images"
    return FolderSet([f for _, f in items], torch.tensor([lookup[c] for c, _ in items], dtype=torch.long), classes,
                     pre, f"{kind} {path} ({split}, streamed)", augment="resized-crop-flip" if train else "none")
