"""The per-layer solver: Hessian accumulation and SparseGPT / magnitude / Wanda for Conv2d and Linear.

Conv2d is a matrix product over unfolded patches, so both layer types become W (rows, d) times
X (d, T) and share one kernel. Grouped convs get one Hessian per group.
"""
from __future__ import annotations

import math
import time
import warnings
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from .dense_target import dense_target_weights
from .linalg import accumulate_xxt_, upper_cholesky
from .masks import (
    Pattern,
    conv_column_perm,
    nm_prune_mask,
    pattern_prune_mask,
    quota,
    topk_prune_mask,
)
from .refine import refine as refine_solve

METHODS = ("sparsegpt", "magnitude", "wanda")


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
                    blocksize: int = 128, stats: dict | None = None, cuda_graph: bool = True,
                    graphs: dict | None = None, factor: tuple | None = None,
                    row_scale: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, float]:
    """SparseGPT on one matrix W (rows, d) with Hessian H (d, d), or a batch of them (G, rows, d), (G, d, d).

    Returns (pruned W, pruned mask, damping used). Columns are visited left to right; N:M groups are m
    consecutive columns (see masks.py). A batch (a grouped conv's groups) is solved in one pass.
    On CUDA the column loop of a block is a CUDA graph; pass the same `graphs` dict to every layer of a
    model so that layers whose blocks have the same shape share one. `factor`: a `sparsegpt_factor(H)`
    already computed. `row_scale` (G, rows): weights of each output row in the unstructured saliency
    (e.g. a following BatchNorm's (γ/σ)², so rows are compared as if it were folded in).
    """
    if W.ndim == 2:
        Q, pruned, damp = sparsegpt_solve(W[None], H[None], pattern, percdamp, blocksize, stats, cuda_graph, graphs,
                                          factor, None if row_scale is None else row_scale[None])
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
    if stats is not None:  # for the speed benchmark: factorization time apart from the updates
        if Ut.is_cuda:
            torch.cuda.synchronize(Ut.device)
        stats["cholesky"] = stats.get("cholesky", 0.0) + time.perf_counter() - t0
    if pattern.is_nm:  # a block must hold whole groups
        blocksize = max(pattern.m, blocksize - blocksize % pattern.m)
    pruned = torch.zeros_like(W, dtype=torch.bool)
    graph = None
    if cuda_graph and W.is_cuda and d >= 2 * blocksize:
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
            k = quota(pattern.sparsity, group_start + rows * i1, group_start + rows * i2)  # carried over groups
            scores = (W1 ** 2 / torch.diagonal(Hinv1, dim1=-2, dim2=-1)[:, None, :] ** 2)
            if row_scale is not None:
                scores.mul_(row_scale[:, :, None])
            mask1 = topk_prune_mask(scores.masked_fill_(dead[:, None, i1:i2], 0), k)
        if graph is not None and i2 - i1 == blocksize:
            graph(W1, Err1, mask1, Hinv1)
        else:
            _solve_block(W1, Err1, mask1, Hinv1, pattern)
        W[:, :, i1:i2] = W1.masked_fill_(mask1, 0)  # kept columns never moved after their turn; pruned are exact 0
        pruned[:, :, i1:i2] = mask1
        if i2 < d:
            Y1 = torch.bmm(Err1.sub_(P[:, :, i1:i2]), Hinv1)
            P[:, :, i2:].baddbmm_(Y1, Ut[:, i1:i2, i2:])
    return W, pruned, damp


def _solve_block(W1, Err1, mask1, Hinv1, pattern: Pattern) -> None:
    """The column-by-column part of one block, in place: W1 updated, Err1 filled, mask1 chosen (N:M)."""
    n, m = pattern.n, pattern.m
    dinv = torch.diagonal(Hinv1, dim1=-2, dim2=-1)[:, None, :]
    dinv2, inv_dinv = dinv ** 2, 1 / dinv
    # Per column, three kernels: the error of zeroing the pruned weights (w·mask / [H⁻¹]ᵢᵢ, written
    # straight into Err1) and its rank-1 update of the block's remaining columns.
    for i in range(W1.shape[-1]):
        if pattern.is_nm and i % m == 0:
            mask1[:, :, i:i + m] = nm_prune_mask(W1[:, :, i:i + m] ** 2 / dinv2[:, :, i:i + m], n, m)
        err1 = torch.mul(W1[:, :, i], mask1[:, :, i], out=Err1[:, :, i])
        err1.mul_(inv_dinv[:, :, i])
        W1[:, :, i:].addcmul_(err1[:, :, None], Hinv1[:, i:i + 1, i:], value=-1)


