"""Making a network physically smaller: which rows, columns and entries a channel removal takes from each
module, slicing them out in place, and rebuilding the new shapes on a fresh model (run folders)."""
from __future__ import annotations

import torch
from torch import nn

from ..utils import UserError
from .channels import Group


def _slice_(module: nn.Module, name: str, dim: int, keep: torch.Tensor) -> None:
    p = getattr(module, name, None)
    if isinstance(p, torch.Tensor):
        new = p.data.index_select(dim, keep.to(p.device)).clone()
        if isinstance(p, nn.Parameter):
            setattr(module, name, nn.Parameter(new, requires_grad=p.requires_grad))
        else:
            module.register_buffer(name, new)


def _entries(module: nn.Module) -> int:
    """How many channels a per-channel module holds (a BatchNorm, a depthwise conv, a PReLU, or a transposed conv's
    view, whose only per-channel tensor is the bias it adds after its pixel shuffle)."""
    return next((t.shape[0] for t in (getattr(module, a, None) for a in ("weight", "bias", "running_mean"))
                 if isinstance(t, torch.Tensor)),  # (an InstanceNorm or a GroupNorm without any)
                getattr(module, "num_features", getattr(module, "num_channels", 0)))


def _per_channel_tensor(model: nn.Module, name: str) -> tuple[nn.Module, str, int]:
    """A tensor attribute the channel walk found scaling or shifting each channel (a layer scale `gamma` of shape
    (C, 1, 1)): its module, its attribute name and its channel axis (its one axis of more than one value)."""
    owner, _, attr = name.rpartition(".")
    module = model.get_submodule(owner) if owner else model
    t = getattr(module, attr)
    return module, attr, next(d for d, n in enumerate(t.shape) if n == t.numel())


def spec_entry(model: nn.Module, name: str) -> dict:
    """spec_of a module, or a per-channel tensor attribute's shape (`name` is a module's or an attribute's)."""
    owner, _, attr = name.rpartition(".")
    m = getattr(model.get_submodule(owner) if owner else model, attr)
    return spec_of(m) if isinstance(m, nn.Module) else {"shape": list(m.shape)}


def spec_of(module: nn.Module) -> dict:
    """The attributes that decide a module's parameter shapes."""
    if isinstance(module, nn.modules.conv._ConvNd):  # Conv2d; Conv1d and transposed convs (conv_views.py)
        return {"in": module.in_channels, "out": module.out_channels, "groups": module.groups}
    if isinstance(module, nn.Linear):
        return {"in": module.in_features, "out": module.out_features}
    if isinstance(module, nn.modules.batchnorm._NormBase):  # BatchNorm, InstanceNorm
        return {"features": module.num_features}
    if isinstance(module, nn.PReLU):
        return {"parameters": module.num_parameters}
    if isinstance(module, nn.GroupNorm):
        return {"channels": module.num_channels, "groups": module.num_groups}
    return {}


