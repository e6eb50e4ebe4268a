"""The per-layer solver: SparseGPT / magnitude / Wanda on a weight matrix W (rows, d) with Hessian H (d, d),
or a batch of them (a grouped conv's groups). layer.py turns a Conv2d or Linear into such a problem.
"""
from __future__ import annotations

import math
import time
import warnings

import torch

from .linalg import upper_cholesky
from .masks import (
    Pattern,
    pattern_prune_mask,
    quota,
    topk_prune_mask,
)
from .exact_obs import cost_flops, exact_obs_solve
from .fused_block import solve_block_fused, unsupported
from .quant import Grid, round_to_nearest
from ..utils import UserError

# What each method's mask needs from the calibration inputs: the Hessian H, only its diagonal (‖X_j‖²), or
# nothing. A layer is given no d×d Hessian when neither its method nor a re-fit needs one (prune.py).
NEEDS = {"sparsegpt": "hessian", "magnitude": "nothing", "wanda": "diagonal"}
METHODS = tuple(NEEDS)

# The OBS solvers of method sparsegpt: SparseGPT's column sweep, or the exact per-row greedy (exact_obs.py), or
# the exact one where a layer's rows·d³ stays under EXACT_BUDGET (chosen when a 2e11 layer took 12 s; kept when
# the lazy H⁻¹ update made it 5 s and flat gathers 4 s, so that which layers get which solver, hence results, did
# not move). Measured on this 2-core CPU (float32, unstructured, benchmarks/exact_obs_speed.py): 64 rows × d 576
# (ResNet-20's widest, 1.2e10) 0.5 s, 128 × 1152 (2e11) 4 s; ResNet-18's 256 × 2304 (3e12) would take minutes per
# layer and 512 × 4608 an hour, so those go to SparseGPT.
SOLVERS = ("sparsegpt", "exact", "auto")
EXACT_BUDGET = 2e11
# How SparseGPT's column loop over a block runs: a Python loop of torch ops (each column ~3 kernels), that loop
# recorded once as a CUDA graph and replayed, or one fused Triton kernel per block (fused_block.py). 'auto' is
# the CUDA graph on a GPU and the loop elsewhere: the Triton kernel is checked in Triton's interpreter on the CPU
# but not yet timed on a GPU, so it is opt-in until it has been.
COLUMN_LOOPS = ("auto", "loop", "cuda_graph", "triton")


def choose_solver(solver: str, rows: int, d: int, quantized: bool) -> str:
    """The solver a layer of `rows` outputs and d inputs gets: 'auto' resolved by cost (SparseGPT for quantized
    layers: GPTQ rounding lives in its column loop)."""
    if solver != "auto":
        return solver
    return "exact" if not quantized and cost_flops(rows, d) <= EXACT_BUDGET else "sparsegpt"


def sparsegpt_factor(H: torch.Tensor, percdamp: float = 0.01) -> tuple[torch.Tensor, float]:
    """Ũ with H + damp·I = ŨŨᵀ for a batch H (G, d, d), dead inputs' diagonal set to 1 (H itself is
    restored). One factor serves every solve of the same H (e.g. an allocation's sparsity levels)."""
    diag = torch.diagonal(H, dim1=-2, dim2=-1)
    dead = diag == 0
    diag.masked_fill_(dead, 1)  # H is changed only here, and restored at once (no copy of H)
    try:
        return upper_cholesky(H, percdamp)  # SparseGPT's factor of H⁻¹ is U = Ũ⁻¹
    finally:
        diag.masked_fill_(dead, 0)


