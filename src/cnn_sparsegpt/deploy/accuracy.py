"""Top-1 of a deployed model: any callable that maps a float32 CPU batch to its logits (a runtime's model, an ONNX
Runtime session), over labelled images: an ImageSet or FolderSet, an (images, labels) pair of tensors, or an
iterable of (images, labels) batches such as a DataLoader."""
from __future__ import annotations

import torch
from tqdm.auto import tqdm


def _batches(data, batch_size: int):
    """(x, y) batches of `data` and how many batches there are (None: unknown)."""
    if hasattr(data, "batches"):
        return data.batches(batch_size, "cpu"), -(-len(data) // batch_size)
    if isinstance(data, (tuple, list)) and len(data) == 2 and torch.is_tensor(data[0]):
        x, y = data
        return zip(x.split(batch_size), y.split(batch_size)), -(-len(y) // batch_size)
    return data, len(data) if hasattr(data, "__len__") else None


def image_count(data) -> int | None:
    """How many labelled images `data` holds (None for batches of unknown size)."""
    if isinstance(data, (tuple, list)) and len(data) == 2 and torch.is_tensor(data[0]):
        return len(data[1])
    if hasattr(data, "batches"):
        return len(data)
    dataset = getattr(data, "dataset", None)  # a DataLoader
    return len(dataset) if hasattr(dataset, "__len__") else None


def top1(fn, data, batch_size: int = 256, progress: bool = True, desc: str = "accuracy") -> float:
    """Top-1 accuracy (a fraction) of fn's logits (a tensor or an array) over `data`."""
    batches, total = _batches(data, batch_size)
    correct = seen = 0
    for x, y in tqdm(batches, total=total, desc=desc, unit="batch", disable=not progress, leave=False):
        logits = torch.as_tensor(fn(x.detach().float().cpu().contiguous()))
        correct += int((logits.argmax(1) == torch.as_tensor(y).cpu()).sum())
        seen += len(y)
    return correct / max(seen, 1)