def apply_structure(model: nn.Module, spec: dict) -> nn.Module:
    """Give a freshly built model the shapes a structured prune left (report's `structure.spec`), so that the run's
    model.pt loads into it. The values are placeholders until the state dict is loaded."""
    if not isinstance(spec, dict):
        raise UserError(f"spec must be the dict of a channel prune's report.structure['spec'], got "
                        f"{type(spec).__name__} (a run of unstructured or N:M pruning has none: its shapes are the "
                        "model's own)")
    modules = dict(model.named_modules())
    for name, s in spec.items():
        m = modules.get(name)
        owner, _, attr = name.rpartition(".")
        if m is None and "shape" in s and isinstance(getattr(modules.get(owner), attr, None), torch.Tensor):
            t = getattr(modules[owner], attr)  # a per-channel tensor attribute (a layer scale)
            new = torch.empty(s["shape"], dtype=t.dtype)
            if isinstance(t, nn.Parameter):
                setattr(modules[owner], attr, nn.Parameter(new, requires_grad=t.requires_grad))
            else:
                modules[owner].register_buffer(attr, new)
            continue
        if m is None:
            raise UserError(f"the run's structure names a module '{name}' the model does not have")
        if isinstance(m, nn.modules.conv._ConvNd):
            m.in_channels, m.out_channels, m.groups = s["in"], s["out"], s["groups"]
            rows, cols = (s["in"], s["out"]) if m.transposed else (s["out"], s["in"])
            m.weight = nn.Parameter(torch.empty(rows, cols // s["groups"], *m.kernel_size))
            if m.bias is not None:
                m.bias = nn.Parameter(torch.empty(s["out"]))
        elif isinstance(m, nn.Linear):
            m.in_features, m.out_features = s["in"], s["out"]
            m.weight = nn.Parameter(torch.empty(s["out"], s["in"]))
            if m.bias is not None:
                m.bias = nn.Parameter(torch.empty(s["out"]))
        elif isinstance(m, nn.modules.batchnorm._NormBase):
            m.num_features = n = s["features"]
            for p in ("weight", "bias"):
                if getattr(m, p) is not None:
                    setattr(m, p, nn.Parameter(torch.empty(n)))
            for b in ("running_mean", "running_var"):
                if getattr(m, b) is not None:
                    m.register_buffer(b, torch.empty(n))
        elif isinstance(m, nn.GroupNorm):
            m.num_channels, m.num_groups = s["channels"], s["groups"]
            for p in ("weight", "bias"):
                if getattr(m, p) is not None:
                    setattr(m, p, nn.Parameter(torch.empty(s["channels"])))
        elif isinstance(m, nn.PReLU):
            m.num_parameters = s["parameters"]
            m.weight = nn.Parameter(torch.empty(s["parameters"]))
    return model


def removal_plan(groups: list[Group], gone: dict[int, set]) -> tuple[dict, dict, dict]:
    """For the units `gone` ({group index: unit indices}): the input columns each consumer loses, the output rows
    each producer loses, and the entries each per-channel module (BatchNorm, depthwise conv) loses."""
    drop_cols: dict[str, list[int]] = {}
    drop_rows: dict[str, list[int]] = {}
    drop_entries: dict[str, list[int]] = {}
    for g, units in gone.items():
        for i in units:
            u = groups[g].units[i]
            for c, cols in u.columns.items():
                drop_cols.setdefault(c, []).extend(cols)
            for p, ch in u.rows.items():
                drop_rows.setdefault(p, []).extend(ch)
            for e, ix in u.entries.items():
                drop_entries.setdefault(e, []).extend(ix)
    return drop_cols, drop_rows, drop_entries


def kept_indices(n: int, dropped) -> torch.Tensor:
    """The indices of range(n) not in `dropped`, sorted."""
    return torch.tensor(sorted(set(range(n)) - set(dropped)), dtype=torch.long)


def slice_channels_(model: nn.Module, drop_cols: dict, drop_rows: dict, drop_entries: dict) -> None:
    """Make the modules physically smaller, in place: consumers lose input columns, producers output rows (and
    biases), BatchNorms, depthwise convs and PReLUs their entries; the shape attributes follow."""
    modules = dict(model.named_modules())
    for drops, dim, attrs in ((drop_cols, 1, ("in_channels", "in_features")),
                              (drop_rows, 0, ("out_channels", "out_features"))):
        for name, ix in drops.items():
            m = modules[name]
            keep = kept_indices(m.weight.shape[dim], ix)
            _slice_(m, "weight", dim, keep)
            if dim == 0:
                _slice_(m, "bias", 0, keep)
            if isinstance(m, nn.Conv2d):  # a grouped conv's weight holds one group's inputs
                setattr(m, attrs[0], len(keep) * (m.groups if dim == 1 else 1))
            else:
                setattr(m, attrs[1], len(keep))
    for name, ix in drop_entries.items():
        if name not in modules:  # a per-channel tensor attribute
            m, attr, axis = _per_channel_tensor(model, name)
            _slice_(m, attr, axis, kept_indices(getattr(m, attr).shape[axis], ix))
            continue
        m = modules[name]
        keep = kept_indices(_entries(m), ix)
        for attr in ("weight", "bias", "running_mean", "running_var"):
            _slice_(m, attr, 0, keep)
        if isinstance(m, nn.Conv2d):  # depthwise: an input channel goes with its `multiplier` outputs
            multiplier = m.out_channels // m.groups
            m.out_channels, m.in_channels = len(keep), len(keep) // multiplier
            m.groups = m.in_channels
        elif isinstance(m, nn.modules.batchnorm._NormBase):
            m.num_features = len(keep)
        elif isinstance(m, nn.GroupNorm):  # whole groups go (the walk ties each group's channels)
            m.num_groups = len(keep) // (m.num_channels // m.num_groups)
            m.num_channels = len(keep)
        elif isinstance(m, nn.PReLU):
            m.num_parameters = len(keep)


def _reorder_(module: nn.Module, dim: int, index: torch.Tensor, attrs: tuple) -> None:
    for attr in attrs:
        p = getattr(module, attr, None)
        if isinstance(p, torch.Tensor) and p.dim() > dim:
            p.data.copy_(p.data.index_select(dim, index.to(p.device)))


def permute_channels_(model: nn.Module, group: Group, order: list[int]) -> None:
    """Reorder a group's channels in place (the network computes the same function): the unit that was at position
    order[j] goes to position j in every producer's rows, every per-channel module's entries and every consumer's
    columns."""
    modules = dict(model.named_modules())
    units = group.units
    moved = [(units[j], units[i]) for j, i in enumerate(order)]  # (destination, source)

    def index(size: int, of) -> torch.Tensor:
        ix = torch.arange(size)
        for dst, src in moved:
            ix[torch.as_tensor(of(dst))] = torch.as_tensor(of(src))
        return ix

    for p in group.producers:
        m = modules[p]
        _reorder_(m, 0, index(m.weight.shape[0], lambda u: u.rows[p]), ("weight", "bias"))
    for e in units[0].entries:
        if e not in modules:  # a per-channel tensor attribute
            m, attr, axis = _per_channel_tensor(model, e)
            _reorder_(m, axis, index(getattr(m, attr).shape[axis], lambda u: u.entries[e]), (attr,))
            continue
        m = modules[e]
        _reorder_(m, 0, index(_entries(m), lambda u: u.entries[e]), ("weight", "bias", "running_mean", "running_var"))
    for c in units[0].columns:
        m = modules[c]
        _reorder_(m, 1, index(m.weight.shape[1], lambda u: u.columns[c]), ("weight",))
