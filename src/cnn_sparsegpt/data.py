"""One data dispatcher for every dataset: MNIST, CIFAR-10 and any ImageFolder (folder or .tar.gz).

Images are decoded once into uint8 tensors (cached on disk) and served by an in-memory loader that
normalizes and augments whole batches in torch: decoding 60,000 JPEGs per run would dominate a prune.
"""
from __future__ import annotations

import hashlib
import io
import os
import tarfile
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from .utils import UserError, atomic_save

DATASETS = ("mnist", "cifar10")
NORMALIZATION = {  # per-channel mean and std of the training images
    "mnist": ((0.1307,), (0.3081,)),
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
}
JPEG_NOTE = "CIFAR-10 JPEG re-encoding (cifar10-jpeg): accuracies are close to, not equal to, canonical CIFAR-10"


@dataclass
class ImageSet:
    images: torch.Tensor  # uint8 (N, C, H, W)
    labels: torch.Tensor  # int64 (N,)
    mean: tuple  # normalization
    std: tuple
    source: str  # where the pixels came from, for reports
    augment: str = "none"  # 'crop-flip' for CIFAR-style training augmentation

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def num_classes(self) -> int:
        return int(self.labels.max()) + 1 if len(self.labels) else 0


def data_root(data_dir: str | os.PathLike | None = None) -> Path:
    """--data-dir, else $CNN_SPARSEGPT_DATA, else ~/.cache/cnn_sparsegpt/data."""
    root = data_dir or os.environ.get("CNN_SPARSEGPT_DATA") or Path.home() / ".cache" / "cnn_sparsegpt" / "data"
    return Path(root).expanduser()


def cache_root() -> Path:
    return Path(os.environ.get("CNN_SPARSEGPT_CACHE") or Path.home() / ".cache" / "cnn_sparsegpt").expanduser()


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


def _decode(data: bytes) -> torch.Tensor:
    from PIL import Image

    img = Image.open(io.BytesIO(data)).convert("RGB")
    return torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8).view(img.height, img.width, 3).permute(2, 0, 1)


def _walk_imagefolder(path: Path):
    """Yield (split, class, file name, bytes) for every image of a folder or .tar(.gz) in ImageFolder layout."""
    exts = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
    if path.is_dir():
        for f in sorted(path.rglob("*")):
            if f.suffix.lower() in exts and len(f.relative_to(path).parts) >= 3:
                yield f.parts[-3], f.parts[-2], f.name, f.read_bytes()
        return
    try:
        with tarfile.open(path, "r:*") as tar:
            for member in tar:
                parts = member.name.split("/")
                if member.isfile() and len(parts) >= 3 and parts[-1].lower().endswith(exts):
                    yield parts[-3], parts[-2], parts[-1], tar.extractfile(member).read()
    except (tarfile.TarError, EOFError, OSError) as e:
        raise UserError(f"cannot read {path}: {e}") from None


def _decode_imagefolder(path: Path) -> dict[str, dict]:
    """Decode every image once; returns {split: {images, labels, classes}}."""
    from tqdm.auto import tqdm

    raw: dict[str, list] = {}
    for split, cls, name, data in tqdm(_walk_imagefolder(path), desc=f"decoding {path.name}", unit="img"):
        raw.setdefault(split, []).append((cls, name, data))
    splits = {s: v for s, v in raw.items() if s in ("train", "test", "val")}
    if "train" not in splits or not ({"test", "val"} & set(splits)):
        raise UserError(f"{path} is not an ImageFolder layout with train/ and test/ (or val/) "
                        f"subfolders of <class>/<image> (found: {', '.join(sorted(raw)) or 'no images'})")
    classes = sorted({c for items in splits.values() for c, _, _ in items})
    out, size = {}, None
    for split, items in splits.items():
        items.sort(key=lambda t: (t[0], t[1]))
        imgs = []
        for _, _, data in items:
            img = _decode(data)
            size = size or img.shape[1:]
            if img.shape[1:] != size:  # all images are served at the first image's size
                img = F.interpolate(img[None].float(), size=size, mode="bilinear", antialias=True)[0]
                img = img.round().clamp(0, 255).to(torch.uint8)
            imgs.append(img)
        labels = torch.tensor([classes.index(c) for c, _, _ in items], dtype=torch.long)
        out[split] = {"images": torch.stack(imgs), "labels": labels, "classes": classes}
    return out


