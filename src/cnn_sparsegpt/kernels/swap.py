"""Exact OBS swaps of a solved layer's mask (`--refine swap`): a local search after the greedy.

Each row's error on a mask, with its kept weights K optimal, is E(K) = wᵀHw − b_Kᵀ H_KK⁻¹ b_K (b = Hw). Swapping
a kept weight j for a pruned weight i in the same row (same group of m for N:M, so the pattern holds) changes it by

    ΔE = ŵ_j²/u_jj − (g_i + ŵ_j A_ij/u_jj)² / (S_i + A_ij²/u_jj)

(removal of j by OBS, then the gain of freeing i on the smaller support), with u = H_KK⁻¹'s column j, ŵ = H_KK⁻¹b_K,
A = H_:K H_KK⁻¹, g = b − H_:K ŵ and S_i = H_ii − c_iᵀH_KK⁻¹c_i (i's Schur complement). Every candidate is priced at
once (O(d²) per row); the best one is taken where it lowers E, H_KK⁻¹ and A follow by rank-one updates, and the
search stops when no swap helps (or after `max_swaps` per row). The greedy (exact_obs.py, SparseGPT) removes
weights one at a time and never takes one back: this moves its mask to a local minimum of the same objective.
Costs rows·d² per swap plus one rows·d³ inverse per row batch, so the solver's budget applies (refine.py).
"""
from __future__ import annotations

import torch

from .masks import Pattern

MEMORY = 256 * 2**20  # bytes of row-batch state (two d×d float64 matrices per row) at a time
TOL = 1e-9  # a swap must lower the row's error by this fraction of wᵀHw: no cycling on rounding


@torch.no_grad()
def swap_refine(W: torch.Tensor, pruned: torch.Tensor, Hd: torch.Tensor, pattern: Pattern,
                max_swaps: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """W (G, rows, d) the weights the layer fits, `pruned` a mask of the pattern, Hd (G, d, d) the damped Hessian
    -> (Ŵ, pruned): the mask after the swaps and its optimal kept weights (float64 inside)."""
    G, rows, d = W.shape
    Q = torch.empty_like(W)
    out = pruned.clone()
    batch = max(1, min(rows, MEMORY // (2 * d * d * 8)))
    group = None
    if pattern.is_nm:  # i and j must share a group of m consecutive inputs
        ids = torch.arange(d, device=W.device) // pattern.m
        group = ids[:, None] == ids[None, :]
    limit = max_swaps if max_swaps is not None else d
    for g in range(G):
        H = Hd[g].double()
        for r0 in range(0, rows, batch):
            w = W[g, r0:r0 + batch].double()
            q, p = _search(w, out[g, r0:r0 + batch].clone(), H, group, limit)
            Q[g, r0:r0 + batch] = q.to(W.dtype)
            out[g, r0:r0 + batch] = p
    return Q, out


def _search(w: torch.Tensor, pruned: torch.Tensor, H: torch.Tensor, group: torch.Tensor | None,
            limit: int) -> tuple[torch.Tensor, torch.Tensor]:
    B, d = w.shape
    keep = ~pruned
    kk = (keep[:, :, None] & keep[:, None, :]).to(H.dtype)
    M = H * kk + torch.diag_embed(pruned.to(H.dtype))  # pruned inputs decoupled: H_KK's inverse, 1 elsewhere
    Kinv = torch.cholesky_inverse(torch.linalg.cholesky(M)) * kk  # H_KK⁻¹, zero on pruned rows and columns
    N = H @ Kinv  # N[i, j] = c_iᵀ u_j (A above, for every i)
    b = w @ H
    energy = (b * w).sum(1)
    diagH = torch.diagonal(H)
    ar = torch.arange(B, device=w.device)
    active = torch.ones(B, dtype=torch.bool, device=w.device)
    for _ in range(limit):
        what = torch.bmm(Kinv, b[:, :, None]).squeeze(2)
        u = torch.diagonal(Kinv, dim1=1, dim2=2)
        u = torch.where(keep, u, torch.ones_like(u))  # pruned j are never candidates: any finite value
        gres = b - what @ H
        S = diagH - (N * H).sum(-1)
        wj, uj = what[:, None, :], u[:, None, :]
        dE = wj.square() / uj - (gres[:, :, None] + wj * N / uj).square() / (S[:, :, None] + N.square() / uj)
        valid = pruned[:, :, None] & keep[:, None, :]
        if group is not None:
            valid &= group
        dE = torch.where(valid & active[:, None, None], dE, torch.full_like(dE, torch.inf))
        best, flat = dE.flatten(1).min(1)
        take = best < -TOL * energy
        if not take.any():
            break
        active &= take
        r, i, j = ar[take], flat[take] // d, flat[take] % d
        # j leaves K: H_KK⁻¹ −= u uᵀ/u_jj (its row and column become 0), N follows
        col = Kinv[r, :, j]
        scale = 1 / col[torch.arange(len(r)), j]
        Kinv[r] -= scale[:, None, None] * col[:, :, None] * col[:, None, :]
        Kinv[r, j, :] = 0
        Kinv[r, :, j] = 0
        N[r] -= scale[:, None, None] * (col @ H)[:, :, None] * col[:, None, :]
        keep[r, j], pruned[r, j] = False, True
        # i joins K: bordered inverse, z = (H_KK⁻¹ c_i, −1 at i), H_KK⁻¹ += z zᵀ/S_i
        z = N[r, i, :] * keep[r].to(H.dtype)
        s = diagH[i] - (z * H[i]).sum(1)
        z[torch.arange(len(r)), i] = -1
        Kinv[r] += z[:, :, None] * z[:, None, :] / s[:, None, None]
        N[r] += (z @ H)[:, :, None] * z[:, None, :] / s[:, None, None]
        keep[r, i], pruned[r, i] = True, False
    what = torch.bmm(Kinv, b[:, :, None]).squeeze(2)
    return what.masked_fill(pruned, 0), pruned
