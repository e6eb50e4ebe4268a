"""One Conv2d or Linear layer: its calibration statistics (H = 2XXᵀ/N) and its pruning, in place.

Conv2d is a matrix product over unfolded patches, so both layer types become W (rows, d) times
X (d, T) and share one solver (solver.py). Grouped convs get one Hessian per group.
"""
from __future__ import annotations

import math
import time
import warnings
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.grad import conv2d_weight

from . import dist
from .dense_target import dense_target_weights
from .relu_gate import ActiveSums, output_columns
from ..kernels.linalg import accumulate_xxt_, add_upper_, mirror_upper_
from ..kernels.masks import Pattern, conv_column_perm
from ..kernels.shifted_gram import cheaper, conv_gram, output_size
from ..kernels.quant import fit_grid, layer_codes
from ..kernels.refine import effective as refine_run, refine as refine_solve
from ..kernels.solver import choose_solver, prune_matrix, relative_error
from ..utils import UserError


# The re-fits beyond SparseGPT's own solve (the dense target, --refine) need at least this many calibration
# samples (image positions) per input of the layer: with fewer, the kept weights can fit the calibration set
# almost exactly. A 8192-input Linear fed by 1024 images reached 1e-6 layer error and lost 0.9 points of test
# accuracy at 2:4 (CIFAR CNN); ResNet-18's least-sampled layers (3.6 per input) showed no such gap.
MIN_SAMPLES_PER_INPUT = 2
# tenfold raises of the damping tried where H + damping is not positive definite in a solve: a Hessian of inputs near
# float32's smallest numbers (a random-weight SSDlite's deep layers: 1e-22) is indefinite to rounding
DAMPING_RAISES = 4
# inputs whose mean square is below this are taken as all zero (magnitude-pruned): their Hessian's products fall
# below float32's normal numbers (1.2e-38) and it holds rounding only (the same SSDlite's head: 1e-44; its exact
# solve removed 62 of 64 weights per row at 2:4)
TINY_INPUTS = 1e-30


def few_samples(n: int, d: int) -> str:
    """Why a layer's re-fit is left out: n calibration samples for its d inputs, under MIN_SAMPLES_PER_INPUT."""
    return f"{n} calibration samples for {d} inputs (< {MIN_SAMPLES_PER_INPUT} per input)"


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
    error_from: str = "hessian"  # hessian: tr(ΔW·H·ΔWᵀ); outputs: the layer run on its inputs (no Hessian needed)
    seconds: float = 0.0
    percdamp: float | None = None  # damping actually used (SparseGPT)
    solver: str | None = None  # sparsegpt or exact, for method sparsegpt
    refine: str | None = None  # what re-solved the layer after its solver (cg, swap, admm), None if nothing
    mask: torch.Tensor | None = field(default=None, repr=False)  # True = kept, weight's shape
    quant: dict | None = field(default=None, repr=False)  # codes, scale, zero, bits (with --wbits)
    offset: torch.Tensor | None = field(default=None, repr=False)  # intercept: added to the mean output (per channel)
    skip_fitted: str | None = None  # residual target: the skip operand (graph node) whose error the fit also corrects
    inactive_weight: float | None = None  # relu_gate.py: the weight its fit gave outputs the dense ReLU zeroes
    refitted: bool = False  # a layer kept dense, re-fitted to the dense target (refit_dense_layers)

    def as_dict(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k not in ("mask", "quant", "offset")} | (
            {"wbits": self.quant["bits"]} if self.quant else {})


SHIFTED_CHUNK_BYTES = 64 * 2**20  # laid-out input per shifted-correlation product (a whole 128-image ResNet-18 batch)
GATHER_BYTES = 32 * 2**20  # parts of a calibration batch with smaller inputs are summed together (_gathered)


