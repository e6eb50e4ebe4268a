"""ExactOBS (Frantar, Singh & Alistarh, "Optimal Brain Compression", 2022): each output row of W (rows, d) loses
its weights one at a time, always the one whose removal costs least,
    j = argmin_j  w_j² / [H⁻¹]_jj      (the output error it adds),
with the exact OBS update of the row's other weights and of the row's own inverse Hessian:
    w ← w − (w_j / [H⁻¹]_jj) H⁻¹_:,j          H⁻¹ ← H⁻¹ − H⁻¹_:,j H⁻¹_j,: / [H⁻¹]_jj .
Rows are independent; a batch of rows is processed at once, each with its own H⁻¹ (updated lazily, see _greedy).

Unstructured: every row is run to the end and its error after each removal recorded (OBC's error database); the
layer's k removals are then the k cheapest across rows (losses made non-decreasing along each row, so that each
row's share is a prefix of its own order), and each row takes the weights it had at its count (kept along the
way: one pass, not two). N:M: a weight is eligible while its group of m consecutive columns still has more than n;
the row stops after d·(m−n)/m removals.

SparseGPT approximates this (one order of columns for all rows, lazy updates); this is the exact greedy and costs
rows·d³ flops per layer: affordable for compact networks (ResNet-20: d ≤ 576), not for wide ones (cost_flops).
"""
from __future__ import annotations

import torch

from .linalg import damped
from .masks import Pattern, quota

MEMORY = 512 * 2**20  # bytes of row-batch state (H⁻¹ copies and weight history) at a time
BLOCK = 128  # removals per lazy H⁻¹ update (8% faster than 64 at d 1152, alike at 576)


def cost_flops(rows: int, d: int) -> float:
    """Multiply-adds of the exact solve of a (rows, d) layer: d rank-one updates of a d×d inverse per row."""
    return float(rows) * d ** 3


