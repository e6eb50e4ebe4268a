"""The dense linear algebra under the solver: the factor of H⁻¹ it needs, and H's accumulation.

Both are written for memory as much as for speed: on the widest layers their d×d temporaries decide
the peak memory of a whole prune.
"""
from __future__ import annotations

import warnings

import torch


def _lower_triangular_inverse_(L: torch.Tensor, leaf: int = 1024) -> torch.Tensor:
    """Invert a batch of lower-triangular matrices in place, by 2x2 block recursion: [[A, 0], [C, D]]⁻¹ =
    [[A⁻¹, 0], [-D⁻¹CA⁻¹, D⁻¹]]. The off-diagonal blocks become GEMMs, which run faster on CPU than one
    triangular solve against the identity, and no second d×d matrix is needed."""
    d = L.shape[-1]
    if d <= leaf:
        eye = torch.eye(d, dtype=L.dtype, device=L.device)
        L.copy_(torch.linalg.solve_triangular(L, eye.expand_as(L), upper=False))
        return L
    h = d // 2
    Ai, Di = _lower_triangular_inverse_(L[..., :h, :h], leaf), _lower_triangular_inverse_(L[..., h:, h:], leaf)
    C = L[..., h:, :h]
    C.copy_(-(Di @ (C @ Ai)))
    return L


def _reverse_(M: torch.Tensor, step: int = 256) -> torch.Tensor:
    """M.flip(-2, -1) in place (row i ↔ row d-1-i, each reversed), a few rows at a time: no d×d copy."""
    d = M.shape[-2]
    half = (d + 1) // 2
    for a in range(0, half, step):
        b = min(a + step, half)
        top, bottom = M[..., a:b, :], M[..., d - b:d - a, :]  # they share the middle row when d is odd
        saved = top.clone()
        top.copy_(bottom.flip(-2, -1))
        bottom.copy_(saved.flip(-2, -1))
    return M


def _with_damping(H: torch.Tensor, percdamp: float, factor) -> tuple[torch.Tensor, float]:
    """factor(λ) with λ = damp · mean diag(H) per matrix (G, 1), damp = percdamp raised tenfold while factor returns
    None (a failed factorization or a factor that is not finite), with a warning when it had to be raised."""
    mean_diag = torch.diagonal(H, dim1=-2, dim2=-1).mean(-1)[:, None]
    pd = percdamp
    for _ in range(8):
        F = factor(pd * mean_diag)
        if F is not None:
            if pd != percdamp:
                warnings.warn(f"Cholesky failed at percdamp={percdamp:g}; succeeded at {pd:g}", RuntimeWarning)
            return F, pd
        pd = max(pd, 1e-4) * 10
    raise torch.linalg.LinAlgError(f"Hessian not positive definite even with percdamp={pd / 10:g}")


def _damped_flipped_cholesky(H: torch.Tensor, percdamp: float, finish) -> tuple[torch.Tensor, float]:
    """L with J(H + damp·I)J = LLᵀ (J reverses the order), turned into a factor by `finish(L)` in place;
    damping is raised tenfold while the factorization fails or the factor is not finite."""
    def factor(add):
        A = H.flip(-2, -1)
        torch.diagonal(A, dim1=-2, dim2=-1).add_(add)
        L, info = torch.linalg.cholesky_ex(A)
        del A  # at most two d×d matrices besides H, which decides the peak memory of a wide layer
        if info.any():
            return None
        F = finish(L)
        return F if torch.isfinite(F).all() else None
    return _with_damping(H, percdamp, factor)


def damped_cholesky(H: torch.Tensor, percdamp: float) -> torch.Tensor:
    """Lower L with damped(H) = LLᵀ (G, d, d), the damping raised tenfold while that fails (a covariance of
    nearly constant inputs can be singular to rounding)."""
    dead = torch.diagonal(H, dim1=-2, dim2=-1) == 0

    def factor(add):
        A = H.clone()
        torch.diagonal(A, dim1=-2, dim2=-1).add_(add).masked_fill_(dead, 1)
        L, info = torch.linalg.cholesky_ex(A)
        del A  # H, A and L at the peak: a wide layer's d×d float64 three times, not four
        return None if info.any() or not torch.isfinite(L).all() else L
    return _with_damping(H, percdamp, factor)[0]