def sparsegpt_solve(W: torch.Tensor, H: torch.Tensor, pattern: Pattern, percdamp: float = 0.01,
                    blocksize: int = 128, stats: dict | None = None, column_loop: str = "auto",
                    graphs: dict | None = None, factor: tuple | None = None,
                    row_scale: torch.Tensor | None = None, grid: Grid | None = None,
                    sparsities: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, float]:
    """SparseGPT on one matrix W (rows, d) with Hessian H (d, d), or a batch of them (G, rows, d), (G, d, d).

    Returns (pruned W, pruned mask, damping used). Columns are visited left to right; N:M groups are m
    consecutive columns (see masks.py). A batch (a grouped conv's groups) is solved in one pass.
    `column_loop` (COLUMN_LOOPS): how a block's columns are visited; on CUDA by default a CUDA graph: pass the
    same `graphs` dict to every layer of a model so that layers whose blocks have the same shape share one.
    `factor`: a `sparsegpt_factor(H)` already computed. `row_scale` (G, rows): weights of each output row in the
    unstructured saliency (e.g. a following BatchNorm's (γ/σ)², so rows are compared as if it were folded in).
    `grid`: round every kept weight to its row's grid in the column loop, its error pushed on like a pruned weight's
    (GPTQ).
    `sparsities` (G,): each matrix's own unstructured fraction, counted on its own, e.g. one W at several levels
    in one pass (sparsegpt_curve); H and `factor` may then have a batch of 1, shared by all.
    """
    if W.ndim == 2:
        grid = None if grid is None else Grid(grid.scale[None], grid.zero[None], grid.bits)
        Q, pruned, damp = sparsegpt_solve(W[None], H[None], pattern, percdamp, blocksize, stats, column_loop, graphs,
                                          factor, None if row_scale is None else row_scale[None], grid)
        return Q[0], pruned[0], damp
    W = W.clone()
    G, rows, d = W.shape
    # Inputs that were always zero (a dead channel, a kernel tap that only ever saw padding): their weights
    # are decoupled from the rest and cost nothing to remove, so unstructured masks take them first. They
    # are not zeroed beyond the layer's count: the mask stays the whole truth, and at another input size
    # (where a tap sees pixels) the model keeps them.
    dead = torch.diagonal(H, dim1=-2, dim2=-1) == 0
    t0 = time.perf_counter()
    Ut, damp = factor if factor is not None else sparsegpt_factor(H, percdamp)
    Ut = Ut.expand(G, d, d)  # a view where one factor serves a batch (levels)
    if stats is not None:  # for the speed benchmark: factorization time apart from the updates
        if Ut.is_cuda:
            torch.cuda.synchronize(Ut.device)
        stats["cholesky"] = stats.get("cholesky", 0.0) + time.perf_counter() - t0
    if pattern.is_nm:  # a block must hold whole groups
        blocksize = max(pattern.m, blocksize - blocksize % pattern.m)
    pruned = torch.zeros_like(W, dtype=torch.bool)
    fused = column_loop == "triton" and grid is None  # GPTQ's rounding stays in the loop
    if fused and (why := unsupported(W, pattern)):
        raise UserError(f"column_loop 'triton' cannot run here: {why}")
    graph = None
    if column_loop in ("auto", "cuda_graph") and W.is_cuda and d >= 2 * blocksize and grid is None \
            and sparsities is None:
        graphs = {} if graphs is None else graphs
        graph = graphs.setdefault((G, rows, blocksize, str(pattern), W.device), _BlockGraph(_solve_block, pattern))
    # The lazy update owed to the columns right of finished blocks is -E·U (E = their errors). With
    # U = Ũ⁻¹ it is applied by block substitution: Y = E·Ũ⁻¹ is found block by block (Y_b = (E_b - P_b)·
    # Ũ_bb⁻¹), P accumulates Y·Ũ over finished blocks, and a block's columns get +P_b·Ũ_bb⁻¹ when their
    # turn comes. Only the diagonal blocks of U are ever formed.
    P = torch.zeros_like(W)
    group_start = torch.arange(G) * (rows * d)  # the layer's weights counted group by group, block by block
    eye = torch.eye(blocksize, dtype=W.dtype, device=W.device)
    for i1 in range(0, d, blocksize):
        i2 = min(i1 + blocksize, d)
        Hinv1 = torch.linalg.solve_triangular(Ut[:, i1:i2, i1:i2], eye[:i2 - i1, :i2 - i1].expand(G, -1, -1),
                                              upper=True)  # the diagonal block of U
        W1 = torch.baddbmm(W[:, :, i1:i2], P[:, :, i1:i2], Hinv1) if i1 else W[:, :, i1:i2].clone()
        Err1 = torch.zeros_like(W1)
        if pattern.is_nm:
            mask1 = torch.zeros_like(W1, dtype=torch.bool)
        else:  # adaptive mask: the block's share of the layer's count, chosen by OBS saliency w²/[H⁻¹]²
            k = quota(pattern.sparsity, group_start + rows * i1, group_start + rows * i2) if sparsities is None \
                else quota(sparsities, rows * i1, rows * i2)  # carried over a layer's groups, or each on its own
            scores = (W1 ** 2 / torch.diagonal(Hinv1, dim1=-2, dim2=-1)[:, None, :] ** 2)
            if row_scale is not None:
                scores.mul_(row_scale[:, :, None])
            mask1 = topk_prune_mask(scores.masked_fill_(dead[:, None, i1:i2], 0), k)
        if fused:
            solve_block_fused(W1, Err1, mask1, Hinv1, pattern)
        elif graph is not None and i2 - i1 == blocksize:
            graph(W1, Err1, mask1, Hinv1)
        else:
            _solve_block(W1, Err1, mask1, Hinv1, pattern, grid)
        W[:, :, i1:i2] = W1.masked_fill_(mask1, 0)  # kept columns never moved after their turn; pruned are exact 0
        pruned[:, :, i1:i2] = mask1
        if i2 < d:
            Y1 = torch.bmm(Err1.sub_(P[:, :, i1:i2]), Hinv1)
            P[:, :, i2:].baddbmm_(Y1, Ut[:, i1:i2, i2:])
    return W, pruned, damp


