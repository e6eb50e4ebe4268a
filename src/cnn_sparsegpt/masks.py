"""Sparsity patterns and the mask builders every method shares.

Masks here are boolean with True = *pruned*, in the solver's column layout: for Conv2d the weight is
seen as (out, kh, kw, in) so that N:M groups run along input channels at each kernel tap (the layout
of sparse tensor cores and NVIDIA's ASP); for Linear along in_features.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from .utils import UserError


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


def topk_prune_mask(scores: torch.Tensor, k: int, per_row: bool = False) -> torch.Tensor:
    """Prune exactly the k lowest scores of each matrix (..., rows, cols), or of each row when per_row."""
    mask = torch.zeros_like(scores, dtype=torch.bool)
    if k <= 0:
        return mask
    flat = scores if per_row else scores.flatten(-2)
    idx = torch.topk(flat, k, dim=-1, largest=False).indices
    return (mask if per_row else mask.flatten(-2)).scatter_(-1, idx, True).reshape(scores.shape)


def pattern_prune_mask(scores: torch.Tensor, pattern: Pattern, per_row: bool = False) -> torch.Tensor:
    """One-shot mask for the score-based methods (magnitude, Wanda)."""
    if pattern.is_nm:
        return nm_prune_mask(scores, pattern.n, pattern.m)
    k = round(pattern.sparsity * (scores.shape[-1] if per_row else scores.shape[-1] * scores.shape[-2]))
    return topk_prune_mask(scores, k, per_row)


def conv_column_perm(weight_shape: torch.Size, device=None) -> torch.Tensor:
    """Index that reorders unfold's (in, kh, kw) columns to (kh, kw, in): N:M groups become contiguous."""
    if len(weight_shape) != 4:
        return torch.arange(weight_shape[1], device=device)
    cin, kh, kw = weight_shape[1:]
    return torch.arange(cin * kh * kw, device=device).view(cin, kh, kw).permute(1, 2, 0).flatten()
