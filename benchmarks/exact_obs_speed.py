"""The exact OBS greedy (kernels/exact_obs.py `_greedy`) against OBC's update form kept here as the reference:
each step rewrites nothing but reads its column from H⁻¹₀ minus ALL earlier removals (one GEMV over k·d numbers
per row and step: memory-bound, rows·d³/2 numbers read per layer). The project's form updates H⁻¹ lazily, a block
of removals at a time (one batched GEMM per block). Layer shapes of ResNet-20 (64 × 576) and of ResNet-18's
layer2 (128 × 1152, the widest the auto solver gives the exact one), the two alternating in rounds; all d removals
(unstructured) and the first d/2 (the steps of 2:4; the lazy form with its N:M quota, the reference without).

    python benchmarks/exact_obs_speed.py --json experiments/exact_obs_speed.json
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from cnn_sparsegpt.kernels import exact_obs
from cnn_sparsegpt.kernels.masks import Pattern
from cnn_sparsegpt.utils import atomic_write_json, run_metadata

SHAPES = ((64, 576), (128, 1152))  # (rows, d)


def reference_greedy(w: torch.Tensor, Hinv: torch.Tensor, steps: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Every removal's column recomputed from all earlier ones (unstructured, no dead inputs): order, losses."""
    B, d = w.shape
    V = torch.empty(B, steps, d, dtype=w.dtype)
    diag = torch.diagonal(Hinv).expand(B, d).clone()
    removed = torch.zeros(B, d, dtype=w.dtype)
    ar = torch.arange(B)
    order, loss = torch.empty(B, steps, dtype=torch.long), torch.empty(B, steps, dtype=torch.float64)
    for k in range(steps):
        score = w.square() / diag
        j = torch.argmin(score + removed, 1)
        order[:, k], loss[:, k] = j, score[ar, j].double()
        col = Hinv[:, j].t()
        if k:
            col = col - torch.bmm(V[ar, :k, j][:, None, :], V[:, :k]).squeeze(1)
        hjj = col[ar, j]
        w.sub_(col * (w[ar, j] / hjj)[:, None])
        w[ar, j] = 0
        V[:, k] = col / hjj.sqrt()[:, None]
        diag.sub_(V[:, k].square())
        diag[ar, j] = 1
        removed[ar, j] = torch.inf
    return order, loss


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", required=True)
    p.add_argument("--rounds", type=int, default=2)
    args = p.parse_args()
    torch.manual_seed(0)
    rows = []
    for (B, d), half in [(shape, half) for shape in SHAPES for half in (False, True)]:
        X = torch.randn(d, 4 * d)
        X[: d // 2] += 0.5 * X[d // 2:]  # correlated inputs, as a conv's are
        _, Hinv, dead = exact_obs._inverse((X @ X.t() / X.shape[1])[None], 0.01, torch.float32)
        W = torch.randn(B, d)
        steps, pattern = (d // 2, Pattern(n=2, m=4)) if half else (d, Pattern(sparsity=0.5))
        kernels = {"reference": lambda w: reference_greedy(w, Hinv[0], steps),
                   "lazy": lambda w: exact_obs._greedy(w, Hinv[0], dead[0], pattern, steps, False)[1:]}
        seconds, results = {k: [] for k in kernels}, {}
        for _ in range(args.rounds):
            for k, fn in kernels.items():
                t = time.perf_counter()
                results[k] = fn(W.clone())
                seconds[k].append(time.perf_counter() - t)
        med = {k: statistics.median(v) for k, v in seconds.items()}
        agree = float((results["lazy"][0] == results["reference"][0]).double().mean()) if not half else None
        rel = float((results["lazy"][1] - results["reference"][1]).abs().sum() / results["reference"][1].abs().sum()) \
            if not half else None
        rows.append({"rows": B, "d": d, "steps": steps, "pattern": str(pattern) if half else "unstructured",
                     "reference_s": med["reference"], "lazy_s": med["lazy"],
                     "speedup": med["reference"] / med["lazy"], "order_agreement": agree, "loss_rel_diff": rel,
                     "block": exact_obs.BLOCK})
        same = f"; same removal {agree:.4f}, losses differ by {rel:.1e}" if not half else " (2:4 steps)"
        print(f"{B} x {d}: reference {med['reference']:.2f} s, lazy {med['lazy']:.2f} s "
              f"({med['reference'] / med['lazy']:.2f}x){same}", flush=True)
    atomic_write_json({"rows": rows, **run_metadata(torch.device("cpu"))}, args.json)


if __name__ == "__main__":
    main()