@torch.no_grad()
def exact_obs_solve(W: torch.Tensor, H: torch.Tensor, pattern: Pattern, percdamp: float = 0.01,
                    row_scale: torch.Tensor | None = None, dtype: torch.dtype = torch.float32
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """W (G, rows, d), H (G, d, d) -> (Ŵ, pruned mask, per-row loss curves (G, rows, steps) in removal order).
    H may also be (G, rows, d, d): each row's own Hessian (relu_gate.py); rows still compete for the layer's
    removals. row_scale (G, rows): each row's losses weighed by it when rows compete for the layer's removals."""
    G, rows, d = W.shape
    _, Hinv, dead, s = _inverse(H, percdamp, dtype)
    steps = d - d * pattern.n // pattern.m if pattern.is_nm else d
    Q = torch.empty_like(W)
    pruned = torch.zeros_like(W, dtype=torch.bool)
    losses = torch.zeros(G, rows, steps, dtype=torch.float64, device=W.device)
    per_row = d * (d + BLOCK + (d + 1 if not pattern.is_nm else 0)) * torch.finfo(dtype).bits // 8
    batch = max(1, min(rows, MEMORY // per_row))
    for g in range(G):
        history, orders = [], []
        for r0 in range(0, rows, batch):
            w = W[g, r0:r0 + batch].to(dtype, copy=True)
            Hb, db = (Hinv[g], dead[g]) if H.dim() == 3 else (Hinv[g, r0:r0 + batch], dead[g, r0:r0 + batch])
            hist, order, loss = _greedy(w, Hb, db, pattern, steps, keep_history=not pattern.is_nm)
            losses[g, r0:r0 + batch] = loss * (s[g] if H.dim() == 3 else s[g, r0:r0 + batch, None])
            if pattern.is_nm:
                Q[g, r0:r0 + batch] = w.to(W.dtype)
                pruned[g, r0:r0 + batch].scatter_(1, order, True)
            else:
                history.append(hist)
                orders.append(order)
        if pattern.is_nm:
            continue
        curve = losses[g] * (row_scale[g][:, None].double() if row_scale is not None else 1.0)
        counts = _row_counts(curve, int(quota(pattern.target, g * rows * d, (g + 1) * rows * d)))  # across groups
        for b, (hist, order) in enumerate(zip(history, orders)):
            r0 = b * batch
            c = counts[r0:r0 + len(order)]
            Q[g, r0:r0 + len(order)] = hist[torch.arange(len(order), device=W.device), c].to(W.dtype)
            taken = torch.arange(d, device=W.device)[None, :] < c[:, None]  # the first c of each row's order
            pruned[g, r0:r0 + len(order)].scatter_(1, order, taken)
    # A removed weight is zeroed at its step, but later steps' updates give it back rounding noise (its entry of
    # the downdated H⁻¹ is 0 only in exact arithmetic, ~1e-7 of the row here): the mask is the whole truth.
    return Q.masked_fill_(pruned, 0), pruned, losses


@torch.no_grad()
def exact_error_curve(W: torch.Tensor, H: torch.Tensor, sparsities, percdamp: float = 0.01,
                      row_scale: torch.Tensor | None = None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """‖(W − Ŵ)X‖²/‖WX‖² of the exact unstructured solve at each sparsity, from ONE greedy pass per row: its
    recorded losses are OBC's error database (each level's rows take the cheapest prefixes, _row_counts).
    W (G, rows, d), H (G, d, d) -> (len(sparsities),) float64."""
    G, rows, d = W.shape
    Hd, Hinv, dead, s = _inverse(H, percdamp, dtype)  # the losses are on the damped H: so is the norm
    curves = torch.cat([_greedy(W[g].to(dtype, copy=True), Hinv[g], dead[g], Pattern(sparsity=0.5), d,
                                keep_history=False)[2] * s[g] for g in range(G)])  # (G·rows, d)
    weights = curves * (row_scale.reshape(-1, 1).double() if row_scale is not None else 1.0)
    cumulative = torch.cat([torch.zeros(len(curves), 1, dtype=torch.float64, device=curves.device),
                            curves.cumsum(1)], 1)
    norm = float(torch.einsum("grd,gde,gre->", W.double(), Hd, W.double())) or 1.0
    out = []
    for s in sparsities:
        counts = _row_counts(weights, round(float(s) * G * rows * d))
        out.append(cumulative[torch.arange(len(curves)), counts].sum() / norm)
    return torch.stack(out).cpu()


def _inverse(H: torch.Tensor, percdamp: float, dtype: torch.dtype) -> tuple:
    """The damped H (float64), the inverse of Hd / s in the solver's dtype, the never-active inputs (free to remove,
    first) and s (...,), for a batch H (..., d, d). s is the power of 4 nearest Hd's mean diagonal: the greedy's
    steps do not depend on H's scale, but float32 holds the inverse of a Hessian of tiny inputs (1e-22: 1e44) only
    so scaled; a power of 4 scales H and the Cholesky factor exactly, so nothing else changes by rounding. A loss
    from the scaled inverse is s times too small."""
    Hd = damped(H.double(), percdamp)
    s = torch.exp2(2 * torch.round(torch.log2(torch.diagonal(Hd, dim1=-2, dim2=-1).mean(-1)) / 2))
    Hinv = torch.cholesky_inverse(torch.linalg.cholesky(Hd / s[..., None, None])).to(dtype)
    return Hd, Hinv, torch.diagonal(H, dim1=-2, dim2=-1) == 0, s


def _row_counts(curve: torch.Tensor, k: int) -> torch.Tensor:
    """How many removals each row takes so that the layer's k removals are the cheapest: incremental losses made
    non-decreasing along each row (a prefix per row), then the k smallest overall (stable: earlier steps first)."""
    rows, steps = curve.shape
    flat = torch.cummax(curve, dim=1).values.flatten()
    chosen = torch.sort(flat, stable=True).indices[:k]
    return torch.bincount(chosen // steps, minlength=rows)


def _greedy(w: torch.Tensor, Hinv: torch.Tensor, dead: torch.Tensor, pattern: Pattern, steps: int,
            keep_history: bool) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor]:
    """The greedy on a batch of rows w (B, d), in place (w ends with every step done), with H⁻¹ (d, d) shared or
    (B, d, d) per row (dead inputs (d,) or (B, d) alike). Returns the weights after
    each number of removals (B, d+1, d) when keep_history, the removal order (B, steps) and each step's loss.

    Each row's H⁻¹ is updated lazily, BLOCK removals at a time: within a block a step reads its column as
    H⁻¹[:, j] − Σ v_i v_i[j] over the block's removals so far (v_i = H⁻¹_:,j/√[H⁻¹]_jj of the i-th), and the
    block's rank-BLOCK update H⁻¹ −= VᵀV is one batched GEMM. Rewriting d² numbers per row and step (OBC's form)
    is memory-bound; lazily, most of the work runs at the GEMM rate (benchmarks/exact_obs_speed.py), with the
    same steps up to float rounding. The removed column comes out 0 of the update, as in the explicit form."""
    B, d = w.shape
    Hi = Hinv.expand(B, d, d).contiguous()  # each row's own H⁻¹, as of the current block's start
    rows_of_Hi = Hi.view(B * d, d)  # gathers as index_select on flat views: advanced indexing was a third of the time
    V = torch.empty(B, BLOCK, d, dtype=w.dtype, device=w.device)
    strides = torch.arange(BLOCK, device=w.device) * d  # v_l[j] of row b is V's flat entry b·BLOCK·d + l·d + j
    diag = torch.diagonal(Hinv, dim1=-2, dim2=-1).expand(B, d).clone()
    removed = torch.zeros(B, d, dtype=w.dtype, device=w.device)  # +inf once removed: out of the argmin
    live = (~dead).to(w.dtype)  # never-active inputs cost nothing to remove
    base = torch.arange(B, device=w.device) * d  # row b's entry j of a (B, d) view is b·d + j
    hist = torch.empty(B, d + 1, d, dtype=w.dtype, device=w.device) if keep_history else None
    if hist is not None:
        hist[:, 0] = w
    order = torch.empty(B, steps, dtype=torch.long, device=w.device)
    loss = torch.empty(B, steps, dtype=torch.float64, device=w.device)
    quota = None
    if pattern.is_nm:
        quota = torch.full((B, d // pattern.m), pattern.m - pattern.n, device=w.device)  # removals left per group
    for k in range(steps):
        i = k % BLOCK
        if i == 0 and k:
            Hi.baddbmm_(V.transpose(1, 2), V, alpha=-1)
        score = w.square().div_(diag).mul_(live)
        pick = score + removed
        if quota is not None:
            pick.masked_fill_((quota == 0).repeat_interleave(pattern.m, 1), torch.inf)
        j = torch.argmin(pick, 1)
        flat = base + j
        order[:, k] = j
        loss[:, k] = score.view(-1).index_select(0, flat).double()  # = ‖(w − ŵ)X‖²/N added (H = 2XXᵀ/N)
        col = rows_of_Hi.index_select(0, flat)  # (B, d): row j of each (symmetric) H⁻¹ = its column j
        if i:
            vj = V.view(-1).index_select(0, ((base * BLOCK + j)[:, None] + strides[:i]).view(-1)).view(B, 1, i)
            col.sub_(torch.bmm(vj, V[:, :i]).squeeze(1))
        hjj = col.view(-1).index_select(0, flat)
        w.sub_(col * (w.view(-1).index_select(0, flat) / hjj)[:, None])
        w.view(-1).index_fill_(0, flat, 0)
        v = col.div_(hjj.sqrt()[:, None])
        V[:, i] = v
        diag.sub_(v.square())
        diag.view(-1).index_fill_(0, flat, 1)  # removed: keeps the division finite (its later v's are 0 up to rounding)
        removed.view(-1).index_fill_(0, flat, torch.inf)
        if quota is not None:
            quota.view(-1).index_add_(0, base // pattern.m + j // pattern.m, quota.new_full((B,), -1))
        if hist is not None:
            hist[:, k + 1] = w
    return hist, order, loss
