"""Would bfloat16 products make the Hessians faster without changing the prune? A measurement, not a feature.

This CPU multiplies bfloat16 matrices (AMX) several times faster than float32 ones. torch on a CPU has no bfloat16
GEMM with a float32 output, so a bfloat16 Hessian here rounds twice: the inputs to bfloat16, and each batch's
product to bfloat16 before it is summed in float64. For a few of ResNet-18's layers (the shared checkpoint, its dense
inputs on calibration images), this compares H from float32 products (the pruner's own path) with H from bfloat16
products of the same im2col columns, plain or centred (see bf16_hessian), and where torch has a bfloat16 GEMM
with a float32 output (CUDA) with it too: their relative difference, the SparseGPT 2:4 and 50% solves on each (masks
shared, and the layer error of each solution measured on the float32 H), and the time of the two products.

    python benchmarks/bf16_hessian.py --weights ../shared/checkpoints/resnet18_cifar10.pt --data-dir ../shared/data \
        --json experiments/bf16_hessian.json      (a GPU: --device cuda)
"""
from __future__ import annotations

import argparse

import torch

from cnn_sparsegpt.kernels.masks import Pattern
from cnn_sparsegpt.kernels.solver import prune_matrix, relative_error
from cnn_sparsegpt.pruning.graph import inputs_of
from cnn_sparsegpt.pruning.layer import LayerPruner
from cnn_sparsegpt.utils import atomic_write_json, run_metadata
from speed import model_and_images, timed  # this directory is sys.path[0] for a script

LAYERS = ["layer1.0.conv2", "layer2.1.conv2", "layer3.1.conv2", "layer4.1.conv2"]
PATTERNS = [Pattern(n=2, m=4), Pattern(sparsity=0.5)]


def product(Xb: torch.Tensor, float32_output: bool) -> torch.Tensor:
    """XXᵀ of bfloat16 columns, rounded to bfloat16, or kept in float32 where torch has that GEMM (CUDA)."""
    return torch.mm(Xb, Xb.t(), out_dtype=torch.float32) if float32_output else Xb @ Xb.t()


def float32_output_supported(device: torch.device) -> bool:
    try:
        product(torch.ones(2, 2, dtype=torch.bfloat16, device=device), True)
        return True
    except (RuntimeError, NotImplementedError, TypeError):  # a CPU has no such GEMM in torch
        return False


def bf16_hessian(pruner: LayerPruner, batches: list[torch.Tensor], centred: bool, float32_output: bool = False
                 ) -> tuple[torch.Tensor, float, float]:
    """H = 2·ΣXXᵀ/N from bfloat16 products, one rounded product per batch summed in float64; and the seconds of the
    bfloat16 and of the float32 products of the same columns (unfolding not timed). centred: the products are of
    X − m (m: the first batch's mean column), and ΣXXᵀ = Σ(X − m)(X − m)ᵀ + m·sᵀ + s·mᵀ − N·mmᵀ (s = ΣX) in float64,
    so that the rounding is relative to the inputs' spread, not to their mean (post-ReLU means are as large)."""
    S, n, t16, t32, m, colsum = None, 0, 0.0, 0.0, None, 0.0
    device = batches[0].device
    for x in batches:
        X = pruner.columns(x)[0]  # the im2col columns in the solver's order
        t, _ = timed(lambda: X @ X.t(), device)
        t32 += t
        if centred:
            m = X.mean(1, keepdim=True) if m is None else m
            colsum = colsum + X.double().sum(1)
            X = X - m
        Xb = X.bfloat16()
        t, P = timed(lambda: product(Xb, float32_output), device)
        t16 += t
        S = P.double() if S is None else S + P.double()
        n += X.shape[1]
    if centred:
        md = m[:, 0].double()
        S = S + torch.outer(md, colsum) + torch.outer(colsum, md) - n * torch.outer(md, md)
    return (2 * S / n).float()[None], t16, t32


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--weights", required=True)
    p.add_argument("--data-dir", required=True)
    p.add_argument("--nsamples", type=int, default=1024)
    p.add_argument("--device", default="cpu")
    p.add_argument("--json", required=True)
    args = p.parse_args()
    device = torch.device(args.device)
    variants = [("plain", False, False), ("centred", True, False)]
    if float32_output_supported(device):  # only the inputs round (a GPU)
        variants += [("float32_output", False, True), ("centred_float32_output", True, True)]
    model, calib = model_and_images("resnet18", args.weights, args.data_dir, args.nsamples, device)
    modules = dict(model.named_modules())
    rows = []
    with torch.no_grad():
        for name in LAYERS:
            conv = modules[name]
            batches = list(inputs_of(model, conv, calib.split(128)))
            pruner = LayerPruner(conv, name)
            for x in batches:
                pruner.add_batch(x)
            H32 = pruner.H
            W = pruner.weight_matrix()[0]
            row = {"layer": name, "d": W.shape[-1], "rows": W.shape[1]}
            for key, centred, float32_output in variants:
                H16, t16, t32 = bf16_hessian(pruner, batches, centred, float32_output)
                row[key] = {"h_relative_difference": float((H16 - H32).norm() / H32.norm()),
                            "seconds_bf16_products": t16, "seconds_fp32_products": t32}
                for pattern in PATTERNS:
                    Q32, pruned32, pd32 = prune_matrix(W, H32, "sparsegpt", pattern)
                    Q16, pruned16, pd16 = prune_matrix(W, H16, "sparsegpt", pattern)
                    row[key][str(pattern)] = {
                        "error_fp32_h": float(relative_error(W, Q32, H32)),
                        "error_bf16_h": float(relative_error(W, Q16, H32)),  # measured on the fp32 H
                        "percdamp_fp32_h": pd32, "percdamp_bf16_h": pd16,
                        "mask_agreement": float((pruned32 == pruned16).float().mean())}
            print(row)
            rows.append(row)
    atomic_write_json({"rows": rows} | run_metadata(device), args.json)


if __name__ == "__main__":
    main()
