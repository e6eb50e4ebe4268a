"""What a kept channel count costs on a runtime: a 3×3 conv pair (C → C → C, stride 1) of each ResNet-18 (CIFAR)
stage timed at every width in steps of 8, batch 1, the widths alternating in rounds (one process). ONNX Runtime's
CPU convolutions work on blocks of channels (16 with AVX-512, 8 with AVX2), so a width between two multiples of the
block costs what the next multiple does: the reason to round kept channel counts to the block (`--round-to`).

    python benchmarks/channel_width_latency.py --json experiments/channel_width_latency.json
"""
from __future__ import annotations

import argparse

import torch
from torch import nn

from cnn_sparsegpt.deploy.runtimes import runtime, side_by_side
from cnn_sparsegpt.utils import atomic_write_json, run_metadata

STAGES = ((64, 32), (128, 16), (256, 8), (512, 4))  # dense channels, spatial size


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", required=True)
    p.add_argument("--runtime", default="onnxruntime")
    p.add_argument("--runs", type=int, default=100, help="timed calls per width per round")
    p.add_argument("--rounds", type=int, default=5)
    args = p.parse_args()
    make = runtime(args.runtime)
    torch.manual_seed(0)
    rows = []
    for dense, size in STAGES:
        widths = range(dense // 2, dense + 1, 8)
        models = {}
        for c in widths:
            pair = nn.Sequential(nn.Conv2d(c, c, 3, padding=1), nn.ReLU(), nn.Conv2d(c, c, 3, padding=1)).eval()
            models[c] = make(pair, torch.randn(1, c, size, size), None)
        # each width gets its own input: side_by_side passes one x, so wrap the calls
        inputs = {c: torch.randn(1, c, size, size) for c in widths}
        calls = {c: (lambda _, c=c: models[c](inputs[c])) for c in widths}
        _, median = side_by_side(calls, inputs[dense], 5, args.runs, args.rounds)
        for c in widths:
            rows.append({"dense_channels": dense, "size": size, "channels": c, "macs_fraction": (c / dense) ** 2,
                         "ms": median[c] * 1e3, "time_fraction": median[c] / median[dense]})
            print(f"{dense:4d} ch at {size:2d}²: {c:4d} channels  MACs {(c / dense) ** 2:.2f}  "
                  f"{median[c] * 1e3:.3f} ms  time {median[c] / median[dense]:.2f}")
    atomic_write_json({"runtime": args.runtime, "batch": 1, "rows": rows, **run_metadata(torch.device("cpu"))},
                      args.json)


if __name__ == "__main__":
    main()