def prune_matrix(Wg: torch.Tensor, H: torch.Tensor, method: str, pattern: Pattern, percdamp: float = 0.01,
                 blocksize: int = 128, row_scale: torch.Tensor | None = None, factor: tuple | None = None,
                 stats: dict | None = None, graphs: dict | None = None) -> tuple:
    """Weights (G, rows, d) pruned by `method` with Hessian H (G, d, d): (Ŵ, pruned mask, damping or None).
    The one place where the methods differ; row_scale weighs rows in unstructured masks (see sparsegpt_solve)."""
    if method == "sparsegpt":
        return sparsegpt_solve(Wg, H, pattern, percdamp, blocksize, stats, graphs=graphs, factor=factor,
                               row_scale=row_scale)
    scores = Wg.abs() if row_scale is None else Wg.abs() * row_scale.sqrt()[:, :, None]
    if method == "wanda":  # |W|·‖X_j‖₂, compared within each output row
        scores = scores * torch.diagonal(H, dim1=-2, dim2=-1).clamp_min(0).sqrt()[:, None, :]
    pruned = pattern_prune_mask(scores, pattern, per_row=method == "wanda")
    return Wg.masked_fill(pruned, 0), pruned, None


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


@dataclass
class LayerResult:
    name: str
    shape: list[int]
    method: str
    pattern: str
    sparsity: float = 0.0  # fraction pruned in this layer
    skipped: bool = False
    reason: str = ""
    error: float | None = None  # ‖WX − ŴX‖² / ‖WX‖² on the calibration inputs
    seconds: float = 0.0
    percdamp: float | None = None  # damping actually used (SparseGPT)
    mask: torch.Tensor | None = field(default=None, repr=False)  # True = kept, weight's shape

    def as_dict(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k != "mask"}