def damped(H: torch.Tensor, percdamp: float, keep: torch.Tensor | None = None,
           dtype: torch.dtype | None = None) -> torch.Tensor:
    """A copy of H (G, d, d) with percdamp · mean diag(H) added to its diagonal, and dead inputs' (zero)
    diagonal entries set to 1: their weights are free, so any value keeps the system positive definite.
    keep: copy only these rows and columns (λ still from H's whole diagonal: a wide layer's H need not be copied
    whole); dtype: the copy's (and λ's) precision, H's by default."""
    dtype = dtype or H.dtype
    lam = percdamp * torch.diagonal(H, dim1=-2, dim2=-1).to(dtype).mean(-1, keepdim=True)
    Hd = H.clone() if keep is None else H[..., keep[:, None], keep]
    Hd = Hd.to(dtype)
    diag = torch.diagonal(Hd, dim1=-2, dim2=-1)
    dead = diag == 0
    diag.add_(lam).masked_fill_(dead, 1)
    return Hd


def upper_cholesky(H: torch.Tensor, percdamp: float) -> tuple[torch.Tensor, float]:
    """Upper-triangular Ũ with H + damp·I = ŨŨᵀ for a batch (G, d, d): Ũ = J L J. The factor SparseGPT
    needs is U = Ũ⁻¹ (H⁻¹ = UᵀU), but only its diagonal blocks explicitly: the solver applies the rest by
    block substitution with Ũ, so the d×d triangular inverse (a third of the factorization) is never done."""
    return _damped_flipped_cholesky(H, percdamp, _reverse_)


def inverse_cholesky(H: torch.Tensor, percdamp: float) -> tuple[torch.Tensor, float]:
    """The upper Cholesky factor U of (H + damp·I)⁻¹ = UᵀU itself: U = J L⁻¹ J, one factorization and one
    in-place triangular inverse (H⁻¹ is never formed). For solvers that need all of U (the benchmark's
    naive one)."""
    return _damped_flipped_cholesky(H, percdamp, lambda L: _reverse_(_lower_triangular_inverse_(L)))


def accumulate_xxt_(H: torch.Tensor, X: torch.Tensor, beta: float = 1.0, alpha: float = 1.0,
                    mirror: bool = True) -> torch.Tensor:
    """H ← beta·H + alpha·XXᵀ for H (G, d, d), X (G, d, T), computing only the blocks on and above the
    diagonal (a blocked syrk: up to half of the dominant cost of pruning a CNN), then mirroring the rest
    (mirror=False: left for `mirror_upper_` once, after many such sums; only the upper blocks are then valid).

    H comes out exactly symmetric on every path and device: a GEMM's product XXᵀ is not bitwise
    symmetric with every BLAS kernel, so even the diagonal blocks take their lower half from the upper.
    """
    for a, b in _block_rows(H.shape[-1]):
        H[:, a:b, a:].baddbmm_(X[:, a:b], X[:, a:].transpose(1, 2), beta=beta, alpha=alpha)
    return mirror_upper_(H) if mirror else H


def add_upper_(S: torch.Tensor, chunk: torch.Tensor) -> torch.Tensor:
    """S += chunk on the blocks `accumulate_xxt_` computes (on and above the diagonal): half the traffic of a
    full add, for sums mirrored once at the end."""
    for a, b in _block_rows(S.shape[-1]):
        S[:, a:b, a:] += chunk[:, a:b, a:]
    return S


def mirror_upper_(H: torch.Tensor) -> torch.Tensor:
    """The lower half of H (G, d, d) set from its upper blocks, in place: H exactly symmetric."""
    for a, b in _block_rows(H.shape[-1]):
        D = H[:, a:b, a:b]
        D.copy_(D.triu() + D.triu(1).transpose(1, 2))
        H[:, b:, a:b] = H[:, a:b, b:].transpose(1, 2)
    return H


def _block_rows(d: int) -> list[tuple[int, int]]:
    """The row blocks of the blocked syrk: up to 8, at least 144 rows each (smaller GEMMs lose efficiency)."""
    k = max(1, min(8, d // 144))
    edges = [round(i * d / k) for i in range(k + 1)]
    return list(zip(edges[:-1], edges[1:]))
