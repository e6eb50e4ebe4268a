"""Optimal Brain Surgeon on blocks of columns: the cost of removing a block of a layer's inputs (an input channel's
k×k taps, or the positions a flattened channel spans) and the optimal update of the weights that stay
(OBC's and ZipLM's structured formulation), with H⁻¹ updated exactly after each removal.

For W (rows, d), H = XXᵀ/N (d, d) and a block B of columns, removing W[:, B] and re-fitting the rest costs
    ΔE_B = tr(W_B (H⁻¹_BB)⁻¹ W_Bᵀ)      (the output error ‖(W − Ŵ)X‖²/N it adds)
with the update  W ← W − W_B (H⁻¹_BB)⁻¹ H⁻¹_B,:
and the downdate H⁻¹ ← H⁻¹ − H⁻¹_:,B (H⁻¹_BB)⁻¹ H⁻¹_B,: .
"""
from __future__ import annotations

import torch

from .linalg import damped


def damped_inverse(H: torch.Tensor, percdamp: float) -> torch.Tensor:
    """(H + λI)⁻¹ with λ = percdamp · mean diag(H) (dead inputs' diagonal set to 1), in float64."""
    A = damped(H[None].double(), percdamp)[0]
    return torch.cholesky_inverse(torch.linalg.cholesky(A))


def block_costs(W: torch.Tensor, Hinv: torch.Tensor, blocks: torch.Tensor) -> torch.Tensor:
    """ΔE of removing each block alone: W (rows, d), Hinv (d, d), blocks (U, b) column indices -> (U,)."""
    M = Hinv[blocks[:, :, None], blocks[:, None, :]]  # (U, b, b)
    WB = W[:, blocks].permute(1, 2, 0)  # (U, b, rows)
    L = torch.linalg.cholesky(M)
    return (WB * torch.cholesky_solve(WB, L)).sum((1, 2))


def joint_costs(W: torch.Tensor, Hinv: torch.Tensor, base: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
    """ΔE of removing the columns `base` together with each candidate block: base (m,), candidates (P, b) ->
    (P,). Only (m + b)-sized submatrices of H⁻¹ are read, so a greedy can grow a set without updating H⁻¹."""
    cols = torch.cat([base.expand(len(candidates), -1), candidates], 1)  # (P, m + b)
    M = Hinv[cols[:, :, None], cols[:, None, :]]
    WB = W[:, cols].permute(1, 2, 0)
    L = torch.linalg.cholesky(M)
    return (WB * torch.cholesky_solve(WB, L)).sum((1, 2))


def remove_block_(W: torch.Tensor, Hinv: torch.Tensor, block: torch.Tensor) -> None:
    """Remove one block in place: W's kept columns take the optimal update, its block becomes 0, and Hinv becomes
    the inverse Hessian of the remaining columns (its block's rows and columns 0)."""
    M = Hinv[block[:, None], block[None, :]]
    Minv = torch.linalg.inv(M)
    W.sub_(W[:, block] @ Minv @ Hinv[block, :])
    Hinv.sub_(Hinv[:, block] @ Minv @ Hinv[block, :])
    W[:, block] = 0
    Hinv[block, :] = 0
    Hinv[:, block] = 0


def refit_without(W: torch.Tensor, H: torch.Tensor, removed: torch.Tensor, percdamp: float) -> torch.Tensor:
    """The least-squares weights once the columns `removed` are gone: argmin ‖(W − Ŵ)X‖², Ŵ[:, removed] = 0,
    i.e. Ŵ_R = W_R + W_S H_SR H_RR⁻¹ (H damped as in the solve). The same as removing the blocks one by one with
    remove_block_, in any order."""
    d = W.shape[1]
    keep = torch.ones(d, dtype=torch.bool, device=W.device)
    keep[removed] = False
    A = damped(H[None].double(), percdamp)[0]
    R, S = keep.nonzero().flatten(), (~keep).nonzero().flatten()
    out = torch.zeros_like(W, dtype=torch.float64)
    if len(S) == 0:
        return W.double().clone()
    L = torch.linalg.cholesky(A[R][:, R])
    rhs = (W.double()[:, S] @ A[S][:, R]).t()  # (|R|, rows)
    out[:, R] = W.double()[:, R] + torch.cholesky_solve(rhs, L).t()
    return out
