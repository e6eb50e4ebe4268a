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

from ..utils import UserError, output_tensors

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
def fold_batchnorm(model: nn.Module, library_layers: bool = True, example: torch.Tensor | None = None) -> nn.Module:
    """A copy of `model` (eval mode, a traced graph) with every BatchNorm that alone reads a conv's or Linear's
    output folded into it, where both are called once; the others stay as they are. library_layers=False folds
    torch's own classes only (what this project's export did before it took timm's: for files written then).
    A model torch.fx cannot trace (an Ultralytics YOLO) is folded without a graph where `example`, an input it
    takes, is given (_fold_by_hooks)."""
    tracer = _Tracer()
    model = copy.deepcopy(model).eval()
    try:
        graph = tracer.trace(model)
        gm = fx.GraphModule(tracer.root, graph, type(model).__name__)
    except Exception as e:
        if example is not None:
            return _fold_by_hooks(model, example, library_layers)
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


class _Uses(torch.overrides.TorchFunctionMode):
    """Counts, for each tensor in `watched` (id → (name, the tensor), held there so that no other tensor takes its
    id), the torch calls that read it and compute a tensor (metadata such as .shape is not a use): what a graph's
    users are, seen while the model runs."""

    def __init__(self, watched: dict):
        super().__init__()
        self.watched, self.count = watched, {}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if output_tensors(out):  # (a torch.cat's tensors come in a list: output_tensors flattens it)
            for a in {id(a): a for a in output_tensors([args, kwargs or {}])}.values():
                if self.watched.get(id(a), (None, None))[1] is a:
                    self.count[id(a)] = self.count.get(id(a), 0) + 1
        return out


def _fold_by_hooks(model: nn.Module, example: torch.Tensor, library_layers: bool) -> nn.Module:
    """fold_batchnorm without a graph, on `model` (a copy, in place), from one forward pass over `example`: a
    BatchNorm folds into the layer whose returned tensor is its input where that tensor is read by nothing else (no
    skip connection, no concatenation: every torch call that reads it is counted) and both are called once. A
    folded BatchNorm becomes nn.Identity (or what stays of it), so names and state_dict keys are the traced fold's."""
    names = {m: n for n, m in model.named_modules()}
    returned: dict[int, tuple[str, torch.Tensor]] = {}
    calls: dict[str, int] = {}
    pairs: list[tuple[str, str, int]] = []
    uses = _Uses(returned)

    def after_layer(m, inp, out):
        calls[names[m]] = calls.get(names[m], 0) + 1
        returned[id(out)] = (names[m], out)  # (held: its id is not reused during the pass)

    def before_bn(m, args):
        calls[names[m]] = calls.get(names[m], 0) + 1
        src = returned.get(id(args[0])) if len(args) == 1 else None
        if src is not None and src[1] is args[0]:
            pairs.append((src[0], names[m], id(args[0])))

    hooks = [m.register_forward_hook(after_layer) for m in names if isinstance(m, FOLDS_INTO)]
    hooks += [m.register_forward_pre_hook(before_bn) for m in names
              if isinstance(m, _BatchNorm) and m.running_mean is not None]
    try:
        with uses:
            model(example)
    finally:
        for h in hooks:
            h.remove()
    for layer_name, bn_name, tensor in pairs:
        if calls[layer_name] != 1 or calls[bn_name] != 1 or uses.count.get(tensor) != 1:
            continue  # called twice, or its output read by something else too (a skip connection)
        layer, bn = model.get_submodule(layer_name), model.get_submodule(bn_name)
        if not library_layers and (type(layer) not in FOLDS_INTO or type(bn).forward is not _BatchNorm.forward):
            continue
        rest = _rest(bn)
        folded = None if rest is False else _folded(layer, bn)
        if folded is not None:
            _set(model, layer_name, folded)
            _set(model, bn_name, rest or nn.Identity())
    returned.clear()
    return model


@torch.no_grad()
def folded_like(model: nn.Module, state: dict) -> nn.Module:
    """A copy of `model` shaped as the folded state dict `state` says, without a graph or an input: each BatchNorm
    whose statistics `state` lacks becomes nn.Identity (or what stays of it), and each layer that gained a bias in
    the fold (a bias-free conv before a BatchNorm) gets one; the values are state's to load."""
    model = copy.deepcopy(model).eval()
    for name, m in list(model.named_modules()):
        if isinstance(m, _BatchNorm) and m.running_mean is not None and f"{name}.running_mean" not in state:
            rest = _rest(m)
            if rest is not False:
                _set(model, name, rest or nn.Identity())
        elif isinstance(m, FOLDS_INTO) and m.bias is None and f"{name}.bias" in state:
            m.bias = nn.Parameter(torch.zeros_like(state[f"{name}.bias"]))
    return model


def _set(gm: nn.Module, target: str, module: nn.Module | None) -> None:
    parent, _, name = target.rpartition(".")
    owner = gm.get_submodule(parent) if parent else gm
    if module is None:
        delattr(owner, name)
    else:
        setattr(owner, name, module)


@torch.no_grad()
def fold_factors(model: nn.Module, weights: list[str], example: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """For each weight name, the per-output-channel factor folding multiplies it by (1 where no BatchNorm
    follows): folding a copy whose weights are all ones gives exactly the factors the fold applies. example: as
    fold_batchnorm's."""
    if not weights:
        return {}
    probe = {name: torch.ones_like(model.get_parameter(name)) for name in weights}
    state = model.state_dict() | probe
    probe_model = copy.deepcopy(model)
    probe_model.load_state_dict(state)
    folded = fold_batchnorm(probe_model, example=example).state_dict()
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
