"""A better layer solve than SparseGPT's single left-to-right sweep (`--refine cg|admm`).

SparseGPT fixes each column once: weights left of a pruned column never see its error again, and the
mask of each 128-column block gets exactly the layer's fraction. Two refinements of a solved layer:

- `cg`: keep the mask, re-solve the kept weights. For a fixed mask the layer problem
  min ‖(W − Ŵ)X‖² splits into one least-squares problem per output row (H_SS ŵ_S = (H w)_S, S its kept
  columns); preconditioned conjugate gradient solves all rows at once, one (rows × d) · (d × d) product
  per step.
- `admm`: also move the mask, layer-wide (no per-block quota). ADMM on min ‖(W − D)X‖² s.t. D = Z,
  Z sparse (as ALPS does): a ridge step for D, a projection of D + V onto the pattern for Z, a dual
  step for V, with the penalty ρ raised as the support settles; then `cg` on the final mask. It starts
  from SparseGPT's solution, and the better of the two (by the damped layer error) is kept.

- `swap`: also move the mask, row by row: exact OBS swaps of a kept and a pruned weight (swap.py) while one
  lowers the row's error, then the kept weights solved exactly. Costs rows·d³ like the exact solver, with a larger
  constant, so it runs within SWAP_BUDGET and falls back to `cg` on wider layers.

All use SparseGPT's damped H, so they do not fit the calibration samples any closer than it does.
"""
from __future__ import annotations

from typing import Callable

import torch

from .linalg import damped
from .masks import Pattern, nm_prune_mask, quota, topk_prune_mask
from .exact_obs import cost_flops
from .swap import swap_refine

REFINE = ("none", "cg", "admm", "swap")
# The widest layer (rows·d³) the swap search takes; wider ones get cg. Its start costs a float64 factorization and
# products per row (rows·d³), its steps grow with the swaps taken. Measured at 2:4 on this project's 2-core CPU
# (experiments/permute_swap_test_reports, ResNet-18, against the default's cg on the same layers): 64 × 576 (1.2e10,
# ResNet-20's widest) 5–6 s against 2.4–3.3 s, 128 × 576 (2.4e10) 8.1 s against 2.3 s, 128 × 1152 (2e11) 38–43 s
# against 3.8–4.1 s: it stops where it would cost several times the rest of the layer's solve. (Measured before its
# steps were made lazy and its N:M start came from H⁻¹'s blocks, 2.5–3× faster on these layers; the budget stayed,
# so that results did not move.)
SWAP_BUDGET = 2e10


def swaps(rows: int, d: int) -> bool:
    """Whether the swap search takes a layer of `rows` outputs (all groups) and d inputs."""
    return cost_flops(rows, d) <= SWAP_BUDGET


def _objective(W: torch.Tensor, Q: torch.Tensor, Hd: torch.Tensor) -> torch.Tensor:
    delta = W - Q
    return (torch.bmm(delta, Hd) * delta).sum().double()


