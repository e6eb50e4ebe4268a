"""BatchNorm statistics of one calibration batch: `torch.var_mean` over dims (0, 2, 3) (what BN recalibration used
before) against `batch_moments` (BatchNorm's own statistics kernel, what it uses now), on the BatchNorm inputs of
ResNet-18 (CIFAR, batches of 128) and ResNet-50 (224², batches of 32), the two alternating in rounds (one process).

    python benchmarks/bn_statistics.py --json experiments/bn_statistics.json
"""
from __future__ import annotations

import argparse

import torch

from cnn_sparsegpt.deploy.runtimes import side_by_side
from cnn_sparsegpt.pruning.batchnorm import batch_moments
from cnn_sparsegpt.utils import atomic_write_json, run_metadata

SHAPES = ((128, 64, 32, 32), (128, 128, 16, 16), (128, 256, 8, 8), (128, 512, 4, 4),  # ResNet-18, CIFAR
          (32, 64, 112, 112), (32, 256, 56, 56), (32, 512, 28, 28), (32, 2048, 7, 7))  # ResNet-50, 224²


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", required=True)
    p.add_argument("--runs", type=int, default=5, help="timed calls per kernel per round")
    p.add_argument("--rounds", type=int, default=5)
    args = p.parse_args()
    torch.manual_seed(0)
    rows = []
    for shape in SHAPES:
        x = torch.randn(shape) + 3  # an offset, as BatchNorm inputs have
        kernels = {"var_mean": lambda x: torch.var_mean(x, dim=[0, 2, 3], correction=0),
                   "batch_moments": lambda x: batch_moments(x, [0, 2, 3])}
        _, median = side_by_side(kernels, x, 2, args.runs, args.rounds)
        ratio = median["var_mean"] / median["batch_moments"]
        rows.append({"shape": list(shape), "var_mean_ms": median["var_mean"] * 1e3,
                     "batch_moments_ms": median["batch_moments"] * 1e3, "speedup": ratio})
        print(f"{str(shape):20s} var_mean {median['var_mean'] * 1e3:7.2f} ms  batch_moments "
              f"{median['batch_moments'] * 1e3:7.2f} ms  {ratio:.2f}x")
    atomic_write_json({"rows": rows, **run_metadata(torch.device("cpu"))}, args.json)


if __name__ == "__main__":
    main()
