"""Per-layer latency tables (SPDY-style): each conv (of any kind) or Linear of a network timed alone on a runtime at a
few widths, so that an allocation can price a channel count in seconds instead of multiply-adds.

A layer is rebuilt at width fraction f (its input and/or output channels scaled by f, whichever a channel prune can
change; a depthwise conv both) and timed on its own input shape; the table maps the fraction of the layer's dense
multiply-adds to the median seconds per call, and is interpolated linearly between widths (flat below the
narrowest). Timings are cached in a JSON file per machine (utils.cache_root: ~/.cache/cnn_sparsegpt by default), keyed
by the runtime, threads, batch and the layer's exact shape, so a second prune of the same network times nothing.
"""
from __future__ import annotations

import json
import os
import platform
import statistics
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from ..utils import atomic_write_json, cache_root
from .runtimes import runtime as runtime_class, time_calls

FRACTIONS = (0.125, 0.25, 0.375, 0.5, 0.625, 0.75, 0.875, 1.0)  # width fractions timed per layer
WARMUP, RUNS = 3, 15  # per table entry: a median of 15 calls
CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)


@dataclass
class LayerLatency:
    """One layer's seconds per call at fractions of its dense multiply-adds (ascending)."""
    macs_fractions: list[float]
    seconds: list[float]

    def at(self, fraction: float) -> float:
        xs, ys = self.macs_fractions, self.seconds
        if fraction <= xs[0]:
            return ys[0]
        for (x0, y0), (x1, y1) in zip(zip(xs, ys), zip(xs[1:], ys[1:])):
            if fraction <= x1:
                return y0 + (y1 - y0) * (fraction - x0) / (x1 - x0)
        return ys[-1] * fraction / xs[-1]


def cache_file() -> Path:
    return cache_root() / "layer_latency.json"


def _scaled(m: nn.Module, f: float, varying: set) -> tuple[nn.Module, float]:
    """The layer rebuilt at width fraction f along its varying dimensions, and its multiply-adds fraction."""
    def width(n: int, dim: str) -> int:
        return max(1, round(f * n)) if dim in varying else n

    if isinstance(m, nn.Linear):
        i, o = width(m.in_features, "in"), width(m.out_features, "out")
        return nn.Linear(i, o, bias=m.bias is not None), i * o / (m.in_features * m.out_features)
    depthwise = m.groups == m.in_channels and m.groups > 1
    if depthwise:  # an input channel goes with its out/in outputs (the channel multiplier)
        c = width(m.in_channels, "in")
        i, o, g = c, c * (m.out_channels // m.in_channels), c
    elif m.groups == 1:
        i, o, g = width(m.in_channels, "in"), width(m.out_channels, "out"), 1
    else:  # a grouped conv keeps its groups, each narrower (channel pruning takes channel j of every group)
        g = m.groups
        i, o = g * width(m.in_channels // g, "in"), g * width(m.out_channels // g, "out")
    kind = next(k for k in CONVS if isinstance(m, k))  # its torch class (a subclass may be built otherwise)
    extra = {"output_padding": m.output_padding} if m.transposed else {}
    layer = kind(i, o, m.kernel_size, m.stride, m.padding, dilation=m.dilation, groups=g, bias=m.bias is not None,
                 padding_mode=m.padding_mode, **extra)
    return layer, (o * i / g) / (m.out_channels * m.in_channels / m.groups)


def _key(runtime: str, threads, batch: int, layer: nn.Module, shape: tuple) -> str:
    return f"{platform.machine()}|{os.cpu_count()}|{runtime}|t{threads}|b{batch}|{layer!r}|{list(shape[1:])}"


def input_shapes(model: nn.Module, example: torch.Tensor) -> dict[str, tuple]:
    """Each conv's and Linear's input shape (its first call) for `example`."""
    shapes, hooks = {}, []

    def record(name):
        def hook(module, args):  # returns None: the inputs go on unchanged
            shapes.setdefault(name, tuple(args[0].shape))
        return hook

    for name, m in model.named_modules():
        if isinstance(m, CONVS + (nn.Linear,)):
            hooks.append(m.register_forward_pre_hook(record(name)))
    try:
        with torch.no_grad():
            model(example)
    finally:
        for h in hooks:
            h.remove()
    return shapes


@torch.no_grad()
def layer_latency_table(model: nn.Module, example: torch.Tensor, varying: dict[str, set], runtime: str,
                        batch: int, threads: int | None = None, progress: bool = False,
                        fractions=FRACTIONS) -> dict[str, LayerLatency]:
    """Time every layer named in `varying` (name → the dimensions a prune can shrink) at each width fraction on
    `runtime`, for inputs of `batch` images shaped like `example`'s."""
    make = runtime_class(runtime)
    shapes = input_shapes(model, example[:1])
    modules = dict(model.named_modules())
    path = cache_file()
    try:
        cache = json.loads(path.read_text()) if path.is_file() else {}
    except (OSError, json.JSONDecodeError):
        cache = {}
    fresh = 0

    def timed(layer: nn.Module, shape: tuple) -> float:
        nonlocal fresh
        key = _key(runtime, threads, batch, layer, shape)
        if key not in cache:
            x = torch.randn(shape)
            cache[key] = statistics.median(time_calls(make(layer.eval(), x, threads), x, WARMUP, RUNS))
            fresh += 1
        return cache[key]

    # a call's own cost on the runtime (a 1x1 conv of one pixel), taken off every entry: the table prices layers
    # inside one network call, not one call per layer
    overhead = timed(nn.Conv2d(1, 1, 1, bias=False), (batch, 1, 1, 1))
    table = {}
    names = [n for n in varying if n in shapes]
    for name in tqdm(names, desc="latency table", unit="layer", disable=not progress, leave=False):
        points = {}
        for f in fractions:
            layer, macs = _scaled(modules[name], f, varying[name])
            shape = shapes[name]  # a Linear reads its last dim (channels-last too), a conv dim 1
            shape = (batch, *shape[1:-1], layer.in_features) if isinstance(layer, nn.Linear) else \
                (batch, layer.in_channels, *shape[2:])
            points[round(macs, 6)] = max(0.0, timed(layer, shape) - overhead)
        xs = sorted(points)
        ys = [points[x] for x in xs]
        for i in range(len(ys) - 2, -1, -1):  # narrower never slower: a noisy spike takes the next width's time
            ys[i] = min(ys[i], ys[i + 1])
        table[name] = LayerLatency(xs, ys)
    if fresh:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_json(cache, path)
        except OSError:  # a read-only home: the table still serves this run
            pass
    return table
