"""Optimal Brain Surgeon on blocks of columns: the cost of removing a block of a layer's inputs (an input channel's
k×k taps, or the positions a flattened channel spans) and the optimal update of the weights that stay
(OBC's and ZipLM's structured formulation), with H⁻¹ updated exactly after each removal.

For W (rows, d), H = XXᵀ/N (d, d) and a block B of columns, removing W[:, B] and re-fitting the rest costs
    ΔE_B = tr(W_B (H⁻¹_BB)⁻¹ W_Bᵀ)      (the output error ‖(W − Ŵ)X‖²/N it adds)
with the update  W ← W − W_B (H⁻¹_BB)⁻¹ H⁻¹_B,:
and the downdate H⁻¹ ← H⁻¹ − H⁻¹_:,B (H⁻¹_BB)⁻¹ H⁻¹_B,: .

A greedy that removes many blocks one chunk at a time (a channel group's cost curve) holds H⁻¹ and WᵀW in `BlockOBS`,
which keeps the updates as low-rank factors and applies them to the d×d matrices only every FLUSH_RANK columns.
"""
from __future__ import annotations

import torch

from .linalg import damped, damped_cholesky


def damped_inverse(H: torch.Tensor, percdamp: float) -> torch.Tensor:
    """(H + λI)⁻¹ with λ = percdamp · mean diag(H) (dead inputs' diagonal set to 1), in float64; percdamp raised
    tenfold, with a warning, while H + λI is not positive definite (linalg.damped_cholesky)."""
    return torch.cholesky_inverse(damped_cholesky(H[None].double(), percdamp))[0]


FLUSH_RANK = 256  # columns of pending downdates applied at once: two d×d passes per 256 removed columns


