"""How far the recommended recipe's cg re-solve (kernels/refine.py, 30 steps) is from converged on real layers: the
layer error ‖(W − Ŵ)X‖²/‖WX‖² on the damped H after SparseGPT's solve and after k cg steps, and each run's seconds.
Dense Hessians of the shared ResNet-18 (its widest SparseGPT layers), calibration images from the training set.

    python benchmarks/cg_convergence.py --weights ../shared/checkpoints/resnet18_cifar10.pt --data-dir ../shared/data \\
        --json experiments/cg_convergence.json
"""
from __future__ import annotations

import argparse
import time

import torch

from cnn_sparsegpt import calibration_set, create_model, load_dataset
from cnn_sparsegpt.kernels.linalg import damped
from cnn_sparsegpt.kernels.masks import Pattern
from cnn_sparsegpt.kernels.refine import cg_on_mask
from cnn_sparsegpt.kernels.solver import relative_error, sparsegpt_solve
from cnn_sparsegpt.pruning.allocation import dense_statistics
from cnn_sparsegpt.utils import atomic_write_json, load_state_dict, run_metadata

STEPS = (0, 5, 10, 15, 20, 30, 60, 120)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", default="resnet18_cifar")
    p.add_argument("--weights", required=True)
    p.add_argument("--data-dir", required=True)
    p.add_argument("--nsamples", type=int, default=512)
    p.add_argument("--layer", action="append", help="a layer to measure (repeat; default: two of the widest)")
    p.add_argument("--json", required=True)
    args = p.parse_args()
    model = create_model(args.arch)
    model.load_state_dict(load_state_dict(args.weights))
    model.eval()
    images = calibration_set(load_dataset("cifar10", True, args.data_dir), args.nsamples, 0)
    names = args.layer or ["layer3.1.conv2", "layer4.1.conv2"]
    stats = dense_statistics(model, list(images.split(128)), names, hessian=True)
    rows = []
    for name in names:
        Wg, _ = stats[name].weight_matrix()
        H = stats[name].H
        Hd = damped(H, 0.01)
        for pattern in (Pattern(n=2, m=4), Pattern(sparsity=0.7)):
            Q, pruned, _ = sparsegpt_solve(Wg, H, pattern)
            for steps in STEPS:
                t0 = time.perf_counter()
                X = cg_on_mask(Wg, Q, pruned, Hd, steps=steps) if steps else Q
                seconds = time.perf_counter() - t0
                error = float(relative_error(Wg, X, Hd))
                rows.append({"layer": name, "shape": list(Wg.shape[1:]), "pattern": str(pattern), "cg_steps": steps,
                             "relative_error": error, "seconds": seconds})
                print(f"{name} {pattern} cg {steps:>3}: error {error:.6f} ({seconds:.2f} s)")
    atomic_write_json({"rows": rows, "nsamples": args.nsamples} | run_metadata(torch.device("cpu")), args.json)


if __name__ == "__main__":
    main()
