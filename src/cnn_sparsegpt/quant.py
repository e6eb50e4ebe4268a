"""Weight quantization joint with pruning (`--wbits B`): each output row (channel) gets an asymmetric uniform
grid of 2^B levels fitted on its weights before pruning (min/max, 0 always on the grid, so pruned weights
are exact zeros of it). With `--quant gptq` (default) SparseGPT rounds each kept weight to its grid inside
the column loop and pushes the rounding error, with the pruning error, into the columns not yet visited
(GPTQ); `--quant rtn` rounds to nearest after the prune (the baseline). `--sparsity 0 --wbits B` is GPTQ
alone. The model keeps dequantized float weights (it runs in plain PyTorch); `quant.pt` holds the integer
codes, scales and zero points.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

QUANT = ("gptq", "rtn")
BITS = (8, 4, 3, 2)


@dataclass
class Grid:
    scale: torch.Tensor  # (G, rows, 1) step of each row's grid
    zero: torch.Tensor  # (G, rows, 1) integer code of 0.0
    bits: int

    @property
    def maxq(self) -> int:
        return 2 ** self.bits - 1

    def codes(self, w: torch.Tensor) -> torch.Tensor:
        """Integer codes (as floats) of w, columns broadcast against the rows' grids."""
        return torch.clamp(torch.round(w / self.scale) + self.zero, 0, self.maxq)

    def quantize(self, w: torch.Tensor) -> torch.Tensor:
        return self.scale * (self.codes(w) - self.zero)


def fit_grid(W: torch.Tensor, bits: int) -> Grid:
    """Per-row min/max grid for W (G, rows, d), widened to contain 0."""
    if bits not in BITS:
        raise ValueError(f"--wbits must be one of {', '.join(map(str, BITS))}, got {bits}")
    maxq = 2 ** bits - 1
    lo = W.amin(-1, keepdim=True).clamp_max(0)
    hi = W.amax(-1, keepdim=True).clamp_min(0)
    scale = (hi - lo) / maxq
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))  # an all-zero row: any grid holds it
    zero = torch.round(-lo / scale)
    return Grid(scale, zero, bits)


def round_to_nearest(Q: torch.Tensor, pruned: torch.Tensor, grid: Grid) -> torch.Tensor:
    """The baseline: every kept weight of a solved layer to its nearest grid point; pruned stay exact 0."""
    return grid.quantize(Q).masked_fill_(pruned, 0)


def layer_codes(Q: torch.Tensor, grid: Grid) -> dict:
    """What quant.pt stores for one layer (solver order, shape (G, rows, d)): uint8 codes, scales, zero points."""
    return {"codes": grid.codes(Q).to(torch.uint8), "scale": grid.scale[..., 0].clone(),
            "zero": grid.zero[..., 0].to(torch.uint8), "bits": grid.bits}