class BlockOBS:
    """The greedy's state for one consumer under block removals: H⁻¹ (d, d) and the Gram K = WᵀW (d, d) of its
    weights W (rows, d), float64, for the units `blocks` (U, b) (unit u owns the columns blocks[u]).

    A cost reads W only through K: ΔE_B = tr(M⁻¹ K_BB) with M = H⁻¹_BB. Removing block B with L Lᵀ = M is the
    rank-|B| downdate H⁻¹ −= V Vᵀ, W −= Y Vᵀ, with V = H⁻¹_:,B L⁻ᵀ and Y = W_:,B L⁻ᵀ (the module's update, factored),
    so with W₀, K₀ = W₀ᵀW₀ and H⁻¹₀ as of the last flush and the factors stacked since,
        H⁻¹ = H⁻¹₀ − V Vᵀ,    K = K₀ − C Vᵀ − V Cᵀ + V T Vᵀ,    C = W₀ᵀY, T = YᵀY,
    and C, T follow from K₀ and the factors alone (W is never formed). A step reads only the submatrices it needs,
    and the d×d matrices are rewritten once per FLUSH_RANK removed columns: on a 4096-wide Linear removed 8 channels
    at a time, rewriting W and H⁻¹ after every chunk was almost all of the cost curve's time. Removed blocks' rows
    and columns are zero in exact arithmetic; a flush drops them (the matrices shrink to the columns alive, `pos`
    maps a column to its place), and in between their rounding noise reaches only their own entries (the greedy
    prices only units still alive)."""

    def __init__(self, W: torch.Tensor, Hinv: torch.Tensor, blocks: torch.Tensor):
        d = Hinv.shape[0]
        self.Hinv, self.K, self.blocks = Hinv, W.t() @ W, blocks.to(Hinv.device)
        self.V, self.C = Hinv.new_zeros(d, 0), Hinv.new_zeros(d, 0)
        self.T = Hinv.new_zeros(0, 0)
        self.pos = torch.arange(d, device=Hinv.device)  # a column's index in the compacted matrices (-1: removed)
        self.removed = torch.zeros(d, dtype=torch.bool, device=Hinv.device)  # compacted index: removed since flush

    def hinv(self, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
        """H⁻¹[rows][:, cols] with the pending downdates; rows (..., a), cols (..., c) -> (..., a, c)."""
        r, c = self.pos[rows], self.pos[cols]
        return self.Hinv[r[..., :, None], c[..., None, :]] - self.V[r] @ self.V[c].transpose(-1, -2)

    def gram(self, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
        """K[rows][:, cols] = W_rowsᵀW_cols with the pending updates; shapes as `hinv`."""
        r, c = self.pos[rows], self.pos[cols]
        Vr, Vc = self.V[r], self.V[c].transpose(-1, -2)
        return (self.K[r[..., :, None], c[..., None, :]] - self.C[r] @ Vc - Vr @ self.C[c].transpose(-1, -2)
                + Vr @ self.T @ Vc)

    def costs(self, units: torch.Tensor) -> torch.Tensor:
        """ΔE of removing each unit alone, units (U,) -> (U,)."""
        B = self.blocks[units]
        return _trace_solve(self.hinv(B, B), self.gram(B, B))

    def joint(self, base: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
        """ΔE of removing the units `base` (m,) together with each of the units `candidates` (P,) -> (P,). Only
        (m + 1)·b-sized submatrices are read, so a greedy can grow a set without updating anything."""
        cols = torch.cat([self.blocks[base].flatten().expand(len(candidates), -1), self.blocks[candidates]], 1)
        return _trace_solve(self.hinv(cols, cols), self.gram(cols, cols))

    def remove(self, units: torch.Tensor) -> None:
        """Remove the units' columns: W's kept columns take the optimal update, H⁻¹ becomes the inverse Hessian of
        the remaining columns (both pending until the next flush)."""
        block = self.blocks[units].flatten()
        b = self.pos[block]
        HB = self.Hinv[:, b] - self.V @ self.V[b].t()  # (d, b)
        L = torch.linalg.cholesky(HB[b])

        def right(X: torch.Tensor) -> torch.Tensor:  # X L⁻ᵀ
            return torch.linalg.solve_triangular(L, X.t(), upper=False).t()

        VB = self.V[b]
        Cn = right(self.K[:, b] - self.C @ VB.t())  # W₀ᵀ Y_new, W_:,B = W₀_:,B − Y V_Bᵀ
        YtY = right(self.C[b].t() - self.T @ VB.t())  # Yᵀ Y_new (r, b)
        YnYn = right(right(self.gram(block, block)).t())  # Y_newᵀ Y_new = L⁻¹ K_BB L⁻ᵀ
        self.T = torch.cat([torch.cat([self.T, YtY], 1), torch.cat([YtY.t(), YnYn], 1)], 0)
        self.C = torch.cat([self.C, Cn], 1)
        self.V = torch.cat([self.V, right(HB)], 1)
        self.removed[b] = True
        if self.V.shape[1] >= FLUSH_RANK:
            self.flush()

    def flush(self) -> None:
        """Apply the pending downdates to H⁻¹ and K, and drop the removed columns' rows and columns (they are zero
        in exact arithmetic): each later flush works on the columns still alive, a third of the flops of flushes
        at full size over a whole removal curve."""
        if self.V.shape[1]:
            Q = (self.C - 0.5 * self.V @ self.T) @ self.V.t()  # K −= Q + Qᵀ: one d×d product, not two
            self.K.sub_(Q).sub_(Q.t())
            self.Hinv.sub_(self.V @ self.V.t())
        keep = ~self.removed
        if not bool(keep.all()):
            idx = keep.nonzero().flatten()
            self.K, self.Hinv = self.K[idx[:, None], idx], self.Hinv[idx[:, None], idx]  # one gather each
            moved = torch.where(keep, torch.cumsum(keep.long(), 0) - 1, -1)  # compacted index -> the new one
            self.pos = torch.where(self.pos >= 0, moved[self.pos.clamp_min(0)], -1)
        d = self.K.shape[0]
        self.V, self.C, self.T = self.Hinv.new_zeros(d, 0), self.Hinv.new_zeros(d, 0), self.Hinv.new_zeros(0, 0)
        self.removed = torch.zeros(d, dtype=torch.bool, device=self.K.device)


class OwnEnergy:
    """BlockOBS's interface without updates, for a consumer too wide for a d×d inverse: a unit's cost is the output
    energy its columns carry alone, tr(W_B H_BB W_Bᵀ), whatever else was removed, and costs of units removed together
    add."""

    def __init__(self, W: torch.Tensor, H: torch.Tensor, blocks: torch.Tensor):
        """W (rows, d) float64; H (d, d) LayerPruner's 2XXᵀ/N in any precision, read block by block."""
        self.own = torch.stack([(W[:, b] @ (H[b[:, None], b].double() / 2) * W[:, b]).sum() for b in blocks])

    def costs(self, units: torch.Tensor) -> torch.Tensor:
        return self.own[units]

    def joint(self, base: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
        return self.own[base].sum() + self.own[candidates]

    def remove(self, units: torch.Tensor) -> None:
        pass


def _trace_solve(M: torch.Tensor, G: torch.Tensor) -> torch.Tensor:
    """tr(M⁻¹G) = tr(W_B M⁻¹ W_Bᵀ) per block: M (U, b, b) the blocks of H⁻¹, G (U, b, b) the Grams W_BᵀW_B."""
    return torch.diagonal(torch.cholesky_solve(G, torch.linalg.cholesky(M)), dim1=1, dim2=2).sum(1)


def refit_without(W: torch.Tensor, H: torch.Tensor, removed: torch.Tensor, percdamp: float) -> torch.Tensor:
    """The least-squares weights once the columns `removed` are gone: argmin ‖(W − Ŵ)X‖², Ŵ[:, removed] = 0,
    i.e. Ŵ_R = W_R + W_S H_SR H_RR⁻¹ (H damped as in the solve), in float64 from H in any precision. The same as
    removing the blocks one by one with BlockOBS.remove, in any order. Only H's kept blocks are copied (a 25088-wide
    VGG classifier's H is 2.5 GB in float32)."""
    d = W.shape[1]
    keep = torch.ones(d, dtype=torch.bool, device=W.device)
    keep[removed] = False
    R, S = keep.nonzero().flatten(), (~keep).nonzero().flatten()
    if len(S) == 0:
        return W.double().clone()
    A = damped(H, percdamp, keep=R, dtype=torch.float64)  # H_RR, damped as the whole of H is
    L = torch.linalg.cholesky(A)
    del A
    rhs = (W.double()[:, S] @ H[S[:, None], R].double()).t()  # (|R|, rows); H_SR needs no damping
    out = torch.zeros_like(W, dtype=torch.float64)
    out[:, R] = W.double()[:, R] + torch.cholesky_solve(rhs, L).t()
    return out