def cg_on_mask(W: torch.Tensor, Q: torch.Tensor, pruned: torch.Tensor, Hd: torch.Tensor,
               steps: int = 30, precondition: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
    """Kept weights of Q (G, rows, d) re-solved for min (w − ŵ)ᵀ Hd (w − ŵ) per row on the kept support,
    by preconditioned CG started at Q; pruned weights stay exactly 0. `precondition` maps residuals (G, rows, d)
    to search directions, zero off the support; default Jacobi (1/diag Hd), which others tried did not beat per
    second (benchmarks/cg_convergence.py)."""
    keep = (~pruned).to(W.dtype)
    X = Q * keep
    R = torch.bmm(W - X, Hd) * keep  # the negative gradient on the support
    if precondition is None:
        dinv = 1 / torch.diagonal(Hd, dim1=-2, dim2=-1)[:, None, :]
        precondition = dinv.__mul__
    Z = precondition(R)
    P = Z.clone()
    rz = (R * Z).sum(-1, keepdim=True)
    for _ in range(steps):
        AP = torch.bmm(P, Hd) * keep
        pAp = (P * AP).sum(-1, keepdim=True)
        alpha = torch.where(pAp > 0, rz / pAp.clamp_min(1e-30), torch.zeros_like(pAp))
        X.addcmul_(alpha, P)
        R.addcmul_(alpha, AP, value=-1)
        Z = precondition(R)
        rz_new = (R * Z).sum(-1, keepdim=True)
        beta = torch.where(rz > 0, rz_new / rz.clamp_min(1e-30), torch.zeros_like(rz))
        P = Z + beta * P
        rz = rz_new
    return X


def project(V: torch.Tensor, pattern: Pattern, scale: torch.Tensor, start: torch.Tensor) -> torch.Tensor:
    """Pruned mask of the pattern nearest to V (G, rows, d) in the norm weighted by `scale` (G, 1, d):
    the smallest |v|·scale pruned, layer-wide (unstructured) or in each group of m (N:M)."""
    scores = V.abs() * scale
    if pattern.is_nm:
        return nm_prune_mask(scores, pattern.n, pattern.m)
    span = V.shape[-1] * V.shape[-2]
    return topk_prune_mask(scores, quota(pattern.sparsity, start, start + span))


def admm(W: torch.Tensor, Q: torch.Tensor, pruned: torch.Tensor, Hd: torch.Tensor, pattern: Pattern,
         scale: torch.Tensor, steps: int = 60, rho0: float = 0.1, growth: float = 1.15
         ) -> tuple[torch.Tensor, torch.Tensor]:
    """ADMM for the layer-wide mask, started at a solved layer (Q, pruned); returns (Ŵ, pruned) on its final
    mask, re-solved by CG. `scale` (G, 1, d): each input's norm, so that weights are compared by their effect
    on the output (a dead input's weights go first). ρ is relative to the mean diagonal of H and grows
    by `growth` per step on average, so that D and Z meet within `steps`."""
    G, rows, d = W.shape
    mean = torch.diagonal(Hd, dim1=-2, dim2=-1).mean(-1)[:, None, None]
    start = torch.arange(G) * (rows * d)  # the layer's weights counted group by group (see masks.quota)
    WH = torch.bmm(W, Hd)
    Z, V, mask = Q.clone(), torch.zeros_like(W), pruned
    rho, factored = rho0, None
    eye = torch.eye(d, dtype=W.dtype, device=W.device)
    for k in range(steps):
        if factored is None or factored[0] != rho:  # a new factor only when ρ moves (every third step)
            factored = (rho, torch.linalg.cholesky(Hd + rho * mean * eye))
        L = factored[1]
        # D (H + ρI) = WH + ρ(Z − V), rows as vectors: solve with the symmetric factor
        rhs = WH + rho * mean * (Z - V)
        D = torch.cholesky_solve(rhs.transpose(-1, -2), L).transpose(-1, -2)
        mask = project(D + V, pattern, scale, start)
        Z = (D + V).masked_fill(mask, 0)
        V.add_(D - Z)
        if k % 3 == 2:
            rho *= growth ** 3
    return cg_on_mask(W, Z, mask, Hd), mask


def effective(kind: str, W: torch.Tensor) -> str:
    """What `kind` runs on weights W (G, rows, d): swap within SWAP_BUDGET, cg beyond."""
    return "cg" if kind == "swap" and not swaps(W.shape[0] * W.shape[1], W.shape[-1]) else kind


def refine(kind: str, W: torch.Tensor, Q: torch.Tensor, pruned: torch.Tensor, H: torch.Tensor,
           pattern: Pattern, percdamp: float = 0.01, steps: int = 30) -> tuple[torch.Tensor, torch.Tensor]:
    """The one entry point: (Ŵ, pruned) after `kind` ('none', 'cg', 'admm', 'swap') on a solved layer
    (G, rows, d)."""
    if kind == "none":
        return Q, pruned
    if kind not in REFINE:
        raise ValueError(f"unknown refinement '{kind}'; choose from {', '.join(REFINE)}")
    Hd = damped(H, percdamp)
    if effective(kind, W) == "swap":
        return swap_refine(W, pruned, Hd, pattern, torch.diagonal(H, dim1=-2, dim2=-1) == 0)
    best = (cg_on_mask(W, Q, pruned, Hd, steps), pruned)
    if kind == "admm":
        scale = torch.diagonal(H, dim1=-2, dim2=-1).clamp_min(0).sqrt()[:, None, :]
        cand = admm(W, Q, pruned, Hd, pattern, scale)
        if _objective(W, cand[0], Hd) < _objective(W, best[0], Hd):
            best = cand
    return best
