"""BatchNorm folding: a deployed network runs each conv with the BatchNorm after it folded in.

A model library's own layers are folded where they compute what the fold assumes, checked on random inputs: a conv
subclass that pads its input itself (timm's Conv2dSame) scales with its weight like a conv, one that standardizes its
weight (ScaledStdConv2d) does not and keeps its BatchNorm; a BatchNorm subclass that applies more after normalizing
(timm's BatchNormAct2d: dropout, activation) keeps that part as a module of its own.
"""
from __future__ import annotations

import copy

import torch
from torch import fx, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.utils.fusion import fuse_conv_bn_eval, fuse_linear_bn_eval

from ..utils import UserError

# the layers a BatchNorm folds into (subclasses too: checked), and whose calls stay module calls in the traced graph:
# torch.fx traces into any class defined outside torch.nn, which would leave timm's layers as functional calls.
FOLDS_INTO = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d, nn.Linear)


class _Tracer(fx.Tracer):
    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, (*FOLDS_INTO, _BatchNorm)) or super().is_leaf_module(m, qualname)


def _probe(layer: nn.Module) -> torch.Tensor:
    """A random input `layer` accepts: two samples, spatial sizes twice its kernel's reach plus its stride."""
    w = layer.weight
    if isinstance(layer, nn.Linear):
        return torch.randn(2, layer.in_features, dtype=w.dtype, device=w.device)
    sizes = [2 * ((k - 1) * d + 1) + s for k, d, s in zip(layer.kernel_size, layer.dilation, layer.stride)]
    return torch.randn(2, layer.in_channels, *sizes, dtype=w.dtype, device=w.device)


def _close(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and torch.allclose(a, b, rtol=1e-4, atol=1e-5 * max(float(b.abs().max()), 1.0))


def _normalize(bn: _BatchNorm, y: torch.Tensor) -> torch.Tensor:
    """What a plain BatchNorm in eval mode makes of y (the part of `bn` a fold takes over)."""
    return nn.functional.batch_norm(y, bn.running_mean, bn.running_var, bn.weight, bn.bias, False, 0.0, bn.eps)


def _rest(bn: _BatchNorm) -> nn.Module | None | bool:
    """What stays of `bn` once the normalization is folded: None (a plain BatchNorm: nothing), a module (timm's
    BatchNormAct2d: its dropout and activation, checked), or False (a subclass whose forward is not known)."""
    if type(bn).forward is _BatchNorm.forward:
        return None
    drop, act = getattr(bn, "drop", None), getattr(bn, "act", None)
    if not isinstance(drop, nn.Module) or not isinstance(act, nn.Module):
        return False
    rest = nn.Sequential(drop, act) if not isinstance(drop, nn.Identity) else act
    y = torch.randn(2, bn.num_features, 3, 3, dtype=bn.running_mean.dtype, device=bn.running_mean.device)
    try:
        return rest if _close(rest(_normalize(bn, y)), bn(y)) else False
    except Exception:  # (its forward wants another input shape: leave it)
        return False


def _folded(layer: nn.Module, bn: _BatchNorm) -> nn.Module | None:
    """A copy of `layer` with `bn`'s normalization folded in, or None where the layer's output does not scale
    with its weight and shift with its bias per output channel (checked for subclasses)."""
    if isinstance(layer, nn.Linear):
        if bn.num_features != layer.out_features:
            return None
        folded = fuse_linear_bn_eval(layer, bn)
    elif isinstance(layer, nn.modules.conv._ConvTransposeNd):
        if layer.groups != 1:  # (torch's fold scales the weight's dim 1, a group's share of the outputs)
            return None
        folded = fuse_conv_bn_eval(layer, bn, transpose=True)
    else:
        folded = fuse_conv_bn_eval(layer, bn)
    if type(layer) in FOLDS_INTO:
        return folded
    x = _probe(layer)
    try:
        return folded if _close(folded(x), _normalize(bn, layer(x))) else None
    except Exception:
        return None


@torch.no_grad()
def fold_batchnorm(model: nn.Module, library_layers: bool = True) -> nn.Module:
    """A copy of `model` (eval mode, a traced graph) with every BatchNorm that alone reads a conv's or Linear's
    output folded into it, where both are called once; the others stay as they are. library_layers=False folds
    torch's own classes only (what this project's export did before it took timm's: for files written then)."""
    tracer = _Tracer()
    model = copy.deepcopy(model).eval()
    try:
        graph = tracer.trace(model)
        gm = fx.GraphModule(tracer.root, graph, type(model).__name__)
    except Exception as e:
        raise UserError(f"cannot fold BatchNorm: torch.fx cannot trace {type(model).__name__} ({e})") from e
    modules = dict(gm.named_modules())
    calls: dict[str, int] = {}
    for node in gm.graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1
    for node in list(gm.graph.nodes):
        bn = modules.get(node.target) if node.op == "call_module" else None
        if not isinstance(bn, _BatchNorm) or bn.running_mean is None or len(node.args) != 1 or node.kwargs:
            continue
        src = node.args[0]
        layer = modules.get(src.target) if isinstance(src, fx.Node) and src.op == "call_module" else None
        if not isinstance(layer, FOLDS_INTO) or len(src.users) != 1 or calls[src.target] != 1 \
                or calls[node.target] != 1:
            continue
        if not library_layers and (type(layer) not in FOLDS_INTO or type(bn).forward is not _BatchNorm.forward):
            continue
        rest = _rest(bn)
        folded = None if rest is False else _folded(layer, bn)
        if folded is None:
            continue
        _set(gm, src.target, folded)
        if rest is None:
            node.replace_all_uses_with(src)
            gm.graph.erase_node(node)
            _set(gm, node.target, None)
        else:
            _set(gm, node.target, rest)
    gm.graph.lint()
    gm.recompile()
    return gm


def _set(gm: fx.GraphModule, target: str, module: nn.Module | None) -> None:
    parent, _, name = target.rpartition(".")
    owner = gm.get_submodule(parent) if parent else gm
    if module is None:
        delattr(owner, name)
    else:
        setattr(owner, name, module)


@torch.no_grad()
def fold_factors(model: nn.Module, weights: list[str]) -> dict[str, torch.Tensor]:
    """For each weight name, the per-output-channel factor folding multiplies it by (1 where no BatchNorm
    follows): folding a copy whose weights are all ones gives exactly the factors the fold applies."""
    probe = {name: torch.ones_like(model.get_parameter(name)) for name in weights}
    state = model.state_dict() | probe
    probe_model = copy.deepcopy(model)
    probe_model.load_state_dict(state)
    folded = fold_batchnorm(probe_model).state_dict()
    factors = {}
    for name in weights:
        w = folded[name]
        if isinstance(model.get_submodule(name.rpartition(".")[0]), nn.modules.conv._ConvTransposeNd):
            if not bool((w == 1).all()):  # its grid's rows are the view's, not the output channels the fold scales
                raise UserError(f"{name}: a quantized transposed conv with a BatchNorm folded into it is not "
                                "supported")
            factors[name] = torch.ones(1, dtype=w.dtype)  # (whatever its grid's rows)
            continue
        factors[name] = w.reshape(w.shape[0], -1)[:, 0].clone()
    return factors
