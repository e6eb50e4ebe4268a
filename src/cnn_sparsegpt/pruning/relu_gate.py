"""The dense target weighed by the dense network's ReLU (`--inactive-weight α`).

A layer's output reaches the next layer through a ReLU (in a residual block, after its BatchNorm and the skip's sum).
Where the dense network's ReLU output is 0, a pruned output that stays below zero costs nothing downstream, yet the
dense target min Σ_t ‖W·x_d,t − Ŵ·x_p,t‖² counts every position alike. Here output row r weighs position t by

    g_rt = 1 where the dense pre-activation z_rt > 0,  α where it is not,

(α = 1: the plain dense target; α = 0 would ignore that a pruned output can cross zero, which does cost). Each row then
has its own Hessian and right-hand side,

    H_r = α·H + (1 − α)·2/N Σ_{t active} x_t x_tᵀ,      R_r = α·R + (1 − α)·2/N Σ_{t active} (Δy_rt) x_tᵀ,

Δy = W·(X_d − X_p) + δ (δ: the residual target's shift), so the layer's problem is a batch of one-row problems that the
exact solver (a per-row greedy anyway) and cg solve as they are. z comes from the dense copy: its BatchNorm of its conv
on the dense inputs, plus the dense skip operand where a sum comes between. Per-row sums cost rows·d² per column
(rows times H's own), so the layers that take it are bounded by `GATE_FLOPS`; wider ones keep the plain target,
as do layers the exact solver does not take (SparseGPT's sweep shares one H⁻¹ across rows).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import fx, nn

from ..kernels.solver import choose_solver
from .graph import module_calls, sole_batchnorm_reader
from .residual_target import skip_partners

# The most multiply-adds per calibration image of one layer's per-row sums (rows·d² per output position) where the gate
# is applied: ResNet-20's widest layers (64 rows, d 576, 8² outputs) take 1.4e9, ResNet-18's first stage (64 × 576 at
# 32²) 2.2e10, which would be ~2 minutes per layer for 1024 images on this project's 2-core CPU: it keeps the plain one.
GATE_FLOPS = 2e9
GATE_BYTES = 2**30  # the per-row ΣXXᵀ (rows·d² float64) at most: decided before any input is seen

_RELUS = {F.relu, torch.relu, torch.relu_}


@dataclass(frozen=True)
class ReluGate:
    """How a layer's output reaches a ReLU: through a BatchNorm (or not), then the ReLU, or a sum with an operand
    computed before the layer (graph node `skip`) and then the ReLU."""
    batchnorm: str | None  # module name
    skip: str | None = None  # fx node of the sum's other operand (read from the dense copy at the layer's barrier)
    sum: str | None = None  # fx node of that sum (its operands kept at hand until it: GraphExecutor's keep_until)


def _is_relu(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    if node.op == "call_function":
        return node.target in _RELUS
    if node.op == "call_method":
        return node.target in ("relu", "relu_")
    return node.op == "call_module" and isinstance(modules.get(node.target), nn.ReLU)


def _sole_user(node: fx.Node) -> fx.Node | None:
    users = list(node.users)
    return users[0] if len(users) == 1 else None


def relu_gates(traced: fx.GraphModule, names: list[str]) -> dict[str, ReluGate]:
    """Per layer of `names` called once whose output, alone or through a BatchNorm (with running statistics) that only
    it feeds, goes only into a ReLU, or into a sum with an operand computed earlier (residual_target.skip_partners)
    that goes only into a ReLU."""
    modules = dict(traced.named_modules())
    nodes = {n.name: n for n in traced.graph.nodes}
    partners = skip_partners(traced, names)
    out = {}
    for name, found in module_calls(traced, names).items():
        if len(found) != 1:
            continue
        reader = sole_batchnorm_reader(found[0], modules, affine=True)
        user = _sole_user(found[0] if reader is None else reader)
        if user is not None and _is_relu(user, modules):
            out[name] = ReluGate(None if reader is None else reader.target)
            continue
        partner = partners.get(name)
        after = None if partner is None else _sole_user(nodes[partner.sum])
        if after is not None and _is_relu(after, modules):
            out[name] = ReluGate(partner.batchnorm, partner.node, partner.sum)
    return out


def applies(config, weight: torch.Tensor) -> bool:
    """Whether a layer with this weight can take per-row Hessians under `config` (a resolved PruneConfig), before
    its inputs are seen: method sparsegpt with the exact solver (a per-row greedy) and no re-solve or cg, and the
    per-row sums within GATE_BYTES (the cost per image is checked at the first batch: LayerPruner.gate_affordable)."""
    rows, d = weight.shape[0], weight[0].numel()
    return (config.inactive_weight < 1 and config.method == "sparsegpt" and config.refine in ("none", "cg")
            and choose_solver(config.solver, rows, d, bool(config.wbits)) == "exact" and rows * d * d * 8 <= GATE_BYTES)


@torch.no_grad()
def dense_active(layer: nn.Module, batchnorm: nn.Module | None, x: torch.Tensor, skip: torch.Tensor | None
                 ) -> torch.Tensor:
    """Where the dense network's ReLU after `layer` passes (a bool tensor shaped as the layer's output): z > 0 for
    z = BN(layer(x)) [+ skip], the dense copy's modules on the dense inputs."""
    z = layer(x.to(layer.weight.dtype))
    if batchnorm is not None:
        z = batchnorm(z)
    if skip is not None:
        z = z + skip
    return z > 0


