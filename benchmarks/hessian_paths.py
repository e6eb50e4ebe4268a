"""Each way to a conv layer's Hessian, timed on one layer on any device: im2col's columns, whole-input shifted GEMMs,
cells (stride 1) and phases (strided), whichever apply, and which one the pruner takes there. The rules that choose
(`shifted_gram.by_cells`, `STRIDED_CHANNELS`) were measured on this project's CPU; on a GPU they keep the earlier
ones until this has been run there (issue 22).

    python benchmarks/hessian_paths.py --device cuda --json experiments/gpu/hessian_paths.json
"""
from __future__ import annotations

import argparse

import torch
from torch import nn

from cnn_sparsegpt.kernels import shifted_gram
from cnn_sparsegpt.pruning.heap import reuse_freed_memory
from cnn_sparsegpt.pruning.layer import LayerPruner
from cnn_sparsegpt.utils import atomic_write_json, run_metadata
from speed import timed  # this directory is sys.path[0] for a script

# (input channels, map size, stride, images): ResNet-18 (CIFAR) stages' 3×3 convs, then strided ones
LAYERS = [(64, 32, 1, 512), (128, 16, 1, 512), (256, 8, 1, 512), (512, 4, 1, 512),
          (64, 32, 2, 512), (128, 16, 2, 512), (256, 8, 2, 512), (128, 56, 2, 128), (256, 28, 2, 128),
          (512, 14, 2, 128), (64, 112, 2, 64), (128, 112, 2, 32), (64, 16, 2, 512)]


def best_of_three(fn, device: torch.device) -> float:
    fn()  # warm-up (lazy initialisations, the allocator)
    return min(timed(fn, device)[0] for _ in range(3))


def hessian(conv: nn.Conv2d, batches: list[torch.Tensor], path: str | None) -> torch.Tensor:
    """H through LayerPruner with the path forced ('im2col', 'whole', 'cells'; 'phases_whole' and 'phases' are the last
    two on a strided conv's phases), or the pruner's own choice (None)."""
    p = LayerPruner(conv, "conv")
    original = shifted_gram.by_cells
    if path is not None:
        p.shifted = lambda inp: path != "im2col"
        shifted_gram.by_cells = lambda *a, **k: path in ("cells", "phases")
    try:
        for b in batches:
            p.add_batch(b)
        return p.H
    finally:
        shifted_gram.by_cells = original


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--json", required=True)
    args = p.parse_args()
    device = torch.device(args.device)
    rows = []
    with torch.no_grad(), reuse_freed_memory(device.type == "cpu"):  # the allocator as a prune has it (heap.py)
        for layer in LAYERS:
            rows.append(measure(*layer, device))
    atomic_write_json({"rows": rows} | run_metadata(device), args.json)


def measure(cin: int, size: int, stride: int, images: int, device: torch.device) -> dict:
    """One layer's row: each path's best-of-three seconds for `images` inputs, and the pruner's own choice."""
    conv = nn.Conv2d(cin, cin, 3, stride=stride, padding=1, bias=False).to(device)
    batches = list(torch.randn(images, cin, size, size, device=device).relu().split(128))
    if not LayerPruner(conv, "conv").shifted(batches[0]):
        takes = "im2col"
    else:
        cells = shifted_gram.takes_cells((3, 3), (1, 1), (size, size), (stride, stride), cin, device.type == "cpu")
        takes = ("phases" if cells else "phases_whole") if stride > 1 else "cells" if cells else "whole"
    row = {"in_channels": cin, "size": size, "stride": stride, "images": images, "pruner_takes": takes}
    for path in ["im2col"] + (["whole", "cells"] if stride == 1 else ["phases_whole", "phases"]):
        row[f"{path}_s"] = best_of_three(lambda path=path: hessian(conv, batches, path), device)
    print({k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()}, flush=True)
    return row


if __name__ == "__main__":
    main()