def _load_imagefolder(path: Path, train: bool) -> dict:
    stat = path.stat()
    key = hashlib.sha1(f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    cached = cache_root() / "decoded" / f"{path.name.split('.')[0]}-{key}.pt"
    if cached.is_file():
        try:
            splits = torch.load(cached, weights_only=True)
        except Exception:
            splits = None
    else:
        splits = None
    if splits is None:
        splits = _decode_imagefolder(path)
        try:
            atomic_save(splits, cached)
        except (UserError, OSError):
            pass  # an unwritable cache only costs time
    split = "train" if train else ("test" if "test" in splits else "val")
    return splits[split] | {"train_images": splits["train"]["images"]}


def load_dataset(name: str, train: bool, data_dir: str | os.PathLike | None = None) -> ImageSet:
    """`name` is mnist, cifar10, or a path to an ImageFolder folder / .tar.gz."""
    root = data_root(data_dir)
    if name == "mnist":
        return _from_torchvision("mnist", root, train)
    if name == "cifar10":
        if (root / "cifar-10-batches-py").is_dir():
            return _from_torchvision("cifar10", root, train)
        for candidate in (root / "cifar10-jpeg", root / "cifar10-jpeg.tar.gz"):
            if candidate.exists():
                d = _load_imagefolder(candidate, train)
                mean, std = NORMALIZATION["cifar10"]
                return ImageSet(d["images"], d["labels"], mean, std, JPEG_NOTE, augment="crop-flip")
        return _from_torchvision("cifar10", root, train)
    path = Path(name).expanduser()
    if not path.exists():
        raise UserError(f"unknown dataset '{name}': use {', '.join(DATASETS)}, or the path of an ImageFolder "
                        "folder or .tar.gz with train/ and test/ subfolders")
    d = _load_imagefolder(path, train)
    x = d["train_images"].float() / 255  # normalization statistics of the training images
    mean = tuple(x.mean(dim=(0, 2, 3)).tolist())
    std = tuple(x.std(dim=(0, 2, 3)).clamp_min(1e-3).tolist())
    return ImageSet(d["images"], d["labels"], mean, std, f"ImageFolder {path}", augment="crop-flip")


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
        c = data.images.shape[1]
        self.mean = torch.tensor(data.mean, device=self.device).view(1, c, 1, 1) * 255
        self.std = torch.tensor(data.std, device=self.device).view(1, c, 1, 1) * 255

    def __len__(self) -> int:
        return (len(self.indices) + self.batch_size - 1) // self.batch_size

    def _crop_flip(self, x: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        g = self.generator
        xp = F.pad(x, (4, 4, 4, 4), mode="reflect")
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
            x = self.data.images[idx].to(self.device, non_blocking=True).float()
            if self.augment:
                x = self._crop_flip(x)
            x = (x - self.mean) / self.std
            if self.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            yield x, self.data.labels[idx].to(self.device, non_blocking=True)


def calibration_set(data: ImageSet, nsamples: int, seed: int = 0) -> torch.Tensor:
    """N random training images (normalized, unaugmented), the same for every method given the seed."""
    if nsamples < 1:
        raise UserError(f"--nsamples must be at least 1, got {nsamples}")
    if len(data) == 0:
        raise UserError("the calibration (training) set is empty")
    if nsamples > len(data):
        warnings.warn(f"asked for {nsamples} calibration images but only {len(data)} exist; using all of them",
                      RuntimeWarning)
        nsamples = len(data)
    idx = torch.randperm(len(data), generator=torch.Generator().manual_seed(seed))[:nsamples]
    return next(iter(Loader(data, batch_size=nsamples, indices=idx)))[0]