def output_columns(y: torch.Tensor, rows: int, linear: bool) -> torch.Tensor:
    """A layer's output (N, C, H, W) or (..., C) as (C, T), columns in the order of LayerPruner.columns."""
    if linear:
        return y.reshape(-1, rows).t()
    return y.transpose(0, 1).reshape(rows, -1)


class ActiveSums:
    """The per-row sums over a layer's active output positions (float64): ΣXXᵀ (rows, d, d), the dense target's
    Σ Δy xᵀ (rows, d), and for the intercept Σx, Σx_d, Σδ and the count per row."""

    def __init__(self, rows: int, d: int, alpha: float, device, dense_target: bool, track_mean: bool,
                 shifted: bool):
        f64 = dict(device=device, dtype=torch.float64)
        self.alpha = alpha
        self.SA = torch.zeros(rows, d, d, **f64)
        self.RA = torch.zeros(rows, d, **f64) if dense_target else None
        self.count = torch.zeros(rows, **f64)
        self.colsum = torch.zeros(rows, d, **f64) if track_mean else None
        self.colsum_d = torch.zeros(rows, d, **f64) if track_mean and dense_target else None
        self.shift_sum = torch.zeros(rows, **f64) if track_mean and shifted else None

    def tensors(self) -> dict[str, torch.Tensor]:
        """Every sum (torchrun adds them over ranks)."""
        names = ("SA", "RA", "count", "colsum", "colsum_d", "shift_sum")
        return {n: getattr(self, n) for n in names if getattr(self, n) is not None}

    def add(self, X: torch.Tensor, active: torch.Tensor, W: torch.Tensor, Xd: torch.Tensor | None,
            shift: torch.Tensor | None) -> None:
        """One chunk: columns X (d, T) of the pruned inputs, `active` (rows, T) bool, W (rows, d) the layer's weights
        in the columns' order, Xd the dense inputs' columns (dense target), shift the target's δ (rows, T). Each row's
        ΣXXᵀ over its active columns is a GEMM over those columns, or over its inactive ones taken from the whole
        chunk's product, whichever are fewer (the gathered columns: half the flops of a masked product or less)."""
        rows, d = W.shape
        a, counts = active.to(X.dtype), active.sum(1)
        full = None
        for r in range(rows):  # each row's active columns, or all less its inactive ones: half the columns at most
            inactive = 2 * int(counts[r]) > X.shape[1]
            if inactive and full is None:
                full = X @ X.t()
            Xr = X[:, (~active[r] if inactive else active[r]).nonzero().squeeze(1)]
            part = Xr @ Xr.t()
            self.SA[r] += (full - part if inactive else part).double()
        self.count += counts.double()
        if self.RA is not None and (Xd is not None or shift is not None):
            dy = W @ (Xd - X) if Xd is not None else torch.zeros_like(a)
            if shift is not None:
                dy = dy + shift
            self.RA += ((a * dy) @ X.t()).double()
        if self.colsum is not None:
            self.colsum += (a @ X.t()).double()
        if self.colsum_d is not None:
            self.colsum_d += (a @ (X if Xd is None else Xd).t()).double()
        if self.shift_sum is not None and shift is not None:
            self.shift_sum += (a * shift).sum(1).double()

    def hessian(self, H: torch.Tensor, n: int) -> torch.Tensor:
        """Per-row H_r (1, rows, d, d) float32 from the layer's H (1, d, d) = 2ΣXXᵀ/n."""
        return (self.alpha * H[0].double() + (1 - self.alpha) * 2 * self.SA / n).float()[None]

    def rhs(self, R: torch.Tensor | None, n: int) -> torch.Tensor | None:
        """Per-row R_r (1, rows, d) from the layer's R (1, rows, d)."""
        if R is None:
            return None
        return (self.alpha * R[0].double() + (1 - self.alpha) * 2 * self.RA / n).float()[None]

    def weights(self, n: int) -> torch.Tensor:
        """Σ_t g_rt per row (rows,): the weighted column count."""
        return self.alpha * n + (1 - self.alpha) * self.count

    def mean(self, colsum: torch.Tensor, active_sum: torch.Tensor, n: int) -> torch.Tensor:
        """Weighted mean per row: (α·Σ over all + (1 − α)·Σ over active) / Σ g, for a plain sum `colsum` (1, d) or
        (rows,) and its active counterpart."""
        w = self.weights(n)
        total = self.alpha * colsum + (1 - self.alpha) * active_sum
        return total / (w[:, None] if total.dim() == 2 else w)
