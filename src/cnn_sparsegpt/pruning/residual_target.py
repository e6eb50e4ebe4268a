"""The last layer into a residual sum also corrects the other branch's error (`--residual-target`).

The dense target (dense_target.py) fits a layer's output to the dense network's, W·X_d, from the pruned network's
inputs. In a residual block the layer's output (through its BatchNorm) is then added to a skip branch, y = BN(W·x)
+ s, and the error of s (the block input: every earlier block's error, carried by the identity) is corrected by
nothing. Where s is already computed when the layer is pruned, the layer can fit the sum instead:

    min ‖W·X_d + δ − Ŵ·X_p‖²,  δ = (s_d − s_p)·σ/γ per output channel,

σ/γ the dense BatchNorm's inverse scale (so that δ is in the layer's output units; the layer has no BatchNorm:
1). The solve is the dense target's with R = 2·(W·(X_d − X_p) + δ)·X_pᵀ/N (layer.py), so every solver and re-fit
takes it unchanged. Which branch corrects which follows graph order: the layer computed last fits the sum (in a
projection block the shortcut's conv fits the sum with the residual branch, computed before it).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import fx, nn

from .graph import is_add, module_calls, sole_batchnorm_reader


@dataclass(frozen=True)
class SkipPartner:
    """What a layer's output is summed with: the other operand's graph node, and the BatchNorm between the layer
    and the sum (None: the layer's output is summed as it is)."""
    node: str  # fx node name of the other operand (the same name in the dense copy's trace)
    batchnorm: str | None  # module name
    sum: str  # fx node name of the sum (its operands stay at hand until it: GraphExecutor's keep_until)


def skip_partners(traced: fx.GraphModule, names: list[str]) -> dict[str, SkipPartner]:
    """Per layer of `names` whose output, alone or through a BatchNorm (with running statistics) that only it feeds,
    is one operand of a sum whose other operand comes earlier in graph order (computed when the layer is pruned):
    that operand."""
    modules = dict(traced.named_modules())
    index = {n: i for i, n in enumerate(traced.graph.nodes)}
    out = {}
    for name, found in module_calls(traced, names).items():
        if len(found) != 1:  # a module called twice has no one partner
            continue
        node = found[0]
        reader = sole_batchnorm_reader(node, modules, affine=True)
        bn, node = (None, node) if reader is None else (reader.target, reader)
        users = list(node.users)
        if len(users) != 1 or not is_add(users[0]) or users[0].kwargs or len(users[0].args) != 2 \
                or not all(isinstance(a, fx.Node) for a in users[0].args):
            continue
        a, b = users[0].args
        other = b if a is node else a
        if other is node or index[other] > index[found[0]]:
            continue
        out[name] = SkipPartner(other.name, bn, users[0].name)
    return out


def inverse_scale(bn: nn.Module | None, channels: int, device) -> torch.Tensor:
    """σ/γ per channel of a BatchNorm in eval mode (its output's change per unit of its input's, inverted); 0 where
    γ is 0 (the layer cannot move that channel of the sum); ones without a BatchNorm."""
    if bn is None:
        return torch.ones(channels, device=device)
    gamma = bn.weight.detach().float() if bn.weight is not None else torch.ones(channels, device=device)
    sigma = (bn.running_var.float() + bn.eps).sqrt()
    return torch.where(gamma.abs() > 0, sigma / gamma.where(gamma.abs() > 0, torch.ones_like(gamma)), 0.0)


def target_shift(dense: torch.Tensor, pruned: torch.Tensor, scale: torch.Tensor, linear: bool) -> torch.Tensor:
    """δ = (s_d − s_p)·σ/γ; channels along dim 1 (a conv's (N, C, ...)) or last (a Linear's (..., C))."""
    diff = dense.float() - pruned.float()
    shape = [1] * diff.dim()
    shape[-1 if linear else 1] = -1
    return diff * scale.reshape(shape)
