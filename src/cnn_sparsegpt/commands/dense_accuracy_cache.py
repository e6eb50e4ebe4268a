"""The dense model's top-1, measured once. `prune` measures the dense model on its evaluation images before it
prunes; the same checkpoint on the same images, device and settings gives the same number, so a later prune reads
it from a JSON file in the cache (utils.cache_root) instead of measuring it again (on ImageNet's 50,000 images, on
a CPU, minutes each time). The key is a digest of everything the number follows from: the model's tensors, its
class and the source file that defines it, its name and builder arguments, the evaluation images as the model sees
them (data_digest), the batch size, the device, the thread count and the versions of torch and this package.
Anything different is another key, measured afresh. `prune --no-reuse-dense` always measures."""
from __future__ import annotations

import datetime
import hashlib
import inspect
import json
from importlib import metadata
from pathlib import Path

import torch
from torch import nn

from ..data.datasets import data_digest
from ..utils import UserError, atomic_write_json, cache_root, git_commit, tensor_digest

MAX_ENTRIES = 1000  # the oldest go first: a file of a few hundred kB at most


def cache_file() -> Path:
    return cache_root() / "dense_accuracy.json"


def _source_digest(model: nn.Module) -> str:
    """The file that defines the model's class (a user's model file, torchvision's resnet.py): an edit changes the
    forward pass without changing a tensor."""
    try:
        return hashlib.sha256(Path(inspect.getfile(type(model))).read_bytes()).hexdigest()
    except (TypeError, OSError):
        return ""


def _version() -> str:
    try:
        return metadata.version("cnn-sparsegpt")
    except metadata.PackageNotFoundError:
        return ""


def dense_key(model: nn.Module, name: str, kwargs: dict, data, device: torch.device, batch_size: int) -> str | None:
    """The cache key of `model`'s top-1 on `data`, or None where the data cannot be identified (nothing cached)."""
    images = data_digest(data)
    if images is None:
        return None
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else device.type
    h = hashlib.sha256(json.dumps({
        "model": name, "kwargs": kwargs, "class": f"{type(model).__module__}.{type(model).__qualname__}",
        "source": _source_digest(model), "images": images, "batch_size": batch_size, "device": where,
        "threads": torch.get_num_threads(), "torch": torch.__version__, "package": _version(), "commit": git_commit(),
    }, sort_keys=True, default=str).encode())
    state = model.state_dict()
    h.update(" ".join(state).encode())
    tensor_digest(h, state.values())
    return h.hexdigest()


def _entries() -> dict:
    try:
        entries = json.loads(cache_file().read_text(encoding="utf-8"))
    except (OSError, ValueError):  # none yet, or unreadable: measure
        return {}
    return entries if isinstance(entries, dict) else {}


def lookup(key: str | None) -> dict | None:
    """The entry stored under `key` ({'dense_acc', 'images', 'date', 'weights'}), or None."""
    entry = _entries().get(key) if key else None
    return entry if isinstance(entry, dict) and isinstance(entry.get("dense_acc"), float) else None


def store(key: str | None, dense_acc: float, images: int, weights: str | None) -> None:
    if key is None:
        return
    entries = _entries()
    entries[key] = {"dense_acc": dense_acc, "images": images, "weights": weights,
                    "date": datetime.datetime.now().isoformat(timespec="seconds")}
    if len(entries) > MAX_ENTRIES:
        entries = dict(sorted(entries.items(), key=lambda kv: str(kv[1].get("date")))[-MAX_ENTRIES:])
    try:
        atomic_write_json(entries, cache_file())
    except (OSError, UserError):  # a read-only cache: measured next time as well
        pass
