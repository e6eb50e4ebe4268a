"""Top-1 of a deployed model: any callable that maps a float32 CPU batch to its logits (a runtime's model, an ONNX
Runtime session), over the images of an ImageSet or FolderSet."""
from __future__ import annotations

import torch
from tqdm.auto import tqdm


def top1(fn, data, batch_size: int = 256, progress: bool = True, desc: str = "accuracy") -> float:
    """Top-1 accuracy (a fraction) of fn's logits (a tensor or an array) over `data`."""
    correct, total = 0, -(-len(data) // batch_size)
    for x, y in tqdm(data.batches(batch_size, "cpu"), total=total, desc=desc, unit="batch", disable=not progress,
                     leave=False):
        correct += int((torch.as_tensor(fn(x.contiguous())).argmax(1) == y).sum())
    return correct / max(len(data), 1)
