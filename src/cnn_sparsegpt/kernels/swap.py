"""Exact OBS swaps of a solved layer's mask (`--refine swap`): a local search after the greedy.

Each row's error on a mask, with its kept weights K optimal, is E(K) = wᵀHw − b_Kᵀ H_KK⁻¹ b_K (b = Hw). Swapping
a kept weight j for a pruned weight i in the same row (same group of m for N:M, so the pattern holds) changes it by

    ΔE = ŵ_j²/u_jj − (g_i + ŵ_j A_ij/u_jj)² / (S_i + A_ij²/u_jj)

(removal of j by OBS, then the gain of freeing i on the smaller support), with u = H_KK⁻¹'s column j, ŵ = H_KK⁻¹b_K,
A = H_:K H_KK⁻¹, g = b − H_:K ŵ and S_i = H_ii − c_iᵀH_KK⁻¹c_i (i's Schur complement). Every candidate is priced at
once; each row takes its best swap where that lowers E, and H_KK⁻¹, A, ŵ, g and S follow by rank-one updates
(O(d²) per swap), until no swap helps. The greedy (exact_obs.py, SparseGPT) removes weights one at a time and
never takes one back: this moves its mask to a local minimum of the same objective (tested by brute force).
Costs O(rows·d³) to start (a factorization and products per row) plus O(rows·d·swaps) per swap, so it runs within
a budget (refine.py). N:M keeps only the m×m blocks of A that a swap can use, and starts and ends from the layer's
H⁻¹ (every row prunes the same number p of inputs): with P a row's pruned inputs,
H_KK⁻¹ = H⁻¹_KK − H⁻¹_KP (H⁻¹_PP)⁻¹ H⁻¹_PK, H_PK H_KK⁻¹ = −(H⁻¹_PP)⁻¹ H⁻¹_PK and S_P = diag((H⁻¹_PP)⁻¹), so a row
factors a p×p block, not d×d; the final weights are OBS's ŵ = w − H⁻¹_:P (H⁻¹_PP)⁻¹ w_P (as H⁻¹b = w).
"""
from __future__ import annotations

import torch

from .masks import Pattern

MEMORY = 256 * 2**20  # bytes of row-batch state (d×d float64 matrices per row) at a time
TOL = 1e-9  # a swap must lower the row's error by this fraction of wᵀHw: no cycling on rounding


