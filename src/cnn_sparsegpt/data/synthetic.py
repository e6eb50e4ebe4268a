"""An ImageNet-layout folder of real JPEG files, for tests and benchmarks where ImageNet is not at hand.

`root/{train,val}/<wnid>/<wnid>_<i>.JPEG`, images of varied sizes and aspect ratios, each class with its
own colour so that the class of an image can be told from its pixels. The pixels mean nothing else:
use it to test mechanics (file lists, preprocessing, class order, streaming), never accuracy.
"""
from __future__ import annotations

from pathlib import Path

import torch


def make_imagefolder(root: str | Path, classes: int = 10, train_per_class: int = 200, val_per_class: int = 50,
                     seed: int = 0, min_side: int = 64, max_side: int = 400) -> Path:
    """Write the folder (idempotent for the same arguments) and return its path."""
    from PIL import Image

    root = Path(root)
    g = torch.Generator().manual_seed(seed)
    wnids = [f"n{1440764 + 37 * i:08d}" for i in range(classes)]  # wnid-shaped, sorted like ImageNet's
    for split, n in (("train", train_per_class), ("val", val_per_class)):
        for c, wnid in enumerate(wnids):
            folder = root / split / wnid
            folder.mkdir(parents=True, exist_ok=True)
            colour = torch.tensor([(c * 67) % 256, (c * 151 + 40) % 256, (c * 29 + 90) % 256], dtype=torch.float32)
            for i in range(n):
                h, w = torch.randint(min_side, max_side + 1, (2,), generator=g).tolist()
                coarse = torch.rand(1, 3, 8, 8, generator=g) * 80 - 40  # drawn even when the file exists
                path = folder / f"{wnid}_{i}.JPEG"
                if path.is_file():
                    continue
                noise = torch.nn.functional.interpolate(coarse, size=(h, w), mode="bilinear", align_corners=False)[0]
                pixels = (colour.view(3, 1, 1) + noise).clamp(0, 255).to(torch.uint8).permute(1, 2, 0)
                Image.fromarray(pixels.numpy()).save(path, "JPEG", quality=90)
    return root
