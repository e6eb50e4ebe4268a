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
from torch import nn
from torch.nn.utils import parametrize

QUANT = ("gptq", "rtn")
CLIP = ("minmax", "mse")
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


def fit_grid(W: torch.Tensor, bits: int, clip: str = "minmax", steps: int = 40, shrink: float = 0.6) -> Grid:
    """Per-row grid for W (G, rows, d), always containing 0. minmax: the grid spans each row's weights; mse: the
    range is shrunk towards 0 by the factor in [shrink, 1] (`steps` tried) that rounds the row with the least
    squared error (clipping a few outliers buys finer steps for all the others)."""
    if bits not in BITS:
        raise ValueError(f"--wbits must be one of {', '.join(map(str, BITS))}, got {bits}")
    if clip not in CLIP:
        raise ValueError(f"--quant-clip must be one of {', '.join(CLIP)}, got {clip}")
    lo = W.amin(-1, keepdim=True).clamp_max(0)
    hi = W.amax(-1, keepdim=True).clamp_min(0)
    best = _minmax_grid(lo, hi, bits)
    if clip == "mse":
        err = (best.quantize(W) - W).square().sum(-1, keepdim=True)
        for f in torch.linspace(1.0, shrink, steps)[1:].tolist():
            g = _minmax_grid(lo * f, hi * f, bits)
            e = (g.quantize(W) - W).square().sum(-1, keepdim=True)
            better = e < err
            err = torch.where(better, e, err)
            best = Grid(torch.where(better, g.scale, best.scale), torch.where(better, g.zero, best.zero), bits)
    return best


def _minmax_grid(lo: torch.Tensor, hi: torch.Tensor, bits: int) -> Grid:
    maxq = 2 ** bits - 1
    scale = (hi - lo) / maxq
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))  # an all-zero row: any grid holds it
    return Grid(scale, torch.round(-lo / scale), bits)


def round_to_nearest(Q: torch.Tensor, pruned: torch.Tensor, grid: Grid) -> torch.Tensor:
    """The baseline: every kept weight of a solved layer to its nearest grid point; pruned stay exact 0."""
    return grid.quantize(Q).masked_fill_(pruned, 0)


def layer_codes(Q: torch.Tensor, grid: Grid) -> dict:
    """What quant.pt stores for one layer (solver order, shape (G, rows, d)): uint8 codes, scales, zero points."""
    return {"codes": grid.codes(Q).to(torch.uint8), "scale": grid.scale[..., 0].clone(),
            "zero": grid.zero[..., 0].to(torch.uint8), "bits": grid.bits}


class OnGrid(nn.Module):
    """Parametrization for fine-tuning a quantized run: the forward pass sees the weights rounded to their
    channel's grid, the gradient passes straight through to the float weights underneath (STE), so training
    moves weights between grid points instead of off the grid."""

    def __init__(self, scale: torch.Tensor, zero: torch.Tensor, bits: int, ndim: int):
        super().__init__()
        shape = (-1,) + (1,) * (ndim - 1)  # one scale and zero point per output channel
        self.register_buffer("scale", scale.detach().float().reshape(shape))
        self.register_buffer("zero", zero.detach().float().reshape(shape))
        self.bits = bits

    def grid(self) -> Grid:
        return Grid(self.scale, self.zero, self.bits)

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        # q + (w − w): exactly q in value, w's gradient. (w + (q − w) is not exactly q once w has drifted far
        # outside its grid's range, and the baked-in weights then left the grid.)
        return self.grid().quantize(w).detach() + (w - w.detach())


def attach_grids(model: nn.Module, quantized: dict[str, dict]) -> dict[str, str]:
    """Put every weight of quant.pt (name → codes, scale, zero, bits) behind OnGrid; returns weight name → the
    name of the float parameter that the optimizer now updates."""
    latent = {}
    for name, q in quantized.items():
        module_name, _, attr = name.rpartition(".")
        module = model.get_submodule(module_name)
        weight = getattr(module, attr)
        parametrize.register_parametrization(module, attr, OnGrid(q["scale"], q["zero"], q["bits"], weight.ndim))
        latent[name] = f"{module_name}.parametrizations.{attr}.original"
    return latent


def detach_grids(model: nn.Module, quantized: dict[str, dict]) -> dict[str, dict]:
    """Bake the rounded weights in (plain parameters again) and return quant.pt's new codes; the grids are the
    ones the run was quantized on."""
    out = {}
    for name, q in quantized.items():
        module_name, _, attr = name.rpartition(".")
        module = model.get_submodule(module_name)
        grid = getattr(module.parametrizations, attr)[0].grid()
        parametrize.remove_parametrizations(module, attr, leave_parametrized=True)
        w = getattr(module, attr).detach()
        out[name] = q | {"codes": grid.codes(w).to(torch.uint8).cpu()}
        if not torch.equal(grid.quantize(w), w):
            raise RuntimeError(f"{name}: a weight left its quantization grid during fine-tuning")
    return out