class LayerPruner:
    """Accumulates H = 2XXᵀ/N for one Conv2d or Linear, then prunes its weight in place.

    The sum ΣXXᵀ is kept in float64 as a sum of float32 products of whole batches (each batch's chunks summed
    in float32 first: adding every chunk's product to the float64 sum cost up to 20% of the accumulation on wide
    layers). The float64 sum of such terms hardly depends on their order, so H rounded to float32 comes out the
    same however whole batches are split over torchrun ranks (dist.py), and the masks with it.
    """

    def __init__(self, layer: nn.Module, name: str = "", hessian: bool = True, track_mean: bool = False,
                 dense_target: bool = False, keep_sums: bool = False, shifted_target: bool = False,
                 inactive_weight: float | None = None, target_share: float = 1.0):
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
        self._chunk = None  # float32 partial sum of S not yet in S (then the buffer H is made in)
        self._chunk_d = None  # the same for SD
        self.colsq = None if hessian else torch.zeros(self.groups, self.d, device=W.device, dtype=torch.float64)
        self._open = self._open_d = False  # _chunk (_chunk_d) holds sums of parts of a batch not yet in S (SD)
        self._stash: list[tuple] = []  # small parts of a batch (inputs, dense inputs or None) not yet summed
        self.nsamples = 0
        self.batches = 0  # non-empty batches added (a BatchNorm's num_batches_tracked, output_moments)
        # ΣXXᵀ in float64 kept past the solve (keep_sums), for the output's moments with the pruned weight
        self.keep_sums, self._kept_S = keep_sums and hessian, None
        # Σ of the input columns, for x̄ (statistics correction); off by default: a pass over X per chunk
        self.colsum = torch.zeros(self.groups, self.d, device=W.device, dtype=torch.float64) if track_mean else None
        # the same for the dense network's inputs (an intercept with the dense target: the target's mean output)
        self.colsum_d = torch.zeros_like(self.colsum) if track_mean and dense_target else None
        # R = W·D, D = C − H = 2·(X_d − X_p)·X_pᵀ/N with the dense network's inputs X_d, for the asymmetric target
        # (dense_target.py). Summed from the difference itself, not as C then minus H: where the inputs did not change
        # (X_d = X_p) it is exactly 0, not the rounding noise of two products, which the solve would amplify. Where
        # the layer has fewer than d/2 rows (a 3x3 conv: 9x fewer), R is summed from the outputs as
        # (W·(X_d − X_p))·X_pᵀ, a forward conv and a weight-gradient conv (2·rows·d per column instead of d²);
        # otherwise SD holds Σ(X_d − X_p)X_pᵀ and R = W·D at the end
        self.rhs_outputs = dense_target and self.rhs_from_outputs()
        rhs_shape = (self.groups, W.shape[0] // self.groups, self.d) if self.rhs_outputs else shape
        self.SD = torch.zeros(rhs_shape, device=W.device, dtype=torch.float64) if dense_target else None
        # shifted_target (residual_target.py): the target W·X_d + δ, δ given per batch in the output's units; R gains
        # 2·δ·X_pᵀ/N, summed in SD where it is summed from the outputs, else in SE; ΣΔ per row for the intercept
        shifted_target = shifted_target and dense_target
        self.SE = torch.zeros((self.groups, W.shape[0] // self.groups, self.d), device=W.device, dtype=torch.float64) \
            if shifted_target and not self.rhs_outputs else None
        self.shift_sum = torch.zeros(W.shape[0], device=W.device, dtype=torch.float64) \
            if shifted_target and track_mean else None
        self.shift_batches = 0  # batches added with a shift
        self._R = None
        # the share α of the dense target's correction fitted: target W·X_p + α·(W·X_d + δ − W·X_p); R, the
        # target's mean offset and δ scale by α (dense_target.py)
        self.target_share = target_share
        # inactive_weight (relu_gate.py): per-row sums over the outputs the dense ReLU passes
        self.inactive_weight = inactive_weight if inactive_weight is not None and inactive_weight < 1 \
            and hessian and self.groups == 1 else None
        self.active = None if self.inactive_weight is None else ActiveSums(
            W.shape[0], self.d, self.inactive_weight, W.device, dense_target, track_mean, shifted_target)

    def rhs_from_outputs(self) -> bool:
        """Whether the dense target's R is summed from the layer's outputs (see __init__): fewer rows than d/2, and a
        Linear or a zero-padded conv (whose weight gradient torch computes)."""
        layer = self.layer
        if isinstance(layer, nn.Conv2d) and (isinstance(layer.padding, str) or layer.padding_mode != "zeros"):
            return False
        return 2 * (layer.weight.shape[0] // self.groups) < self.d

    @property
    def _cross_in_chunks(self) -> bool:  # Σ(X_d − X_p)X_pᵀ summed with the chunks' columns
        return self.SD is not None and not self.rhs_outputs

    def _buffers(self, device) -> None:
        """The float32 buffers a batch's chunk products are summed in, allocated on first use."""
        if self.S is not None and self._chunk is None:  # zeros: the shifted path never writes its lower tap blocks
            self._chunk = torch.zeros(self.S.shape, device=device)
        if self._cross_in_chunks and self._chunk_d is None:
            self._chunk_d = torch.empty(self.SD.shape, device=device)

    def _betas(self, first: bool) -> tuple[float, float]:
        """beta for the float32 sums of S and of the cross term: 0 starts them (the first chunk of a calibration
        batch's first part), 1 adds to them."""
        return (0.0 if first and not self._open else 1.0), (0.0 if first and not self._open_d else 1.0)

    def _close(self, cross: bool, end: bool) -> None:
        """After a part of a calibration batch: at its end (end) the float32 sums go to the float64 ones, else they
        stay open for the next part. cross: this part summed a cross term in `_chunk_d`."""
        self._open, self._open_d = self.S is not None, self._open_d or cross
        if end:
            self.flush()

    def flush(self) -> None:
        """Add sums left open by a part with end=False to the float64 ones (reading H or R does it too)."""
        if self._stash:
            return self._products(*self._take_stash(), end=True)  # (which flushes what it sums)
        if self._open or self._open_d:
            self._add_batch_sums(self._open_d)
        self._open = self._open_d = False

    def _add_batch_sums(self, cross: bool) -> None:
        """Add a batch's float32 sums to the float64 ones: one term per batch, whatever its chunks, so the same terms
        however whole batches go to torchrun ranks. cross: the batch summed a cross term in `_chunk_d`."""
        if self.S is not None:  # ΣXXᵀ is summed on its upper blocks only, and mirrored once when read (H)
            add_upper_(self.S, self._chunk)
        if cross:
            self.SD.add_(self._chunk_d)

    def _finish(self, S: torch.Tensor | None) -> torch.Tensor | None:
        """2·S/N as float32 (one rounding), through the chunk buffer when it fits: no float64 temporary."""
        if S is None:
            return None
        self._chunk_d = None
        S.mul_(2 / max(self.nsamples, 1))
        fits = self._chunk is not None and self._chunk.shape == S.shape
        out = self._chunk if fits else torch.empty(S.shape, device=S.device)
        if fits:
            self._chunk = None
        return out.copy_(S)

    @property
    def H(self) -> torch.Tensor | None:
        """H = 2XXᵀ/N (G, d, d) in float32; reading it ends the accumulation."""
        if self._H is None and self.S is not None:
            self.flush()
            S = mirror_upper_(self.S)
            if self.keep_sums:
                self._kept_S = S.clone()
            self._H, self.S = self._finish(S), None
        return self._H

    def sums(self) -> torch.Tensor:
        """ΣXXᵀ (G, d, d) in float64, exactly symmetric (its lower blocks mirrored from the upper ones it is summed
        on), for a solve that needs more than H's float32; ends the accumulation and drops the float32 buffers."""
        self.flush()
        self._chunk = self._chunk_d = None
        return mirror_upper_(self.S)

    @H.setter
    def H(self, value: torch.Tensor | None) -> None:
        self._H, self.S = value, None

    @property
    def R(self) -> torch.Tensor | None:
        """R = W·D = 2·W·(X_d − X_p)·X_pᵀ/N (G, rows, d) in the solver's column order, for the asymmetric target
        (dense_target.py); W is the layer's weight as it is now (before it is pruned)."""
        if self._R is None and self.SD is not None:
            self.flush()
            D, self.SD = self._finish(self.SD), None
            self._R = D if self.rhs_outputs else torch.bmm(self.weight_matrix()[0], D)
            if self.SE is not None:
                self._R += self._finish(self.SE)
                self.SE = None
        return self._R

    def _rhs_product(self, x: torch.Tensor, dense: torch.Tensor | None, shift: torch.Tensor | None = None
                     ) -> torch.Tensor:
        """(W·(X_d − X_p) + δ)·X_pᵀ of one batch (G, rows, d), from the outputs: the forward map of the input
        difference (none without dense), plus the target's shift δ, then the weight gradient it gives with the
        pruned inputs."""
        layer, W = self.layer, self.layer.weight.detach().float()
        x, linear = x.float(), isinstance(layer, nn.Linear)  # a Linear: (..., in), channels-last inputs too
        dy = None
        if dense is not None:
            dx = (dense - x).float()
            dy = F.linear(dx, W) if linear else \
                F.conv2d(dx, W, None, layer.stride, layer.padding, layer.dilation, layer.groups)
        if shift is not None:
            dy = shift.float() if dy is None else dy + shift
        if linear:
            return (dy.reshape(-1, W.shape[0]).t() @ x.reshape(-1, self.d))[None]
        g = conv2d_weight(x, W.shape, dy, layer.stride, layer.padding, layer.dilation, layer.groups)
        return g.reshape(self.groups, W.shape[0] // self.groups, -1)[:, :, conv_column_perm(W.shape, W.device)]

    def _zero_padded(self, inp: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        """A conv's input and the zero padding left to apply: padding that is not plain zeros of a fixed size
        ('same', reflect, replicate, circular) applied here, so that the columns and their sums need only zeros."""
        layer = self.layer
        if isinstance(layer.padding, str) or layer.padding_mode != "zeros":
            mode = "constant" if layer.padding_mode == "zeros" else layer.padding_mode
            return F.pad(inp, layer._reversed_padding_repeated_twice, mode=mode), (0, 0)
        return inp, layer.padding

    def columns(self, inp: torch.Tensor) -> torch.Tensor:
        """The layer's input as (groups, d, T): one column per output position, rows in the solver's order
        (the order of `weight_matrix`)."""
        layer = self.layer
        inp = inp.to(torch.float32)
        if isinstance(layer, nn.Linear):
            return inp.reshape(-1, self.d).t().unsqueeze(0)
        inp, padding = self._zero_padded(inp)
        if layer.kernel_size == (1, 1) and padding == (0, 0):  # the (strided) input itself: one copy, no unfold
            x = inp[:, :, ::layer.stride[0], ::layer.stride[1]]  # (5-8x faster than unfold on ResNet-50's 1x1 convs)
            return x.transpose(0, 1).reshape(self.groups, self.d, -1)
        X = F.unfold(inp, layer.kernel_size, dilation=layer.dilation, padding=padding, stride=layer.stride)
        B, _, L = X.shape
        kk = layer.kernel_size[0] * layer.kernel_size[1]
        # unfold's rows are (in, kh, kw); the solver's are (kh, kw, in) so that N:M groups are contiguous.
        # The reshape below copies anyway, so the reordering is free and H needs no permuted copy.
        X = X.view(B, self.groups, self.d // kk, kk, L).permute(1, 3, 2, 0, 4)
        return X.reshape(self.groups, self.d, B * L)

    def column_sums(self, inp: torch.Tensor, square: bool = False) -> tuple[torch.Tensor, int]:
        """Σ of `columns(inp)` over its columns (groups, d) in float64 (of their squares with `square`: diag(XXᵀ)),
        and how many columns there are, without unfolding: for a conv, each tap's sum is the batch-summed input over
        the window that tap sees. The batch's images are summed in float32 (a pairwise sum: ~1e-7 relative), the
        windows and the batches in float64, as H's sums are: converting the whole batch to float64 first took 25× as
        long (128 images of 64×32²: 25 ms against 1 ms), seconds in a ResNet-18 prune."""
        layer = self.layer
        inp = inp.float().square() if square else inp.float()
        if isinstance(layer, nn.Linear):
            return inp.reshape(-1, self.d).sum(0).double()[None], inp.numel() // self.d
        inp, padding = self._zero_padded(inp)  # as in columns (padding commutes with x²)
        x = F.pad(inp.sum(0).double(), (padding[1], padding[1], padding[0], padding[0]))  # (C, H', W')
        (kh, kw), (sh, sw), (dh, dw) = layer.kernel_size, layer.stride, layer.dilation
        ho, wo = (x.shape[1] - dh * (kh - 1) - 1) // sh + 1, (x.shape[2] - dw * (kw - 1) - 1) // sw + 1
        taps = torch.stack([x[:, i * dh:i * dh + sh * (ho - 1) + 1:sh, j * dw:j * dw + sw * (wo - 1) + 1:sw].sum((1, 2))
                            for i in range(kh) for j in range(kw)])  # (kh·kw, C)
        return taps.reshape(kh * kw, self.groups, -1).transpose(0, 1).reshape(self.groups, self.d), len(inp) * ho * wo

    def _active_means(self) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """The weighted input means per row (relu_gate.py), pruned and dense (rows, d), and the shift's (rows,);
        float64."""
        a, n = self.active, max(self.nsamples, 1)
        m = a.mean(self.colsum, a.colsum, n)
        md = a.mean(self.colsum_d, a.colsum_d, n) if self.colsum_d is not None else None
        shift = a.mean(self.shift_sum, a.shift_sum, n) if self.shift_sum is not None and a.shift_sum is not None \
            else None
        return m, md, shift

    def _center_rows(self, H: torch.Tensor, R: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """`center` for per-row H (1, rows, d, d) and R (1, rows, d): each row's weighted covariances, H_r −
        2·(Σg/N)·m_r m_rᵀ and R_r − 2·(Σg/N)·ū_r m_rᵀ, ū_r = w_r·(m_d,r − m_r) + δ̄_r (weighted means)."""
        m, md, shift = self._active_means()
        share = self.active.weights(max(self.nsamples, 1)) / max(self.nsamples, 1)  # Σg / N per row
        Hc = (H[0].double() - 2 * share[:, None, None] * m[:, :, None] * m[:, None, :]).float()
        const = torch.diagonal(Hc, dim1=-2, dim2=-1) <= 1e-5 * torch.diagonal(H[0], dim1=-2, dim2=-1)
        Hc.masked_fill_(const[:, :, None] | const[:, None, :], 0)
        if R is not None:
            u = (self.weight_matrix()[0][0].double() * (md - m)).sum(-1)
            if shift is not None:
                u = u + shift
            u = u * self.target_share
            R = (R[0].double() - 2 * (share * u)[:, None] * m).float().masked_fill(const, 0)[None]
        return Hc[None], R

    def center(self, H: torch.Tensor, R: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """H and the dense target's R for a fit with an intercept (intercept.py): H − 2x̄x̄ᵀ, R − 2W(x̄_d − x̄)x̄ᵀ
        (the covariances of the inputs; x̄_d the dense inputs' mean). An input whose spread is below float32's
        resolution of its mean (a constant channel) becomes dead: its weight is free, its mean goes to the offset."""
        if H.dim() == 4:
            return self._center_rows(H, R)
        mean = self.input_mean().to(H.dtype)
        Hc = H - 2 * mean[:, :, None] * mean[:, None, :]
        const = torch.diagonal(Hc, dim1=-2, dim2=-1) <= 1e-5 * torch.diagonal(H, dim1=-2, dim2=-1)
        Hc.masked_fill_(const[:, :, None] | const[:, None, :], 0)
        if R is not None:
            shift = self.input_mean(dense=True).to(H.dtype) - mean
            offset = torch.bmm(self.weight_matrix()[0].to(H.dtype), shift[:, :, None])
            if self.shift_sum is not None:  # the shifted target's mean
                offset = offset + self.shift_mean().to(H.dtype).reshape(offset.shape)
            offset = offset * self.target_share
            R = (R - 2 * offset * mean[:, None, :])
            R = R.masked_fill(const[:, None, :], 0)
        return Hc, R

    def output_offset(self, W: torch.Tensor, Q: torch.Tensor, dense_target: bool) -> torch.Tensor:
        """What the pruned weights Q must add to the layer's mean output (one per output channel) to give the
        target's: W·x̄_d (dense target) or W·x̄, minus Q·x̄. W, Q (groups, rows, d) in the solver's order. With the
        per-row sums of relu_gate.py: each row's weighted means (the intercept of its weighted fit)."""
        if self.active is not None:
            m, md, shift = self._active_means()
            W, Q = W[0].double(), Q[0].double()
            if dense_target:
                md, shift = self._shared(m, md), None if shift is None else shift * self.target_share
            offset = ((W * md).sum(-1) if dense_target else (W * m).sum(-1)) - (Q * m).sum(-1)
            return offset + shift if dense_target and shift is not None else offset
        n = max(self.nsamples, 1)
        mean = (self.colsum / n)[:, :, None]
        target = self._shared(self.colsum / n, self.colsum_d / n) if dense_target else self.colsum / n
        offset = (torch.bmm(W.double(), target[:, :, None]) - torch.bmm(Q.double(), mean)).flatten()
        return offset + self.target_share * self.shift_mean() if dense_target and self.shift_sum is not None \
            else offset

    def _shared(self, mean: torch.Tensor, dense_mean: torch.Tensor) -> torch.Tensor:
        """The target's input mean with target_share α: x̄ + α·(x̄_d − x̄) (x̄_d itself at α = 1, as it was)."""
        return dense_mean if self.target_share == 1 else mean + self.target_share * (dense_mean - mean)

    def shift_mean(self) -> torch.Tensor:
        """The shifted target's mean δ per output channel (float64), over the same columns as x̄."""
        return self.shift_sum / max(self.nsamples, 1)

    def chunk_images(self, inp: torch.Tensor, chunk_bytes: int = 8 * 2**20, min_columns: int = 4096) -> int:
        """Images per Hessian update: about 8 MB of unfolded patches (small enough to stay in cache and
        out of the peak memory), but at least 4096 patches, below which the product on a wide layer
        (d = 4608) loses efficiency."""
        layer, per_image = self.layer, inp[0].numel() * 4  # bytes of patches per image
        if isinstance(layer, nn.Conv2d):  # unfold multiplies the input by about kh·kw / (sh·sw)
            per_image = per_image * layer.kernel_size[0] * layer.kernel_size[1] // (layer.stride[0] * layer.stride[1])
        columns = max(1, per_image // (4 * self.d * self.groups))  # patches per image
        return max(1, chunk_bytes // max(per_image, 1), -(-min_columns // columns))

    def _conv_hessian(self, inp: torch.Tensor) -> bool:
        """Whether this is an ungrouped conv, fed images (B, C, H, W), whose H is wanted: what the two paths below
        need before their own conditions."""
        return isinstance(self.layer, nn.Conv2d) and self.groups == 1 and self.S is not None and inp.ndim == 4

    def shifted(self, inp: torch.Tensor) -> bool:
        """Whether H comes from shifted correlations of the input (kernels/shifted_gram.py) instead of im2col
        columns: a plain conv (strided ones on the input's phases) where that takes clearly fewer flops (3×3 convs at
        8² and more, or by cells)."""
        layer = self.layer
        return (self._conv_hessian(inp) and layer.dilation == (1, 1) and not isinstance(layer.padding, str)
                and layer.padding_mode == "zeros"
                and cheaper(layer.kernel_size, layer.padding, tuple(inp.shape[-2:]), layer.stride, inp.shape[1],
                            inp.device.type == "cpu"))

    def pointwise(self, inp: torch.Tensor) -> bool:
        """Whether H is summed image by image on the input's own memory: a 1×1 stride-1 unpadded conv, whose
        columns for one image are its (C, H·W) view (no copy), where an image has at least as many positions as
        channels. Measured on this project's CPU (128 images, ResNet-50's shapes): 64 channels at 56² 0.06 → 0.03
        s, 256 at 56² 0.38 → 0.26 s, 512 at 28² 0.28 → 0.20 s; thinner products (1024 at 14², 2048 at 7²) were
        as fast or slower than the copied columns' blocked product."""
        layer = self.layer
        return (self._conv_hessian(inp) and layer.stride == (1, 1) and layer.kernel_size == (1, 1)
                and layer.padding == (0, 0) and inp.shape[-2] * inp.shape[-1] >= inp.shape[1])

    def _add_pointwise(self, inp: torch.Tensor, dense: torch.Tensor | None, end: bool) -> None:
        self._buffers(inp.device)
        beta, beta_d = self._betas(True)
        x = inp.float().reshape(len(inp), inp.shape[1], -1)  # (B, C, H·W): a view of contiguous inputs
        if dense is not None:
            delta = dense.float().reshape(x.shape) - x
            self._chunk_d[0].addbmm_(delta, x.transpose(1, 2), beta=beta_d)
        self._chunk[0].addbmm_(x, x.transpose(1, 2), beta=beta)  # both halves: add_upper_ reads the upper ones
        self.nsamples += x.shape[0] * x.shape[2]
        self._close(dense is not None, end)

    def _add_shifted(self, inp: torch.Tensor, dense: torch.Tensor | None, end: bool) -> None:
        layer, (H, W) = self.layer, inp.shape[-2:]
        (kh, kw), (Ho, Wo) = layer.kernel_size, output_size((H, W), layer.kernel_size, layer.padding, layer.stride)
        step = max(1, SHIFTED_CHUNK_BYTES // (4 * inp.shape[1] * (H + kh - 1) * (W + kw - 1)))
        dense_chunks = None if dense is None else dense.split(step)
        self._buffers(inp.device)
        for i, chunk in enumerate(inp.split(step)):
            beta, beta_d = self._betas(i == 0)  # start the batch's sums, then add to them
            if dense is not None:
                conv_gram(chunk, layer.kernel_size, layer.padding, y=dense_chunks[i] - chunk, out=self._chunk_d[0],
                          beta=beta_d, stride=layer.stride)
            conv_gram(chunk, layer.kernel_size, layer.padding, out=self._chunk[0], beta=beta, mirror=False,
                      stride=layer.stride)
            self.nsamples += len(chunk) * Ho * Wo
        self._close(dense is not None, end)

    def gate_affordable(self, inp: torch.Tensor, budget: float) -> bool:
        """Whether the per-row sums of relu_gate.py cost at most `budget` multiply-adds per image (rows·d² per
        output position) on inputs like `inp`."""
        positions = self.columns(inp[:1]).shape[-1]  # (a Linear fed (N, ..., in): the positions of one sample)
        return self.layer.weight.shape[0] * self.d ** 2 * positions <= budget

    def _add_active(self, inp: torch.Tensor, dense: torch.Tensor | None, shift: torch.Tensor | None,
                    active: torch.Tensor | None) -> None:
        """The per-row sums over active outputs (relu_gate.py), from the columns a few images at a time; a batch
        without `active` (its skip operand not at hand) counts as all active."""
        W, rows = self.weight_matrix()[0][0], self.layer.weight.shape[0]
        linear = isinstance(self.layer, nn.Linear)
        step = self.chunk_images(inp)  # (ActiveSums.add slices the columns again for its (rows, d, T) copy)
        for i in range(0, len(inp), step):
            X = self.columns(inp[i:i + step])[0]
            a = torch.ones(rows, X.shape[1], dtype=torch.bool, device=X.device) if active is None else \
                output_columns(active[i:i + step], rows, linear)
            Xd = self.columns(dense[i:i + step])[0] if dense is not None and self.active.RA is not None else None
            dy = output_columns(shift[i:i + step].float(), rows, linear) if shift is not None else None
            self.active.add(X, a, W, Xd, dy)

    def add_batch(self, inp: torch.Tensor, dense: torch.Tensor | None = None, end: bool = True,
                  shift: torch.Tensor | None = None, active: torch.Tensor | None = None) -> None:
        """Fold a batch of layer inputs into H, a few images at a time so the unfolded patches stay small.
        dense: the same images' inputs in the dense network (with dense_target). end=False: a part of a calibration
        batch that is not its last (the CPU's split, prune.cpu_batches): its sums stay in float32 with the next
        part's, so that each calibration batch adds one float64 term however it was split (fewer float64 additions
        of wide H's; the same terms on every torchrun rank). shift: δ of the shifted target W·X_d + δ (the layer's
        output shape; shifted_target). active: where the dense network's ReLU after the layer passes (the output's
        shape, bool; with inactive_weight)."""
        if self._H is not None:
            raise RuntimeError(f"{self.name}: H was already read; no more batches can be added")
        if not len(inp):
            return
        self.batches += 1
        if self.active is not None:
            self._add_active(inp, dense, shift if self.SD is not None else None, active)
        # inputs the pruning has not changed yet (no pruned layer upstream: ResNet-18's first block) add exactly 0 to
        # the dense target's cross term: its products are skipped, with the same sums (one layer's R, ~1 s there)
        changed = dense is not None and self.SD is not None and not torch.equal(dense, inp)
        shift = shift if self.SD is not None and (self.rhs_outputs or self.SE is not None) else None
        self.shift_batches += shift is not None
        if self.rhs_outputs and (changed or shift is not None):
            self.SD.add_(self._rhs_product(inp, dense if changed else None, shift))
        elif shift is not None:
            self.SE.add_(self._rhs_product(inp, None, shift))
        if shift is not None and self.shift_sum is not None:
            channels = shift.dim() - 1 if isinstance(self.layer, nn.Linear) else 1
            self.shift_sum += shift.double().sum([d for d in range(shift.dim()) if d != channels])
        if self.colsum is not None:
            sums, _ = self.column_sums(inp)
            self.colsum += sums
            if self.colsum_d is not None:  # (colsum_d exists only beside colsum)
                self.colsum_d += self.column_sums(dense)[0] if changed else sums
        cross = self._cross_in_chunks and changed
        dense = dense if cross else None  # from here on: the inputs whose cross term the chunks sum, if any
        if self.colsq is not None and not cross:  # no H, no columns: diag(XXᵀ) from sums of x²
            squares, columns = self.column_sums(inp, square=True)
            self.colsq += squares
            self.nsamples += columns
            return
        self._gathered(inp, dense, end)

    def _gathered(self, inp: torch.Tensor, dense: torch.Tensor | None, end: bool) -> None:
        """A part's products, or, for parts of a calibration batch whose inputs are small (the CPU splits batches by
        their widest layer's input: ResNet-50's 14² layers get 32 images at a time), the products of several parts
        at once, gathered up to GATHER_BYTES: fewer, larger products (the shifted path's cells and border sums, the
        columns' GEMMs), the same sums up to rounding."""
        if self._stash or (not end and inp.numel() * inp.element_size() < GATHER_BYTES):
            self._stash.append((inp, dense))
            if not end and sum(x.numel() * x.element_size() for x, _ in self._stash) < GATHER_BYTES:
                return
            inp, dense = self._take_stash()
        self._products(inp, dense, end)

    def _take_stash(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The gathered parts as one batch of inputs, and of dense inputs where any part has a cross term (a part
        whose inputs did not change adds an exact 0 to it: its own inputs stand in)."""
        parts, self._stash = self._stash, []
        dense = None if all(d is None for _, d in parts) else torch.cat([x if d is None else d for x, d in parts])
        return torch.cat([x for x, _ in parts]), dense

    def _products(self, inp: torch.Tensor, dense: torch.Tensor | None, end: bool) -> None:
        if self.shifted(inp):
            return self._add_shifted(inp, dense, end)
        if self.pointwise(inp):
            return self._add_pointwise(inp, dense, end)
        step = self.chunk_images(inp)
        dense_chunks = None if dense is None else dense.split(step)
        self._buffers(inp.device)
        for i, chunk in enumerate(inp.split(step)):
            X = self.columns(chunk)
            beta, beta_d = self._betas(i == 0)  # start the batch's sums, then add to them
            if dense is not None:
                self._chunk_d.baddbmm_(self.columns(dense_chunks[i] - chunk), X.transpose(1, 2), beta=beta_d)
            if self.S is not None:
                accumulate_xxt_(self._chunk, X, beta=beta, mirror=False)
            else:  # no H but the cross term's columns: diag(XXᵀ) from the same columns
                self.colsq += X.square().sum(-1).double()
            self.nsamples += X.shape[-1]
        self._close(dense is not None, end)

    def hessian_diagonal(self) -> torch.Tensor:
        """diag(H) = 2·mean(x_j²) per input column (G, d), from H or from the column sums."""
        if self.S is not None or self._H is not None:
            return torch.diagonal(self.H, dim1=-2, dim2=-1)
        return (2 * self.colsq / max(self.nsamples, 1)).float()

    def function(self, weight: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
        """The layer's map x ↦ weight ∗ x without its bias (its own padding, stride, groups)."""
        if isinstance(self.layer, nn.Linear):
            return lambda x: F.linear(x, weight)
        return lambda x: self.layer._conv_forward(x, weight, None)

    def input_mean(self, dense: bool = False) -> torch.Tensor:
        """The mean input column (G, d): the layer's mean output per channel is W·x̄ + b (conv: over positions).
        dense: of the dense network's inputs (x̄_d, with the dense target)."""
        return ((self.colsum_d if dense else self.colsum) / max(self.nsamples, 1)).float()

    def output_moments(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Per output channel, the mean and biased variance of the layer's output over every input added, with its
        weight and bias as they are now (after pruning), without running the layer: from ΣXXᵀ and the column sums
        (keep_sums and track_mean), E[y] = W·x̄ + b and Var[y] = (W·ΣXXᵀ·Wᵀ)ᵣᵣ/N − (W·x̄)², in float64. On ResNet-18's
        convs and CIFAR images within 1e-8..1e-7 of float64 statistics of the outputs, as BatchNorm's own kernel is.
        None without those sums."""
        if self._kept_S is not None:
            S = self._kept_S
        elif self.S is not None:  # H never read: a layer skipped before its solve, a torchrun rank that does not solve
            self.flush()
            S = mirror_upper_(self.S)
        else:
            return None
        if self.colsum is None:
            return None
        W, n = self.weight_matrix()[0].double(), max(self.nsamples, 1)
        m = torch.bmm(W, self.colsum[:, :, None]).squeeze(-1) / n  # (groups, rows)
        var = ((torch.bmm(W, S) * W).sum(-1) / n - m.square()).clamp_min(0).reshape(-1)
        bias = self.layer.bias
        return m.reshape(-1) + (0.0 if bias is None else bias.detach().double()), var

    def weight_matrix(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Weight as (groups, rows, d) in the solver's column order, and that order as an index into the
        flattened weight's columns."""
        W = self.layer.weight.data.float()
        perm = conv_column_perm(W.shape, W.device)
        Wg = W.reshape(self.groups, W.shape[0] // self.groups, -1)[:, :, perm]
        return Wg, perm

    def skip_reason(self, pattern: Pattern) -> str:
        # a view conv whose input channels are several taps of fewer channels (conv_views.DepthView) says how many
        # channels its N:M groups run along: groups of M must not straddle two taps
        cin = getattr(self.layer, "nm_channels", self.layer.weight.shape[1])
        if pattern.is_nm and cin % pattern.m:
            return f"{cin} input channels per group not divisible by M={pattern.m}"
        return ""

    @torch.no_grad()
    def prune(self, config, pattern: Pattern | None = None, stats: dict | None = None, graphs: dict | None = None,
              row_scale: torch.Tensor | None = None, intercept: bool = False, keep: str = "") -> LayerResult:
        """Prune the layer's weight in place as `config` (a PruneConfig) says: its method, damping, refinement
        (refine.py) and quantization (wbits: kept weights on a per-row grid of 2^wbits levels, rounded inside
        SparseGPT's loop with quant 'gptq' or after it with 'rtn'). pattern: this layer's, when an allocation
        gives it one (default: config's). row_scale (out_channels,): how much each output row counts when rows are
        compared in an unstructured mask (sparsegpt, magnitude); Wanda and N:M compare within rows. keep: why the
        layer stays dense (refit_dense_layers): every weight is kept, re-fitted to the dense target only."""
        config = config.resolved()
        percdamp = config.percdamp
        for raised in range(DAMPING_RAISES + 1):
            try:
                res = self._prune(config, percdamp, pattern, stats, graphs, row_scale, intercept, keep)
            except torch.linalg.LinAlgError:
                if raised == DAMPING_RAISES:
                    raise UserError(f"layer {self.name}: its calibration inputs' Hessian is not positive definite "
                                    f"even with percdamp={percdamp:g} ({self.input_scale()}); are the weights "
                                    "before it trained?") from None
                percdamp = max(percdamp, 1e-4) * 10
                continue
            if percdamp != config.percdamp:
                warnings.warn(f"{self.name}: its solve failed at percdamp={config.percdamp:g} (H + damping not "
                              f"positive definite, or weights not finite; {self.input_scale()}); solved at "
                              f"{percdamp:g}", RuntimeWarning)
            return res

    def input_scale(self) -> str:
        """The size of the layer's calibration inputs, for a message about its Hessian."""
        return f"its inputs' mean square is {self.mean_square():.3g}" if self.nsamples else "no calibration inputs"

    def mean_square(self) -> float:
        """The mean square of the layer's calibration inputs (over inputs and samples; 0 without any)."""
        return float(self.hessian_diagonal().double().mean()) / 2 if self.nsamples > 0 else 0.0

    def _prune(self, config, percdamp: float, pattern: Pattern | None, stats: dict | None, graphs: dict | None,
               row_scale: torch.Tensor | None, intercept: bool, keep: str) -> LayerResult:
        """prune() at damping `percdamp`; raises LinAlgError where H + damping is not positive definite."""
        method, refine, wbits = config.method, config.refine, config.wbits
        pattern = pattern or config.pattern
        t0 = time.perf_counter()
        weight = self.layer.weight
        res = LayerResult(self.name, list(weight.shape), method, str(pattern))
        res.reason = keep or self.skip_reason(pattern)
        if keep:  # not pruned (left out of the sparsity totals and of masks.pt), but re-fitted below
            res.skipped, pattern = True, Pattern(sparsity=0.0)
        elif res.reason:
            res.skipped = True  # not pruned: left out of the sparsity totals and of masks.pt
            res.mask = torch.ones_like(weight, dtype=torch.bool)
            if not wbits:
                return res
            # a deployed model should not carry one float layer among quantized ones: GPTQ alone here
            res.reason += f"; not pruned, quantized to {wbits} bits"
            pattern = Pattern(sparsity=0.0)
        Wg, perm = self.weight_matrix()
        Hg = self.H  # already in the solver's column order (see columns); None without a Hessian
        diagonal = self.hessian_diagonal()
        square = self.mean_square()
        live = square > TINY_INPUTS
        if Hg is None and method == "magnitude":  # magnitude needs no inputs at all: none were given
            live = True
        if not live:
            if method != "magnitude":
                what = "all zero" if square == 0 else f"all but zero (mean square {square:.2g}, below float32's range)"
                warnings.warn(f"{self.name}: calibration inputs are {what}; magnitude-pruned instead", RuntimeWarning)
                res.reason = f"calibration inputs {what}: magnitude-pruned instead"
            method = "magnitude"
        refit = self.nsamples >= MIN_SAMPLES_PER_INPUT * Wg.shape[-1]
        dense_target = self.SD is not None or self._R is not None
        if not refit and (dense_target or refine != "none"):
            res.reason = f"{few_samples(self.nsamples, Wg.shape[-1])}: dense target and refinement left out, they " \
                "would fit the calibration set"
        if keep and not (dense_target and live and refit):  # nothing to fit, or too few samples: as it was
            res.mask = torch.ones_like(weight, dtype=torch.bool)
            return res
        intercept = intercept and live and Hg is not None and self.colsum is not None
        R = self.R if dense_target else None
        if method == "sparsegpt" and not keep:
            res.solver = choose_solver(config.solver, Wg.shape[0] * Wg.shape[1], Wg.shape[-1], bool(wbits))
        # per-row H and R (relu_gate.py) where every step below takes them: the exact solver, cg or no re-solve
        if self.active is not None and live and refit and res.solver == "exact" and refine in ("none", "cg"):
            n = max(self.nsamples, 1)
            Hg, R = self.active.hessian(Hg, n), self.active.rhs(R, n)
            res.inactive_weight = self.inactive_weight
        else:
            self.active = None
        if R is not None and self.target_share != 1:  # the correction's share (R is linear in it)
            R = R * self.target_share
        rows = per_row if Hg is not None and Hg.dim() == 4 else (lambda *ts: ts)
        if intercept:  # the offset is free: fit the inputs' covariances (intercept.py); res.offset takes the mean
            W0 = Wg
            Hg, R = self.center(Hg, R)
        if dense_target and live and refit:  # the error is measured against W* from here on
            Wg = dense_target_weights(*rows(Wg, Hg, R), percdamp).reshape(Wg.shape)
            res.refitted = bool(keep)
        scale = None if row_scale is None else row_scale.to(Wg).reshape(self.groups, -1)
        grid = fit_grid(Wg, wbits, config.quant_clip) if wbits and not keep else None
        if keep:  # W* as it is (a dense layer stays float): nothing to remove, nothing to re-solve
            Q, pruned, refine, res.percdamp = Wg, torch.zeros_like(Wg, dtype=torch.bool), "none", percdamp
        else:
            Q, pruned, res.percdamp = prune_matrix(Wg, Hg, method, pattern, percdamp, config.blocksize, scale,
                                                   stats=stats, graphs=graphs, grid=grid, quant=config.quant,
                                                   diagonal=diagonal, solver=res.solver or "sparsegpt",
                                                   column_loop=config.column_loop)
            refine = refine_run(refine if refit and live and Hg is not None else "none", Wg)
        if refine != "none":
            Wr, Qr, pr, Hr = rows(Wg, Q, pruned, Hg)
            Q, pruned = (t.reshape(Wg.shape) for t in refine_solve(refine, Wr, Qr, pr, Hr, pattern, percdamp))
        res.refine = None if refine == "none" else refine
        if Hg is not None:
            res.error = float(relative_error(*rows(Wg, Q, Hg)))
        else:  # measured afterwards on the layer's outputs (output_error)
            res.error_from = "outputs"
        if intercept:
            res.offset = self.output_offset(W0, Q, dense_target).cpu()
        if not torch.isfinite(Q).all():  # a solve on an ill-conditioned H: as a failed factorization (more damping)
            raise torch.linalg.LinAlgError(f"{self.name}: the solved weights are not finite")
        inv = torch.argsort(perm)
        weight.data.copy_(Q[:, :, inv].reshape(weight.shape).to(weight.dtype))
        res.mask = (~pruned)[:, :, inv].reshape(weight.shape)
        if grid is not None:  # integer codes in the weight's own layout, one scale and zero point per output channel
            codes = layer_codes(Q, grid)
            res.quant = codes | {"codes": codes["codes"][:, :, inv].reshape(weight.shape).cpu(),
                                 "scale": codes["scale"].reshape(-1).cpu(), "zero": codes["zero"].reshape(-1).cpu()}
        res.sparsity = 1.0 - res.mask.float().mean().item()
        res.seconds = time.perf_counter() - t0
        return res

    def free(self) -> None:
        self.S = self.SD = self._H = self._R = self._chunk = self._chunk_d = self.colsum = self.colsum_d = None
        self.SE = self.shift_sum = self.active = None
        self.colsq = self._kept_S = None


def per_row(*tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """A layer with per-row Hessians (relu_gate.py) as a batch of one-row problems: weights and masks (1, rows, d) ->
    (rows, 1, d), H (1, rows, d, d) -> (rows, d, d)."""
    return tuple(t[0] if t.dim() == 4 else t[0][:, None, :] for t in tensors)


@torch.no_grad()
def output_error(pruner: LayerPruner, dense_weight: torch.Tensor, inputs: Iterable[torch.Tensor],
                 group=None) -> float:
    """‖(W − Ŵ)X‖² / ‖WX‖² from the layer's outputs on `inputs` (summed over `group`'s processes): the error of
    a layer pruned without a Hessian, for two runs of the layer instead of a d×d product per sample."""
    weight = pruner.layer.weight.detach()
    delta, dense = pruner.function(dense_weight - weight), pruner.function(dense_weight)
    sums = torch.zeros(2, dtype=torch.float64, device=weight.device)
    for x in inputs:
        x = x.to(weight.dtype)
        sums[0] += torch.linalg.vector_norm(delta(x), dtype=torch.float64).square()  # no float64 copy of outputs
        sums[1] += torch.linalg.vector_norm(dense(x), dtype=torch.float64).square()
    num, den = dist.all_sum_(sums, f"{pruner.name}: adding its output error", group).tolist()
    return num / den if den > 0 else (0.0 if num == 0 else math.inf)
