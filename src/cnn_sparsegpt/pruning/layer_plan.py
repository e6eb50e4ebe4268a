"""Which layers a prune visits: the Conv2d/Linear layers in forward order, with their sizes, and the
reason each one stays dense ('' = prune it)."""
from __future__ import annotations

import re
import warnings
from collections.abc import Iterable

import torch
from torch import nn

from .conv_views import VIEWABLE, why_not
from .graph import PRUNABLE, run_hooked, weight_positions


def forward_order(model: nn.Module, example: torch.Tensor, input_bytes: dict | None = None,
                  positions: dict | None = None, kinds: tuple = PRUNABLE) -> list[str]:
    """Names of the Conv2d/Linear layers (or other `kinds`) in the order the forward pass calls them. When given,
    `input_bytes` gets each one's input size in bytes for `example`, and `positions` the number of
    positions per example its weight is applied at, over all its calls (graph.weight_positions)."""
    names = {m: n for n, m in model.named_modules() if isinstance(m, kinds)}
    order: list[str] = []

    def hook(mod, inp, out):  # Conv2d/Linear are leaves: they finish in the order they are called
        name = names[mod]
        if positions is not None:  # every call's (a layer called again, shared weights, works again)
            positions[name] = positions.get(name, 0) + weight_positions(mod, inp[0], out, len(example))
        if name not in order:
            order.append(name)
            if input_bytes is not None:
                input_bytes[name] = inp[0].numel() * inp[0].element_size()

    run_hooked(model, [example], [m.register_forward_hook(hook) for m in names])
    return order


IGNORED = "in the ignore list"


def first_matches(layers: dict[str, str], patterns: Iterable[str], what: str) -> dict[str, str]:
    """Per layer (its name → the name the patterns see: a view conv's original's, conv_views.py) the first of
    `patterns` (layer names or regexes over the whole name) that matches it. A pattern that matches no layer is a
    warning naming `what` (the option): a typo would otherwise change nothing, silently."""
    compiled = [(p, re.compile(p)) for p in dict.fromkeys(patterns)]
    out = {}
    for name, shown in layers.items():
        hit = next((p for p, c in compiled if c.fullmatch(shown) or p == shown), None)
        if hit is not None:
            out[name] = hit
    unused = [p for p, _ in compiled if p not in out.values()]
    if unused:
        example = next(iter(layers.values()), "")
        warnings.warn(f"{what}: {', '.join(repr(p) for p in unused)} match{'es' * (len(unused) == 1)} no Conv or "
                      f"Linear layer (give a layer's full name, e.g. '{example}', or a regex over the whole name; "
                      "--dry-run lists them)", RuntimeWarning)
    return out


def layer_names(model: nn.Module, aliases: dict[str, str] | None = None) -> dict[str, str]:
    """Every prunable layer's name → the name the user's patterns see (aliases: a view conv's original's)."""
    aliases = aliases or {}
    return {n: aliases.get(n, n) for n, m in model.named_modules() if isinstance(m, PRUNABLE)}


def ignored_layers(model: nn.Module, ignore: Iterable[str], aliases: dict[str, str] | None = None) -> dict[str, str]:
    """The layers the ignore list keeps as they are, each with the reason (IGNORED)."""
    return {n: IGNORED for n in first_matches(layer_names(model, aliases), ignore, "ignore")}


def patterned_layers(model: nn.Module, plan: dict[str, str], layer_patterns: Iterable[str],
                     aliases: dict[str, str] | None = None) -> dict[str, str]:
    """Per layer the plan prunes that an entry of layer_patterns (PruneConfig) names: that entry's key, the first
    that matches. Layers it names that stay dense anyway (the ignore list, first conv, last linear) are a warning."""
    found = first_matches(layer_names(model, aliases), layer_patterns, "layer_patterns")
    dense = [n for n in found if plan.get(n)]
    if dense:
        one = len(dense) == 1
        warnings.warn(f"layer_patterns: {', '.join(dense[:3])}{', ...' * (len(dense) > 3)} stay{'s' * one} dense ("
                      f"{plan[dense[0]]}): {'its pattern is' if one else 'their patterns are'} not used",
                      RuntimeWarning)
    return {n: key for n, key in found.items() if n in plan and not plan[n]}


def choose_layers(model: nn.Module, order: list[str], ignore: Iterable[str] = (),
                  skip_first_last: bool = True, kept: dict[str, str] | None = None,
                  aliases: dict[str, str] | None = None) -> dict[str, str]:
    """Layer name → reason it stays dense ('' = prune it), for every Conv2d/Linear in forward order. kept: layers
    that stay as they are whatever the options, with why (graph.nonstandard_layers). aliases: the name the ignore
    patterns see instead of a layer's own (a view conv's: its original layer's, conv_views.py)."""
    ignored = ignored_layers(model, ignore, aliases)
    modules = dict(model.named_modules())
    convs = [n for n in order if isinstance(modules[n], nn.Conv2d)]
    linears = [n for n in order if isinstance(modules[n], nn.Linear)]
    plan = {}
    for name in order:
        reason = ""
        if kept and name in kept:
            reason = kept[name]
        elif name in ignored:
            reason = IGNORED
        elif skip_first_last and convs and name == convs[0]:
            reason = "first conv (kept dense by convention; --prune-all includes it)"
        elif skip_first_last and linears and name == linears[-1]:
            reason = "last linear (kept dense by convention; --prune-all includes it)"
        plan[name] = reason
    unused = [n for n, m in model.named_modules() if isinstance(m, PRUNABLE) and n not in plan]
    for name in unused:
        plan[name] = "not called in the forward pass"
    return plan


def refit_layers(plan: dict[str, str], order: list[str]) -> list[str]:
    """The layers kept dense that refit_dense_layers re-fits: those called after the first pruned layer (before it
    the pruned network's inputs are the dense network's, so the fit would give back the same weights)."""
    first = next((i for i, n in enumerate(order) if not plan[n]), len(order))
    return [n for n in order[first + 1:] if plan[n]]


def unsupported_layers(model: nn.Module) -> dict[str, str]:
    """Layers with weights that this pruner leaves as they are, with why: listed in the report so that a user sees
    them (a conv that conv_views cannot stand in for), not silently absent."""
    return {n: reason for n, m in model.named_modules() if isinstance(m, VIEWABLE) and (reason := why_not(m))}