class LayerPruner:
    """Accumulates H = 2XXᵀ/N for one Conv2d or Linear, then prunes its weight in place.

    The sum ΣXXᵀ is kept in float64 as a sum of float32 products of chunks of a few images: the float64 sum
    of such terms hardly depends on their order, so H rounded to float32 comes out the same however the
    samples were split (into batches, or over torchrun ranks, see dist.py), and the masks with it. The
    float64 sum and the chunk buffer take no more memory than the factorization that follows.
    """

    def __init__(self, layer: nn.Module, name: str = "", hessian: bool = True, track_mean: bool = False,
                 dense_target: bool = False):
        if not isinstance(layer, (nn.Conv2d, nn.Linear)):
            raise TypeError(f"{name}: only Conv2d and Linear are supported, got {type(layer).__name__}")
        self.layer, self.name = layer, name
        W = layer.weight
        self.groups = layer.groups if isinstance(layer, nn.Conv2d) else 1
        self.d = W[0].numel()
        # hessian=False: only the column sums (x̄, and diag(H) through colsq), for statistics of a dense pass
        shape = (self.groups, self.d, self.d)
        self.S = torch.zeros(shape, device=W.device, dtype=torch.float64) if hessian else None  # ΣXXᵀ
        self._H = None  # 2·S/N in float32, made from S on first use (see `H`)
        self._chunk = None  # float32 buffer of one chunk's product
        self.colsq = None if hessian else torch.zeros(self.groups, self.d, device=W.device, dtype=torch.float64)
        self.nsamples = 0
        # Σ of the input columns, for x̄ (statistics correction); off by default: a pass over X per chunk
        self.colsum = torch.zeros(self.groups, self.d, device=W.device, dtype=torch.float64) if track_mean else None
        # C = 2·X_d·X_pᵀ/N with the dense network's inputs X_d, for the asymmetric target (dense_target.py)
        self.SC = torch.zeros(shape, device=W.device, dtype=torch.float64) if dense_target else None  # ΣX_dX_pᵀ
        self._C = None

    def _finish(self, S: torch.Tensor | None) -> torch.Tensor | None:
        """2·S/N as float32 (one rounding), through the chunk buffer: no float64 temporary."""
        if S is None:
            return None
        S.mul_(2 / max(self.nsamples, 1))
        out = self._chunk if self._chunk is not None else torch.empty(S.shape, device=S.device)
        self._chunk = None
        return out.copy_(S)

    @property
    def H(self) -> torch.Tensor | None:
        """H = 2XXᵀ/N (G, d, d) in float32; reading it ends the accumulation."""
        if self._H is None and self.S is not None:
            self._H, self.S = self._finish(self.S), None
        return self._H

    @H.setter
    def H(self, value: torch.Tensor | None) -> None:
        self._H, self.S = value, None

    @property
    def C(self) -> torch.Tensor | None:
        """C = 2·X_d·X_pᵀ/N, for the asymmetric target (dense_target.py)."""
        if self._C is None and self.SC is not None:
            self._C, self.SC = self._finish(self.SC), None
        return self._C

    def columns(self, inp: torch.Tensor) -> torch.Tensor:
        """The layer's input as (groups, d, T): one column per output position, rows in the solver's order
        (the order of `weight_matrix`)."""
        layer = self.layer
        inp = inp.to(torch.float32)
        if isinstance(layer, nn.Linear):
            return inp.reshape(-1, self.d).t().unsqueeze(0)
        padding = layer.padding
        if isinstance(padding, str) or layer.padding_mode != "zeros":  # 'same', reflect, replicate, circular
            mode = "constant" if layer.padding_mode == "zeros" else layer.padding_mode
            inp = F.pad(inp, layer._reversed_padding_repeated_twice, mode=mode)
            padding = 0
        X = F.unfold(inp, layer.kernel_size, dilation=layer.dilation, padding=padding, stride=layer.stride)
        B, _, L = X.shape
        kk = layer.kernel_size[0] * layer.kernel_size[1]
        # unfold's rows are (in, kh, kw); the solver's are (kh, kw, in) so that N:M groups are contiguous.
        # The reshape below copies anyway, so the reordering is free and H needs no permuted copy.
        X = X.view(B, self.groups, self.d // kk, kk, L).permute(1, 3, 2, 0, 4)
        return X.reshape(self.groups, self.d, B * L)

    def chunk_images(self, inp: torch.Tensor, chunk_bytes: int = 8 * 2**20, min_columns: int = 4096) -> int:
        """Images per Hessian update: about 8 MB of unfolded patches (small enough to stay in cache and
        out of the peak memory), but at least 4096 patches, below which the product on a wide layer
        (d = 4608) loses efficiency."""
        layer, per_image = self.layer, inp[0].numel() * 4  # bytes of patches per image
        if isinstance(layer, nn.Conv2d):  # unfold multiplies the input by about kh·kw / (sh·sw)
            per_image = per_image * layer.kernel_size[0] * layer.kernel_size[1] // (layer.stride[0] * layer.stride[1])
        columns = max(1, per_image // (4 * self.d * self.groups))  # patches per image
        return max(1, chunk_bytes // max(per_image, 1), -(-min_columns // columns))

    def add_batch(self, inp: torch.Tensor, dense: torch.Tensor | None = None) -> None:
        """Fold a batch of layer inputs into H, a few images at a time so the unfolded patches stay small.
        dense: the same images' inputs in the dense network (with dense_target)."""
        if self._H is not None:
            raise RuntimeError(f"{self.name}: H was already read; no more batches can be added")
        step = self.chunk_images(inp)
        dense_chunks = dense.split(step) if self.SC is not None else None
        for i, chunk in enumerate(inp.split(step)):
            X = self.columns(chunk)
            if self.S is not None and self._chunk is None:
                self._chunk = torch.empty(self.S.shape, device=X.device)
            if self.SC is not None:
                torch.bmm(self.columns(dense_chunks[i]), X.transpose(1, 2), out=self._chunk)
                self.SC.add_(self._chunk)
            if self.S is not None:
                self.S.add_(accumulate_xxt_(self._chunk, X, beta=0.0))
            else:
                self.colsq += X.square().sum(-1).double()
            if self.colsum is not None:
                self.colsum += X.sum(-1).double()
            self.nsamples += X.shape[-1]

    def hessian_diagonal(self) -> torch.Tensor:
        """diag(H) = 2·mean(x_j²) per input column (G, d), from H or from the column sums."""
        if self.S is not None or self._H is not None:
            return torch.diagonal(self.H, dim1=-2, dim2=-1)
        return (2 * self.colsq / max(self.nsamples, 1)).float()

    def input_mean(self) -> torch.Tensor:
        """The mean input column (G, d): the layer's mean output per channel is W·x̄ + b (conv: over positions)."""
        return (self.colsum / max(self.nsamples, 1)).float()

    def weight_matrix(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Weight as (groups, rows, d) in the solver's column order, and that order as an index into the
        flattened weight's columns."""
        W = self.layer.weight.data.float()
        perm = conv_column_perm(W.shape, W.device)
        Wg = W.reshape(self.groups, W.shape[0] // self.groups, -1)[:, :, perm]
        return Wg, perm

    def skip_reason(self, pattern: Pattern) -> str:
        cin = self.layer.weight.shape[1]
        if pattern.is_nm and cin % pattern.m:
            return f"{cin} input channels per group not divisible by M={pattern.m}"
        return ""

    @torch.no_grad()
    def prune(self, method: str, pattern: Pattern, percdamp: float = 0.01, blocksize: int = 128,
              stats: dict | None = None, graphs: dict | None = None,
              row_scale: torch.Tensor | None = None, refine: str = "none") -> LayerResult:
        """Prune the layer's weight in place. row_scale (out_channels,): how much each output row counts when
        rows are compared in an unstructured mask (sparsegpt, magnitude); Wanda and N:M compare within rows.
        refine: none | cg | admm, a better solve after the method's (refine.py)."""
        t0 = time.perf_counter()
        weight = self.layer.weight
        res = LayerResult(self.name, list(weight.shape), method, str(pattern))
        res.reason = self.skip_reason(pattern)
        if res.reason:
            res.skipped = True
            res.mask = torch.ones_like(weight, dtype=torch.bool)
            return res
        if method not in METHODS:
            raise ValueError(f"unknown method '{method}'; choose from {', '.join(METHODS)}")
        Wg, perm = self.weight_matrix()
        Hg = self.H  # already in the solver's column order (see columns)
        live = self.nsamples > 0 and bool(torch.any(torch.diagonal(Hg, dim1=1, dim2=2) > 0))
        if not live:
            if method != "magnitude":
                warnings.warn(f"{self.name}: calibration inputs are all zero; magnitude-pruned instead", RuntimeWarning)
                res.reason = "all-zero calibration inputs: magnitude-pruned instead"
            method = "magnitude"
        if self.C is not None and live:
            Wg = dense_target_weights(Wg, Hg, self.C, percdamp)  # the error is measured against W* from here on
        scale = None if row_scale is None else row_scale.to(Wg).reshape(self.groups, -1)
        Q, pruned, res.percdamp = prune_matrix(Wg, Hg, method, pattern, percdamp, blocksize, scale, stats=stats,
                                               graphs=graphs)
        Q, pruned = refine_solve(refine, Wg, Q, pruned, Hg, pattern, percdamp)
        res.error = float(relative_error(Wg, Q, Hg))
        inv = torch.argsort(perm)
        weight.data.copy_(Q[:, :, inv].reshape(weight.shape).to(weight.dtype))
        res.mask = (~pruned)[:, :, inv].reshape(weight.shape)
        res.sparsity = 1.0 - res.mask.float().mean().item()
        res.seconds = time.perf_counter() - t0
        return res

    def free(self) -> None:
        self.S = self.SC = self._H = self._C = self._chunk = self.colsum = self.colsq = None
