"""Sparsity patterns and the mask builders every method shares.

Masks here are boolean with True = *pruned*, in the solver's column layout: for Conv2d the weight is
seen as (out, kh, kw, in) so that N:M groups run along input channels at each kernel tap (the layout
of sparse tensor cores and NVIDIA's ASP); for Linear along in_features.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch

from ..utils import UserError


@dataclass(frozen=True)
class Pattern:
    sparsity: float = 0.0  # fraction of weights pruned (unstructured); ignored when n:m is set
    n: int = 0  # weights kept per group (N:M); 0 = unstructured
    m: int = 0  # group size along input channels

    @property
    def is_nm(self) -> bool:
        return self.m > 0

    @property
    def target(self) -> float:
        return 1.0 - self.n / self.m if self.is_nm else self.sparsity

    def __str__(self) -> str:
        return f"{self.n}:{self.m}" if self.is_nm else f"{self.sparsity:g}"

    @classmethod
    def parse(cls, sparsity: float | str | None = None, nm: str | None = None) -> Pattern:
        """Build from the user's --sparsity / --nm, with a clear error for every bad combination."""
        if (sparsity is None) == (nm is None):
            raise UserError("give exactly one of --sparsity (e.g. 0.5) and --nm (e.g. 2:4)")
        if nm is not None:
            match = re.fullmatch(r"\s*(\d+)\s*:\s*(\d+)\s*", str(nm))
            if not match:
                raise UserError(f"--nm must be two integers 'N:M' such as 2:4, got '{nm}'")
            n, m = int(match[1]), int(match[2])
            if m < 1 or n < 1 or n >= m:
                raise UserError(f"--nm {nm}: need 1 <= N < M (N weights kept of every M), e.g. 2:4")
            return cls(n=n, m=m)
        try:
            s = float(sparsity)
        except (TypeError, ValueError):
            raise UserError(f"--sparsity must be a number in [0, 1), got '{sparsity}'") from None
        if not 0.0 <= s < 1.0:
            raise UserError(f"--sparsity must be in [0, 1), got {s:g}")
        return cls(sparsity=s)


def nm_prune_mask(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Prune the m - n lowest scores in each group of m consecutive columns (columns % m == 0).

    Works on (..., rows, cols): leading dimensions are independent matrices.
    """
    groups = scores.reshape(*scores.shape[:-1], scores.shape[-1] // m, m)
    idx = torch.topk(groups, m - n, dim=-1, largest=False).indices
    mask = torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, idx, True)
    return mask.reshape(scores.shape)


def quota(fraction: float, start, stop) -> torch.Tensor:
    """How many weights to prune in spans [start, stop) of a layer's weights, all counted in one running
    order (groups, then rows or blocks): round(f·stop) − round(f·start). The counts of consecutive spans
    add up to the rounded count of their union, so a layer of many small spans (a depthwise conv's
    9-weight groups) gets its fraction within one weight instead of every span rounded on its own."""
    start, stop = torch.as_tensor(start, dtype=torch.float64), torch.as_tensor(stop, dtype=torch.float64)
    return (torch.round(fraction * stop) - torch.round(fraction * start)).long()


def topk_prune_mask(scores: torch.Tensor, k: int | torch.Tensor, per_row: bool = False) -> torch.Tensor:
    """Prune the k lowest scores of each matrix (..., rows, cols), or of each row when per_row. k is one
    count for all, or a tensor of counts, one per matrix (shape ...) or per row (shape (..., rows))."""
    flat = scores if per_row else scores.flatten(-2)
    if not isinstance(k, torch.Tensor) or bool((k == k.flatten()[0]).all()):
        k = int(k if not isinstance(k, torch.Tensor) else k.flatten()[0])
        if k <= 0:
            return torch.zeros_like(scores, dtype=torch.bool)
        # The k-th smallest as a threshold, ties at it taken in column order: cheaper than topk's indices at the
        # counts SparseGPT's blocks ask for (k ~ 0.5-0.9 of 10⁴-10⁵ scores), whose cost grows with k.
        v = torch.kthvalue(flat, k, dim=-1, keepdim=True).values
        return _below(flat, v, k).reshape(scores.shape)
    k = k.to(flat.device)
    if not per_row and flat[..., 0].numel() <= MAX_THRESHOLDS:  # a few matrices: a threshold each
        rows = flat.reshape(-1, flat.shape[-1])
        ks = k.expand(flat.shape[:-1]).reshape(-1)
        v = torch.stack([torch.kthvalue(r, int(c)).values if c > 0 else r.new_tensor(-math.inf)
                         for r, c in zip(rows, ks.tolist())])
        return _below(flat, v.reshape(*flat.shape[:-1], 1), k[..., None]).reshape(scores.shape)
    # Counts that differ: rank every entry (stable sort: ties go to the earlier column) and cut each at its k.
    order = torch.argsort(flat, dim=-1, stable=True)
    ranks = torch.empty_like(order).scatter_(-1, order, torch.arange(flat.shape[-1], device=flat.device)
                                             .expand_as(order).contiguous())
    return (ranks < k[..., None]).reshape(scores.shape)


MAX_THRESHOLDS = 64  # matrices with their own count that get a k-th value each (more: one stable sort)


def _below(flat: torch.Tensor, v: torch.Tensor, k) -> torch.Tensor:
    """The entries below each threshold v, and the first of those equal to it (column order) up to k in all."""
    mask = flat < v
    tie = flat == v
    mask |= tie & (tie.cumsum(-1) <= k - mask.sum(-1, keepdim=True))
    return mask


def pattern_prune_mask(scores: torch.Tensor, pattern: Pattern, per_row: bool = False) -> torch.Tensor:
    """One-shot mask for the score-based methods (magnitude, Wanda) of (groups, rows, cols) scores:
    per matrix (a group) or per row, with counts carried across groups and rows (see `quota`)."""
    if pattern.is_nm:
        return nm_prune_mask(scores, pattern.n, pattern.m)
    span = scores.shape[-1] if per_row else scores.shape[-1] * scores.shape[-2]
    units = scores.shape[:-1] if per_row else scores.shape[:-2]
    start = torch.arange(math.prod(units)).view(units) * span
    return topk_prune_mask(scores, quota(pattern.sparsity, start, start + span), per_row)


def conv_column_perm(weight_shape: torch.Size, device=None) -> torch.Tensor:
    """Index that reorders unfold's (in, kh, kw) columns to (kh, kw, in): N:M groups become contiguous."""
    if len(weight_shape) != 4:
        return torch.arange(weight_shape[1], device=device)
    cin, kh, kw = weight_shape[1:]
    return torch.arange(cin * kh * kw, device=device).view(cin, kh, kw).permute(1, 2, 0).flatten()