LEVELS_BYTES = 512 * 2**20  # float32 copies of W held at once when its levels are solved together


def sparsegpt_curve(Wg: torch.Tensor, H: torch.Tensor, levels, percdamp: float = 0.01,
                    row_scale: torch.Tensor | None = None) -> torch.Tensor:
    """relative_error of SparseGPT's unstructured solve at each level (float64, (len(levels),)), one factor for
    all. A single matrix's levels are solved together, as a batch: the column loop's per-kernel overhead is paid
    once per chunk of levels instead of once per level (on the widest layers the levels' error products, rows·d²
    each, then weigh as much); a grouped conv's levels one by one."""
    factor = sparsegpt_factor(H, percdamp)
    G, rows, d = Wg.shape
    if G > 1:
        return torch.stack([relative_error(Wg, sparsegpt_solve(Wg, H, Pattern(sparsity=s), percdamp, factor=factor,
                                                               row_scale=row_scale)[0], H).cpu() for s in levels])
    chunk = max(1, LEVELS_BYTES // (4 * rows * d * torch.finfo(Wg.dtype).bits // 8))
    out = []
    for c in range(0, len(levels), chunk):
        s = torch.tensor(list(levels[c:c + chunk]), dtype=torch.float64, device=Wg.device)
        L = len(s)
        Q, _, _ = sparsegpt_solve(Wg.expand(L, rows, d), H, Pattern(sparsity=0.0), percdamp, factor=factor,
                                  row_scale=None if row_scale is None else row_scale.expand(L, rows), sparsities=s)
        out += [relative_error(Wg, Q[i:i + 1], H).cpu() for i in range(L)]
    return torch.stack(out)


def _solve_block(W1, Err1, mask1, Hinv1, pattern: Pattern, grid: Grid | None = None) -> None:
    """The column-by-column part of one block, in place: W1 updated, Err1 filled, mask1 chosen (N:M), and with
    a grid, kept weights rounded to it."""
    n, m = pattern.n, pattern.m
    # The loop works on the block transposed, (G, columns, rows): each column contiguous, which makes its
    # per-column kernels ~1.4x faster at 512 rows than on strided columns, with the same arithmetic per weight.
    Wt, Et, Mt = (x.transpose(1, 2).contiguous() for x in (W1, Err1, mask1))
    dinv = torch.diagonal(Hinv1, dim1=-2, dim2=-1)[:, :, None]  # (G, columns, 1)
    dinv2, inv_dinv = dinv ** 2, 1 / dinv
    column_grid = None if grid is None else Grid(grid.scale[..., 0], grid.zero[..., 0], grid.bits)  # (G, rows)
    # Per column, two kernels without a grid: the error of zeroing the pruned weights, w·(mask / [H⁻¹]ᵢᵢ) (the
    # factor is mask·1/[H⁻¹]ᵢᵢ, exactly 1/[H⁻¹]ᵢᵢ or 0: the same error as (w·mask)/[H⁻¹]ᵢᵢ, bit for bit), written
    # straight into Err1, and its rank-1 update of the block's remaining columns. The loop is bound by the kernels'
    # per-call cost on a CPU (a few µs each against ~1 µs of work at 512 rows), so each one saved counts.
    scale = None if grid is not None else Mt * inv_dinv  # unstructured: the block's mask is known before the loop
    columns, errors, rows_of_hinv = Wt.unbind(1), Et.unbind(1), Hinv1.unbind(1)
    for i in range(Wt.shape[1]):
        if pattern.is_nm and i % m == 0:  # the group's mask from the weights as the loop has left them
            scores = Wt[:, i:i + m].square().div_(dinv2[:, i:i + m])  # (G, m, rows)
            Mt[:, i:i + m].scatter_(1, torch.topk(scores, m - n, dim=1, largest=False).indices, True)
            if scale is not None:
                scale[:, i:i + m] = Mt[:, i:i + m] * inv_dinv[:, i:i + m]
        if grid is None:
            err1 = torch.mul(columns[i], scale[:, i], out=errors[i])
        else:  # target of column i: its grid point, or 0 if pruned
            q = column_grid.quantize(columns[i]).masked_fill_(Mt[:, i], 0)
            err1 = torch.sub(columns[i], q, out=errors[i]).mul_(inv_dinv[:, i])
        Wt[:, i:].addcmul_(rows_of_hinv[i][:, i:, None], err1[:, None, :], value=-1)
        if grid is not None:
            columns[i].copy_(q)  # exactly on the grid (the update leaves it there up to rounding)
    for x, xt in ((W1, Wt), (Err1, Et), (mask1, Mt)):
        x.copy_(xt.transpose(1, 2))


def prune_matrix(Wg: torch.Tensor, H: torch.Tensor, method: str, pattern: Pattern, percdamp: float = 0.01,
                 blocksize: int = 128, row_scale: torch.Tensor | None = None, factor: tuple | None = None,
                 stats: dict | None = None, graphs: dict | None = None, grid: Grid | None = None,
                 quant: str = "gptq", diagonal: torch.Tensor | None = None, solver: str = "sparsegpt",
                 column_loop: str = "auto") -> tuple:
    """Weights (G, rows, d) pruned by `method` with Hessian H (G, d, d): (Ŵ, pruned mask, damping or None).
    Methods that need only diag(H) (NEEDS) take it as `diagonal` (G, d) when H is None.
    The one place where the methods differ; row_scale weighs rows in unstructured masks (see sparsegpt_solve).
    With a grid, kept weights end on it: inside SparseGPT's loop (quant 'gptq'), else rounded after (RTN).
    solver: 'exact' runs ExactOBS instead of SparseGPT's sweep for method sparsegpt (choose_solver); column_loop:
    how SparseGPT's sweep visits a block's columns (COLUMN_LOOPS)."""
    if method == "sparsegpt" and solver == "exact":
        if grid is not None:
            raise ValueError("the exact solver does not quantize: use solver 'sparsegpt' with wbits")
        Q, pruned, _ = exact_obs_solve(Wg, H, pattern, percdamp, row_scale)
        return Q, pruned, percdamp
    if method == "sparsegpt":
        Q, pruned, damp = sparsegpt_solve(Wg, H, pattern, percdamp, blocksize, stats, column_loop, graphs, factor,
                                          row_scale=row_scale, grid=grid if quant == "gptq" else None)
        if grid is not None and quant != "gptq":
            Q = round_to_nearest(Q, pruned, grid)
        return Q, pruned, damp
    scores = Wg.abs() if row_scale is None else Wg.abs() * row_scale.sqrt()[:, :, None]
    if method == "wanda":  # |W|·‖X_j‖₂, compared within each output row
        diagonal = torch.diagonal(H, dim1=-2, dim2=-1) if H is not None else diagonal
        scores = scores * diagonal.clamp_min(0).sqrt()[:, None, :]
    pruned = pattern_prune_mask(scores, pattern, per_row=method == "wanda")
    Q = Wg.masked_fill(pruned, 0)
    return (Q if grid is None else round_to_nearest(Q, pruned, grid)), pruned, None


def relative_error(Wg: torch.Tensor, Q: torch.Tensor, H: torch.Tensor) -> torch.Tensor:
    """‖(W − Ŵ)X‖² / ‖WX‖² on the inputs behind H (0 for a layer whose inputs were all zero)."""
    delta = Wg - Q
    num = (torch.bmm(delta, H) * delta).sum().double()
    den = (torch.bmm(Wg, H) * Wg).sum().double()
    if den > 0:
        return num / den
    return torch.zeros((), dtype=torch.float64) if num == 0 else torch.tensor(math.inf, dtype=torch.float64)


class _BlockGraph:
    """`_solve_block` recorded once as a CUDA graph and replayed for every full block of a layer. On a GPU
    the column loop is bound by launching its ~400 small kernels per block, not by their work; a replay
    launches them all at once. Falls back to running the loop if the graph cannot be captured."""

    def __init__(self, fn, pattern: Pattern):
        self.fn, self.pattern, self.graph, self.failed = fn, pattern, None, False

    def __call__(self, W1, Err1, mask1, Hinv1) -> None:
        if self.graph is None and not self.failed:
            self._capture(W1, Err1, mask1, Hinv1)
        if self.graph is None:
            return self.fn(W1, Err1, mask1, Hinv1, self.pattern)
        for static, x in zip(self.static, (W1, Err1, mask1, Hinv1)):
            static.copy_(x)
        self.graph.replay()
        for static, x in zip(self.static[:3], (W1, Err1, mask1)):
            x.copy_(static)

    def _capture(self, *args) -> None:
        self.static = [x.clone() for x in args]
        try:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):  # warm-up outside the graph (lazy initializations), on copies
                self.fn(*[x.clone() for x in args], self.pattern)
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                self.fn(*self.static, self.pattern)
            self.graph = graph
        except RuntimeError as e:  # e.g. an op that cannot be captured on this build: run the loop instead
            self.failed = True
            warnings.warn(f"CUDA graph capture failed ({e}); running the column loop without it", RuntimeWarning)
