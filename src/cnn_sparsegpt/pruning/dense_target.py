"""Fit each layer to the dense network's output, not to its own dense weights on pruned inputs
(`--dense-target`).

Sequential SparseGPT minimizes ‖(W − Ŵ)·X_p‖², X_p the layer's inputs in the already-pruned network, so
error made upstream is never corrected. The asymmetric target ‖W·X_d − Ŵ·X_p‖² (X_d: the same images'
inputs in the dense network) is, up to a constant, the symmetric one for the weights
    W* = W·C·H⁻¹,  C = 2·X_d·X_pᵀ/N,  H = 2·X_p·X_pᵀ/N,
so the solver and the refinements run unchanged on W*. The inverse is damped as a ridge towards W,
W* = W + W·(C − H)·(H + λI)⁻¹, so that a layer whose inputs did not change (C = H) keeps W exactly. R = W·(C − H) =
2·W·(X_d − X_p)·X_pᵀ/N is summed as such (layer.py; from the layer's outputs where it has fewer rows than d/2):
exactly 0 there, not the difference of two rounded products.

The dense inputs come from a frozen copy of the dense model. Where the pruned network runs as a traced graph,
the dense copy's graph runs in step with it under the same memory policy: in default mode one dense pass in all
for one more set of stored activations; in low-memory mode the same recomputation the pruned side does (before,
low-memory runs cut a forward pass short at every layer: half a pass per layer, 798 of 1006 s of a ResNet-50
prune). For untraceable models each layer's dense inputs come from forward passes cut short at the layer.
"""
from __future__ import annotations

import copy
import time
from collections.abc import Iterator

import torch
from torch import nn

from .graph import GraphExecutor, inputs_of, layer_source, partial_trace, trace
from ..kernels.linalg import damped


class DenseInputs:
    """The dense network's input to any of its layers, batch by batch, in the calibration batches' order."""

    def __init__(self, model: nn.Module, batches: list[torch.Tensor]):
        self.model = copy.deepcopy(model).eval()  # the dense weights and BatchNorm statistics, frozen
        self.modules = dict(self.model.named_modules())
        self.batches = batches
        self.seconds = 0.0  # spent in the dense forward passes
        self._executor: GraphExecutor | None = None  # the dense copy's traced graph (follow_graph)
        self._graph = None  # its run, a generator advanced in step with the pruned one
        self._captured: dict[str, list] = {}
        self._on_graph: set[str] = set()  # layers the traced graph calls (those inside a part called whole are not)
        self.parts: list[str] = []  # the parts called whole whose layers are served from the part's stored inputs
        self._stored: dict[str, list] = {}  # the inputs of the part of the last such layer served (layer_source)

    def follow_graph(self, names: list[str], low_memory: bool = False, keep_until: list[str] = ()) -> bool:
        """Serve the inputs of `names` (in the order the pruned graph reaches them) from one run of the dense
        copy's traced graph, under the pruned side's memory policy (low_memory: the same recomputation instead
        of stored activations), node outputs read by `keep_until` at hand for `output`; False if it cannot be
        traced (then every layer gets truncated passes)."""
        try:
            gm = trace(self.model)
        except Exception:  # as the pruned side: the parts fx cannot trace called whole, their layers served below
            gm = partial_trace(self.model, self.batches[0][:2])
            if gm is None:
                return False
        self._on_graph = {n.target for n in gm.graph.nodes if n.op == "call_module"}

        def capture(name):
            def barrier(inputs):
                if name not in self._captured:  # a module called twice is pruned at its first call
                    self._captured[name] = list(inputs)
            return barrier

        self._executor = GraphExecutor(gm, self.batches, {n: capture(n) for n in names}, low_memory,
                                       keep_until=keep_until)
        self._graph = self._executor.steps()
        return True

    @torch.no_grad()
    def stream(self, name: str) -> Iterator[torch.Tensor]:
        if self._graph is not None and name in self._on_graph:
            f0 = self._executor.forward_seconds
            while self._captured.get(name) is None:
                next(self._graph)
            self.seconds += self._executor.forward_seconds - f0
            inputs, self._captured[name] = self._captured[name], []  # [] marks it served
            while inputs:
                yield inputs.pop(0)
            return
        t0 = time.perf_counter()
        run, data, _ = layer_source(self.model, name, self.batches, self.parts, self._stored)
        self.seconds += time.perf_counter() - t0
        inputs = inputs_of(run, self.modules[name], data)  # (lazily: one batch's inputs at a time)
        while True:
            t0 = time.perf_counter()
            x = next(inputs, None)
            self.seconds += time.perf_counter() - t0
            if x is None:
                return
            yield x

    def served(self, names) -> None:
        """Layers whose inputs are not wanted (a resumed prune's finished layers): never captured."""
        for name in names:
            self._captured[name] = []

    def output(self, node: str, b: int) -> torch.Tensor | None:
        """The dense copy's output of graph node `node` for batch b, while its graph stands at the layer last
        served (None without a traced graph, or where its memory policy did not keep it)."""
        return self._executor.output(node, b) if self._executor is not None else None

    def free(self) -> None:
        if self._graph is not None:
            self._graph.close()
        self.model = self.modules = self._graph = self._executor = None
        self._captured.clear()
        self._stored.clear()


def dense_target_weights(W: torch.Tensor, H: torch.Tensor, R: torch.Tensor, percdamp: float) -> torch.Tensor:
    """W* = W + R·(H + λI)⁻¹ for a batch (G, rows, d), H (G, d, d) and R = W·D = W·(C − H) (G, rows, d);
    λ = percdamp · mean diag(H)."""
    A = damped(H, percdamp)
    L, info = torch.linalg.cholesky_ex(A)
    del A
    if info.any():  # damping too small for this H: keep the symmetric target rather than fail the prune
        return W
    return W + torch.cholesky_solve(R.transpose(-1, -2), L).transpose(-1, -2)  # rows as vectors: Y·(H + λI) = R