@torch.no_grad()
def swap_refine(W: torch.Tensor, pruned: torch.Tensor, Hd: torch.Tensor, pattern: Pattern,
                dead: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """W (G, rows, d) the weights the layer fits, `pruned` a mask of the pattern, Hd (G, d, d) the damped Hessian,
    dead (G, d) inputs that were always zero (never brought back; a kept one keeps its weight)
    -> (Ŵ, pruned): the mask after the swaps and its optimal kept weights (float64 inside)."""
    G, rows, d = W.shape
    Q = torch.empty_like(W)
    out = pruned.clone()
    full = not pattern.is_nm  # unstructured: A in full; N:M: its diagonal m×m blocks
    batch = max(1, min(rows, MEMORY // ((3 if full else 2) * d * d * 8)))  # H_KK⁻¹ and H·H_KK⁻¹ at the start, A
    for g in range(G):
        H = Hd[g].double()
        Hinv = torch.cholesky_inverse(torch.linalg.cholesky(H)) if pattern.is_nm else None
        gone = torch.zeros(d, dtype=torch.bool, device=W.device) if dead is None else dead[g]
        for r0 in range(0, rows, batch):
            w = W[g, r0:r0 + batch].double()
            q, p = _search(w.masked_fill(gone, 0), out[g, r0:r0 + batch], H, gone, pattern, Hinv)
            Q[g, r0:r0 + batch] = torch.where(gone & ~p, w, q).to(W.dtype)
            out[g, r0:r0 + batch] = p
    return Q, out


def _search(w: torch.Tensor, pruned: torch.Tensor, H: torch.Tensor, dead: torch.Tensor,
            pattern: Pattern, Hinv: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The swaps of a batch of rows w (B, d) sharing H: -> (their optimal kept weights, their final masks). Hinv
    (N:M only): H⁻¹, whose blocks give the start and the final weights.

    H_KK⁻¹ is never rewritten: it is the starting inverse K0 plus the rank-one terms of the swaps so far, Σ α z zᵀ,
    and a step reads only the two columns it needs (of K0, and of K0·H for the bordered inverse), so a step costs
    O(d·swaps) per row instead of three passes over its d×d state."""
    B, d = w.shape
    m = pattern.m if pattern.is_nm else d  # candidates: pairs in the same block of m inputs (one block: all)
    nb = d // m
    out = pruned.clone()
    keep = ~pruned
    if Hinv is not None:  # N:M, every row prunes as many: from H⁻¹'s p×p blocks
        K0, A0, S = _start_from_inverse(Hinv, keep)
    else:
        K0 = _masked(torch.cholesky_inverse(torch.linalg.cholesky(_decoupled(H, keep))), keep)
        A0 = H @ K0  # A0[i, j] = c_iᵀu_j at the start; its row i is K0·c_i
        S = torch.diagonal(H) - (A0 * H).sum(-1)
    A = torch.diagonal(A0.view(B, nb, m, nb, m), dim1=1, dim2=3).permute(0, 3, 1, 2).contiguous()  # (B, nb, m, m)
    b = w @ H
    what = torch.bmm(K0, b[:, :, None]).squeeze(2)
    g = b - what @ H
    u = torch.diagonal(K0, dim1=1, dim2=2).clone()
    Z = w.new_zeros(B, 0, d)  # the rank-one terms' vectors z and weights α: H_KK⁻¹ = K0 + Σ_k α_k z_k z_kᵀ
    alpha = w.new_zeros(B, 0)
    floor = -TOL * (b * w).sum(1)
    rows = torch.arange(B, device=w.device)  # the rows still searching; the state holds only those
    for _ in range(d):
        uj = torch.where(keep, u, torch.ones_like(u)).view(-1, nb, 1, m)  # pruned j are never candidates
        wj = what.view(-1, nb, 1, m)
        dE = wj.square() / uj - (g.view(-1, nb, m, 1) + wj * A / uj).square() \
            / (S.view(-1, nb, m, 1) + A.square() / uj)
        valid = (~keep & ~dead).view(-1, nb, m, 1) & keep.view(-1, nb, 1, m)
        best, flat = torch.where(valid, dE, torch.full_like(dE, torch.inf)).flatten(1).min(1)
        take = best < floor
        if not take.all():  # a row with no better swap never gets one (its state stays): record it, drop it
            out[rows[~take]] = ~keep[~take]
            if not take.any():
                break
            A, S, u, what, g, keep, floor, flat, rows, Z, alpha = (
                x[take] for x in (A, S, u, what, g, keep, floor, flat, rows, Z, alpha))
        n = torch.arange(len(rows), device=w.device)  # K0 and A0 stay whole: read at rows[n]
        blk, rest = flat // (m * m), flat % (m * m)
        i, j = blk * m + rest // m, blk * m + rest % m
        state = (A, S, u, what, g, H)
        # j leaves K: H_KK⁻¹ −= z zᵀ/z_j with z its column, ŵ −= ŵ_j/z_j · z
        z = (K0[rows, :, j] + torch.einsum("bk,bkd->bd", alpha * Z[n, :, j], Z)) * keep
        a = -1 / z[n, j]
        _update(state, z, a, -what[n, j] / z[n, j], nb, m)
        Z, alpha = torch.cat([Z, z[:, None]], 1), torch.cat([alpha, a[:, None]], 1)
        keep[n, j] = False
        u[n, j], what[n, j] = 0, 0  # exactly, not to rounding
        c = H[i]  # i joins: the bordered inverse, z = (H_KK⁻¹c_i, −1)
        z = (A0[rows, i] + torch.einsum("bk,bkd->bd", alpha * torch.einsum("bkd,bd->bk", Z, c), Z)) * keep
        s = H[i, i] - (z * c).sum(1)  # i's Schur complement on the new support
        z[n, i] = -1  # H_KK⁻¹ += z zᵀ/s, ŵ −= g_i/s · z
        _update(state, z, 1 / s, -g[n, i] / s, nb, m)
        Z, alpha = torch.cat([Z, z[:, None]], 1), torch.cat([alpha, (1 / s)[:, None]], 1)
        keep[n, i] = True
    else:
        out[rows] = ~keep
    keep = ~out
    if Hinv is not None:
        exact = _obs_from_inverse(w, Hinv, out)
    else:
        exact = torch.cholesky_solve((b * keep)[:, :, None], torch.linalg.cholesky(_decoupled(H, keep))).squeeze(2)
    return exact.masked_fill(out, 0), out  # the kept weights solved afresh: no drift from the updates


def _split(keep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Each row's pruned and kept input indices (B, p) and (B, k), ascending (every row prunes as many), and the
    batch index (B, 1, 1) for gathers."""
    B = keep.shape[0]
    P = (~keep).nonzero()[:, 1].view(B, -1)
    K = keep.nonzero()[:, 1].view(B, -1)
    return P, K, torch.arange(B, device=keep.device)[:, None, None]


def _start_from_inverse(Hinv: torch.Tensor, keep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """K0 = H_KK⁻¹ (zero off K), A0 = H·K0 and S_i = H_ii − c_iᵀK0c_i for a batch of rows, from the layer's H⁻¹
    (see the module's docstring): the same as the direct formulas up to rounding."""
    B, d = keep.shape
    P, K, b = _split(keep)
    HPK = Hinv[P[:, :, None], K[:, None, :]]
    M = torch.cholesky_inverse(torch.linalg.cholesky(Hinv[P[:, :, None], P[:, None, :]]))  # (H⁻¹_PP)⁻¹
    APK = -torch.bmm(M, HPK)  # H_PK H_KK⁻¹
    K0 = Hinv.new_zeros(B, d, d)
    K0[b, K[:, :, None], K[:, None, :]] = Hinv[K[:, :, None], K[:, None, :]] + torch.bmm(HPK.transpose(1, 2), APK)
    A0 = Hinv.new_zeros(B, d, d)
    A0[b, P[:, :, None], K[:, None, :]] = APK
    A0[b[:, :, 0], K, K] = 1  # a kept row of H·H_KK⁻¹ is the identity's on K
    S = Hinv.new_zeros(B, d)
    S[b[:, :, 0], P] = torch.diagonal(M, dim1=1, dim2=2)  # a kept input's is 0
    return K0, A0, S


def _obs_from_inverse(w: torch.Tensor, Hinv: torch.Tensor, pruned: torch.Tensor) -> torch.Tensor:
    """The optimal kept weights H_KK⁻¹(Hw)_K of rows w (B, d), by OBS from H⁻¹: w − H⁻¹_:P (H⁻¹_PP)⁻¹ w_P."""
    P, _, _ = _split(~pruned)
    L = torch.linalg.cholesky(Hinv[P[:, :, None], P[:, None, :]])
    y = torch.cholesky_solve(torch.gather(w, 1, P)[:, :, None], L)  # (B, p, 1)
    return w - torch.bmm(y.transpose(1, 2), Hinv[P]).squeeze(1)


def _masked(M: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """M (..., d, d) with each row's pruned rows and columns zeroed, keep (..., d) broadcast against M's leading dims
    (two broadcast products: no B×d×d mask)."""
    k = keep.to(M.dtype)
    return M * k[..., :, None] * k[..., None, :]


def _decoupled(H: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """H with each row's pruned inputs decoupled (identity there): its inverse is H_KK⁻¹ on K."""
    M = _masked(H, keep)
    M.diagonal(dim1=-2, dim2=-1).add_((~keep).to(H.dtype))
    return M


def _update(state: tuple, z, alpha, beta, nb: int, m: int) -> None:
    """After H_KK⁻¹ += α z zᵀ on every row, what follows: A = H·H_KK⁻¹ (its kept blocks), S = diag(H) − diag(A Hᵀ),
    u = diag(H_KK⁻¹); ŵ += β z and g = b − Hŵ with it."""
    A, S, u, what, g, H = state
    Hz = z @ H
    A.add_(alpha[:, None, None, None] * Hz.view(-1, nb, m, 1) * z.view(-1, nb, 1, m))
    S.sub_(alpha[:, None] * Hz.square())
    u.add_(alpha[:, None] * z.square())
    what.add_(beta[:, None] * z)
    g.sub_(beta[:, None] * Hz)
