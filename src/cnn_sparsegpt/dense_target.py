"""Fit each layer to the dense network's output, not to its own dense weights on pruned inputs
(`--dense-target`).

Sequential SparseGPT minimizes ‖(W − Ŵ)·X_p‖², X_p the layer's inputs in the already-pruned network, so
error made upstream is never corrected. The asymmetric target ‖W·X_d − Ŵ·X_p‖² (X_d: the same images'
inputs in the dense network) is, up to a constant, the symmetric one for the weights
    W* = W·C·H⁻¹,  C = 2·X_d·X_pᵀ/N,  H = 2·X_p·X_pᵀ/N,
so the solver and the refinements run unchanged on W*. The inverse is damped as a ridge towards W,
W* = W + W·(C − H)·(H + λI)⁻¹, so that a layer whose inputs did not change (C = H) keeps W exactly.

The dense inputs come from a frozen copy of the dense model, one batch at a time, by a forward pass cut
short at the layer: about half a pass per pruned layer on average, and one batch of them in memory.
"""
from __future__ import annotations

import copy
import time
from collections.abc import Iterator

import torch
from torch import nn

from .linalg import damped


class _Stop(Exception):
    pass


class DenseInputs:
    """The dense network's input to any of its layers, batch by batch, in the calibration batches' order."""

    def __init__(self, model: nn.Module, batches: list[torch.Tensor]):
        self.model = copy.deepcopy(model).eval()  # the dense weights and BatchNorm statistics, frozen
        self.modules = dict(self.model.named_modules())
        self.batches = batches
        self.seconds = 0.0  # spent in the dense forward passes

    @torch.no_grad()
    def stream(self, name: str) -> Iterator[torch.Tensor]:
        captured = []

        def grab(_m, inp):
            captured.append(inp[0])
            raise _Stop

        handle = self.modules[name].register_forward_pre_hook(grab)
        try:
            for x in self.batches:
                t0 = time.perf_counter()
                try:
                    self.model(x)
                except _Stop:
                    pass
                self.seconds += time.perf_counter() - t0
                yield captured.pop()
        finally:
            handle.remove()

    def free(self) -> None:
        self.model = self.modules = None


def dense_target_weights(W: torch.Tensor, H: torch.Tensor, C: torch.Tensor, percdamp: float) -> torch.Tensor:
    """W* = W + W·(C − H)·(H + λI)⁻¹ for a batch (G, rows, d), H and C (G, d, d); λ = percdamp · mean diag(H)."""
    A = damped(H, percdamp)
    L, info = torch.linalg.cholesky_ex(A)
    del A
    if info.any():  # damping too small for this H: keep the symmetric target rather than fail the prune
        return W
    R = torch.bmm(W, C - H)  # (G, rows, d); rows as vectors: Y·(H + λI) = R
    return W + torch.cholesky_solve(R.transpose(-1, -2), L).transpose(-1, -2)
