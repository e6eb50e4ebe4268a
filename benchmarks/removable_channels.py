"""How much of a network structured pruning can reach: per model, the output channels of its Conv2d/Linear layers
(depthwise convs aside, they follow their input) that `--structure channels` may remove, and why the rest stay.

    python benchmarks/removable_channels.py --json experiments/channels/removable_channels.json

Random weights and one random image (the walk reads the graph and the shapes only).
"""
from __future__ import annotations

import argparse
from collections import Counter

import torch

from cnn_sparsegpt.models import create_model
from cnn_sparsegpt.pruning.channels import channel_groups
from cnn_sparsegpt.utils import atomic_write_json, run_metadata

MODELS = ("torchvision:resnet50", "torchvision:resnext50_32x4d", "torchvision:regnet_y_400mf",
          "torchvision:regnet_x_400mf", "torchvision:mobilenet_v3_large", "torchvision:efficientnet_b0")


def removable(model: torch.nn.Module, image_size: int) -> dict:
    model.eval()
    layers = [m for m in model.modules() if isinstance(m, torch.nn.Linear) or
              isinstance(m, torch.nn.Conv2d) and not (m.groups > 1 and m.groups == m.in_channels)]
    total = sum(m.weight.shape[0] for m in layers)  # every output channel of a Conv2d (not depthwise) or Linear
    groups = channel_groups(model, torch.randn(1, 3, image_size, image_size))
    removed = 0
    reasons: Counter = Counter()
    for g in groups:
        for u in g.units:
            # its producers' channels (a list per producer; one int before commit ef19b5a, which the "before" file ran)
            n = sum(len(ch) if isinstance(ch, list) else 1 for ch in u.rows.values())
            if u.fixed:
                reasons[u.fixed] += n
            else:
                removed += n
    return {"channels": total, "removable": removed, "fraction": removed / max(total, 1),
            "fixed_by": dict(reasons.most_common(5))}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", action="append", help=f"repeatable (default: {', '.join(MODELS)})")
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--json", required=True)
    args = p.parse_args()
    rows = {}
    for name in args.model or MODELS:
        rows[name] = removable(create_model(name, num_classes=1000), args.image_size)
        r = rows[name]
        print(f"{name}: {r['removable']} of {r['channels']} channels removable ({r['fraction']:.1%})")
    atomic_write_json({"models": rows, "image_size": args.image_size} | run_metadata(torch.device("cpu")), args.json)


if __name__ == "__main__":
    main()
