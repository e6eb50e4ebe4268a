"""How far the recommended recipe's cg re-solve (kernels/refine.py, 30 steps) is from converged on real layers: the
layer error ‖(W − Ŵ)X‖²/‖WX‖² on the damped H after SparseGPT's solve and after k cg steps, and each run's seconds.
Dense Hessians of the shared ResNet-18 (its widest SparseGPT layers), calibration images from the training set.
`--preconditioner` compares others with the library's Jacobi (1/diag H): the kept block of H⁻¹ (`inverse`, one more
product per step), each row's exact inverse of contiguous blocks of 16 or 64 inputs (`blocks16`, `blocks64`), or of
the k×k taps of one input channel (`taps`); each row's error is also reported as the fraction of what 300 Jacobi
steps remove that is still left.

    python benchmarks/cg_convergence.py --weights ../shared/checkpoints/resnet18_cifar10.pt --data-dir ../shared/data \\
        --json experiments/cg_convergence.json
    python benchmarks/cg_convergence.py ... --preconditioner jacobi --preconditioner inverse --preconditioner blocks16 \
        --preconditioner blocks64 --preconditioner taps --json experiments/cg_preconditioners.json
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
from cnn_sparsegpt.kernels.swap import _decoupled, _masked
from cnn_sparsegpt.pruning.allocation import dense_statistics
from cnn_sparsegpt.checkpoints import load_state_dict
from cnn_sparsegpt.utils import atomic_write_json, run_metadata

STEPS = (0, 5, 10, 15, 20, 30, 60, 120)
REFERENCE_STEPS = 300  # the nearly converged solve that `left` is measured against


def _blocks(Hd: torch.Tensor, keep: torch.Tensor, b: int):
    """Each row's inverse of its kept part of H's diagonal blocks of b inputs (b divides d)."""
    G, rows, d = keep.shape
    nb = d // b
    Hb = torch.stack([Hd[:, i * b:(i + 1) * b, i * b:(i + 1) * b] for i in range(nb)], 1)  # (G, nb, b, b)
    k = keep.reshape(G, rows, nb, b).bool()
    Minv = _masked(torch.linalg.inv(_decoupled(Hb[:, None], k)), k)  # pruned inputs decoupled, then dropped again
    return lambda R: (Minv @ R.reshape(G, rows, nb, b, 1)).reshape(G, rows, d)


def _taps(Hd: torch.Tensor, keep: torch.Tensor, cin: int):
    """Blocks of one input channel's k×k taps (the solver's column order is tap-major: tap·cin + channel)."""
    d = keep.shape[-1]
    order = torch.arange(d).reshape(d // cin, cin).T.reshape(-1)  # channel-major
    back = torch.argsort(order)
    inner = _blocks(Hd[:, order][:, :, order], keep[:, :, order], d // cin)
    return lambda R: inner(R[:, :, order])[:, :, back]


def preconditioner(kind: str, Hd: torch.Tensor, keep: torch.Tensor, cin: int):
    """A `precondition` for cg_on_mask (None: the library's Jacobi)."""
    if kind == "jacobi":
        return None
    if kind == "inverse":
        Hinv = torch.cholesky_inverse(torch.linalg.cholesky(Hd))
        return lambda R: torch.bmm(R, Hinv) * keep
    if kind.startswith("blocks"):
        return _blocks(Hd, keep, int(kind[len("blocks"):]))
    if kind == "taps":
        return _taps(Hd, keep, cin)
    raise ValueError(kind)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", default="resnet18_cifar")
    p.add_argument("--weights", required=True)
    p.add_argument("--data-dir", required=True)
    p.add_argument("--nsamples", type=int, default=512)
    p.add_argument("--layer", action="append", help="a layer to measure (repeat; default: two of the widest)")
    p.add_argument("--preconditioner", action="append", choices=("jacobi", "inverse", "blocks16", "blocks64", "taps"),
                   help="repeat; default jacobi alone")
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
        cin = dict(model.named_modules())[name].in_channels
        for pattern in (Pattern(n=2, m=4), Pattern(sparsity=0.7)):
            Q, pruned, _ = sparsegpt_solve(Wg, H, pattern)
            start = float(relative_error(Wg, Q, Hd))
            floor = float(relative_error(Wg, cg_on_mask(Wg, Q, pruned, Hd, steps=REFERENCE_STEPS), Hd))
            for kind in args.preconditioner or ["jacobi"]:
                t0 = time.perf_counter()
                precondition = preconditioner(kind, Hd, (~pruned).to(Wg.dtype), cin)
                setup = time.perf_counter() - t0
                for steps in STEPS:
                    t0 = time.perf_counter()
                    X = cg_on_mask(Wg, Q, pruned, Hd, steps=steps, precondition=precondition) if steps else Q
                    seconds = time.perf_counter() - t0
                    error = float(relative_error(Wg, X, Hd))
                    left = (error - floor) / (start - floor)
                    rows.append({"layer": name, "shape": list(Wg.shape[1:]), "pattern": str(pattern),
                                 "preconditioner": kind, "cg_steps": steps, "relative_error": error, "left": left,
                                 "seconds": seconds, "setup_seconds": setup})
                    print(f"{name} {pattern} {kind} cg {steps:>3}: error {error:.6f}, {left:.3f} of the gap to "
                          f"{REFERENCE_STEPS} Jacobi steps left ({seconds:.2f} s + setup {setup:.2f} s)")
    atomic_write_json({"rows": rows, "nsamples": args.nsamples} | run_metadata(torch.device("cpu")), args.json)


if __name__ == "__main__":
    main()
