"""Conv1d and transposed convs pruned as the Conv2d they equal, for the length of a prune.

The pruner works on Conv2d and Linear (layer.py: a weight times unfolded patches). The other convs a user's CNN
holds compute the same kind of product over other patches, so each is replaced during the prune by a `ConvView`:
a Conv2d on a re-arranged input whose output, re-arranged back, is exactly the original layer's, and whose weight is
the original's in another order. After the prune the original modules come back with the view's weights (and masks)
put back in their own layout. Every option that works on a Conv2d works on them this way (N:M runs along the
original's input channels at each kernel tap).

- Conv1d (an audio or sequence CNN): a Conv2d of height 1 on the input with a unit height (exact, same work).
- ConvTranspose2d whose kernel equals its stride, without padding (a UNet decoder's 2×2 stride-2 up-sampling):
  each input pixel writes its own s×s block, so it is a 1×1 Conv2d with C_out·s² rows followed by pixel_shuffle.
- Any other ConvTranspose2d: the gradient of a conv, i.e. a Conv2d with the kernel flipped and its in/out axes
  swapped, run on the input with s−1 zeros inserted between pixels and padded by dilation·(k−1) − padding (s²
  times the positions to sum over, mostly zeros; the same result).
- ConvTranspose1d: the 2-D case at height 1.
The bias goes into the view conv, but for the pixel-shuffled view, whose rows are not the output channels: there it
stays the original's Parameter, added after the re-arrangement.
"""
from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator
from dataclasses import replace

import torch
import torch.nn.functional as F
from torch import nn

from .graph import run_hooked, weight_positions
from .layer import LayerResult

VIEWABLE = (nn.Conv1d, nn.ConvTranspose1d, nn.ConvTranspose2d)


class ConvView(nn.Module):
    """`original` as a Conv2d (`conv`) between two re-arrangements of tensors; see the module's docstring."""

    def __init__(self, original: nn.Module):
        super().__init__()
        self.kind = kind_of(original)
        self.original = type(original).__name__
        self.one_d = isinstance(original, (nn.Conv1d, nn.ConvTranspose1d))
        two = _as_2d(original) if self.one_d else original  # the 1-D layers' geometry at height 1
        self.geometry = {k: getattr(two, k) for k in ("kernel_size", "stride", "padding", "dilation", "groups")} | {
            "output_padding": getattr(two, "output_padding", (0, 0))}
        w = two.weight.detach()
        if self.kind == "conv":
            conv = nn.Conv2d(two.in_channels, two.out_channels, two.kernel_size, two.stride, two.padding,
                             two.dilation, two.groups, bias=original.bias is not None, padding_mode=two.padding_mode)
        elif self.kind == "pixels":
            s = two.stride
            conv = nn.Conv2d(two.in_channels, two.out_channels * s[0] * s[1], 1, groups=two.groups, bias=False)
        else:
            conv = nn.Conv2d(two.in_channels, two.out_channels, two.kernel_size, dilation=two.dilation,
                             groups=two.groups, bias=original.bias is not None)
            k, d, p, op, s = two.kernel_size, two.dilation, two.padding, two.output_padding, two.stride
            q = [d[i] * (k[i] - 1) - p[i] for i in (0, 1)]  # the zero-inserted input's padding (< 0: cropped)
            # after each pixel s−1 zeros (the last pixel's are cropped again by the padding after: s − 1 less)
            self.zeros = (0, s[1] - 1, 0, 0, 0, s[0] - 1)
            self.pad = (q[1], q[1] + op[1] - (s[1] - 1), q[0], q[0] + op[0] - (s[0] - 1))
        conv.to(device=w.device, dtype=w.dtype)
        conv.weight.data.copy_(self.to_view(w))
        if conv.bias is not None:  # rows are the original's output channels: the bias goes with them
            conv.bias.data.copy_(original.bias.detach())
        self.conv = conv
        # the pixel-shuffled view's rows are not the output channels: the bias (the original's Parameter) is added
        # after the re-arrangement
        self.bias = original.bias if self.kind == "pixels" else None
        self.shape = list(original.weight.shape)

    def to_view(self, w: torch.Tensor) -> torch.Tensor:
        """The original's weight (or mask) in the view conv's layout."""
        if self.one_d:
            w = w.unsqueeze(2)
        if self.kind == "conv":
            return w
        g, (kh, kw) = self.geometry["groups"], w.shape[-2:]
        cin, og = w.shape[:2]
        w = w.reshape(g, cin // g, og, kh, kw)
        if self.kind == "pixels":  # row (o, a, b) reads input channel c: W[c, o, a, b]
            return w.permute(0, 2, 3, 4, 1).reshape(g * og * kh * kw, cin // g, 1, 1)
        return w.transpose(1, 2).reshape(g * og, cin // g, kh, kw).flip(-2, -1)

    def to_original(self, v: torch.Tensor) -> torch.Tensor:
        """The inverse of `to_view`."""
        if self.kind != "conv":
            g, (kh, kw) = self.geometry["groups"], self.geometry["kernel_size"]
            og, cg = v.shape[0] // (g * (kh * kw if self.kind == "pixels" else 1)), v.shape[1]
            if self.kind == "pixels":
                v = v.reshape(g, og, kh, kw, cg).permute(0, 4, 1, 2, 3)
            else:
                v = v.flip(-2, -1).reshape(g, og, cg, kh, kw).transpose(1, 2)
            v = v.reshape(g * cg, og, kh, kw)
        return v.squeeze(2) if self.one_d else v

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.one_d:
            x = x.unsqueeze(-2)
        if self.kind == "zeros":  # every op here keeps the channels at dim 1, one by one (the channel walk follows)
            x = F.pad(x.unsqueeze(-1).unsqueeze(-3), self.zeros).flatten(-4, -3).flatten(-2, -1)
            x = F.pad(x, self.pad)
        y = self.conv(x)
        if self.kind == "pixels":
            y = F.pixel_shuffle(y, self.geometry["stride"][0])
        if self.bias is not None:
            y = y + self.bias.view(-1, 1, 1)
        return y.squeeze(-2) if self.one_d else y


def kind_of(m: nn.Module) -> str:
    """conv (Conv1d), pixels (a transposed conv with kernel = stride and nothing else: a 1×1 conv, pixel_shuffle)
    or zeros (any other transposed conv: a conv on the zero-inserted input)."""
    if isinstance(m, nn.Conv1d):
        return "conv"
    two = _as_2d(m) if isinstance(m, nn.ConvTranspose1d) else m
    plain = two.padding == (0, 0) and two.output_padding == (0, 0) and two.dilation == (1, 1)
    square = two.stride[0] == two.stride[1]  # (pixel_shuffle takes one factor)
    return "pixels" if plain and square and tuple(two.kernel_size) == tuple(two.stride) else "zeros"


def _as_2d(m: nn.Module) -> nn.Module:
    """A 1-D conv's geometry as a 2-D one of height 1 (only the attributes ConvView reads)."""
    class Two:
        pass
    two = Two()
    for k in ("kernel_size", "stride", "dilation"):
        setattr(two, k, (1, getattr(m, k)[0]))
    two.padding = m.padding if isinstance(m.padding, str) else (0, m.padding[0])
    if isinstance(m, nn.ConvTranspose1d):
        two.output_padding = (0, m.output_padding[0])
    for k in ("in_channels", "out_channels", "groups", "padding_mode"):
        setattr(two, k, getattr(m, k))
    two.weight = m.weight
    return two


def why_not(m: nn.Module) -> str:
    """Why a layer of a viewable type cannot be viewed ('' = it can)."""
    if "weight" not in m._parameters:
        return f"its weight is computed from other parameters ({type(m).__name__}: weight_norm or a " \
               "parametrization), so a pruned weight would not stay: left as it is"
    if type(m) not in VIEWABLE:
        return f"{type(m).__name__} is a subclass of {type(m).__mro__[1].__name__} that may compute something " \
               "else with its weight: left as it is"
    return ""


def viewable(model: nn.Module) -> dict[str, nn.Module]:
    """name → module, for the layers `conv2d_views` replaces."""
    return {n: m for n, m in model.named_modules() if n and isinstance(m, VIEWABLE) and not why_not(m)}


@contextlib.contextmanager
def conv2d_views(model: nn.Module, example: torch.Tensor | None = None) -> Iterator[dict[str, tuple[str, ConvView]]]:
    """Replace every viewable layer of `model` by its ConvView for the block; yield {view conv's name: (original
    name, view)}. On leaving (also on an error) the original modules are back in place with the views' weights, and
    with their new channel counts where a channel prune sliced the view conv. With `example` (one input batch),
    each view's `positions` is the original layer's: its multiply-adds per image over its weight count (a
    zero-inserted view applies its weight at s² times as many positions, mostly zeros)."""
    found = viewable(model)
    positions = _positions(model, found, example) if example is not None and found else {}
    views: dict[str, tuple[str, ConvView]] = {}
    for name, m in found.items():
        view = ConvView(m)
        view.positions = positions.get(name)
        _set(model, name, view)
        views[f"{name}.conv"] = (name, view)
    try:
        yield views
    finally:
        for name, view in views.values():
            _put_back(found[name], view)
            _set(model, name, found[name])


def view_positions(views: dict[str, tuple[str, ConvView]]) -> dict[str, int]:
    """The view convs' positions as their original layers' (see conv2d_views)."""
    return {k: v.positions for k, (_, v) in views.items() if v.positions is not None}


def _positions(model: nn.Module, found: dict[str, nn.Module], example: torch.Tensor) -> dict[str, int]:
    names, out = {m: n for n, m in found.items()}, {}

    def hook(m, inp, y):
        out.setdefault(names[m], weight_positions(m, inp[0], y, len(example)))

    was_training = model.training
    try:
        with torch.no_grad():  # eval: a BatchNorm in training mode would update its statistics
            run_hooked(model.eval(), [example], [m.register_forward_hook(hook) for m in names])
    finally:
        model.train(was_training)
    return out


def _put_back(original: nn.Module, view: ConvView) -> None:
    """The view conv's weight (and a Conv1d's bias) into the original layer, in its layout; new Parameters and
    channel counts where their shapes changed."""
    w = view.to_original(view.conv.weight.detach())
    if w.shape == original.weight.shape:
        original.weight.data.copy_(w)
    else:
        original.weight = nn.Parameter(w.clone(), requires_grad=original.weight.requires_grad)
        g = original.groups
        transposed = isinstance(original, nn.modules.conv._ConvTransposeNd)
        original.in_channels, original.out_channels = (w.shape[0], w.shape[1] * g) if transposed else \
            (w.shape[1] * g, w.shape[0])
    if view.kind != "pixels" and original.bias is not None:
        b = view.conv.bias.detach()
        if b.shape == original.bias.shape:
            original.bias.data.copy_(b)
        else:
            original.bias = nn.Parameter(b.clone(), requires_grad=original.bias.requires_grad)


def renamed(value, views: dict[str, tuple[str, ConvView]]):
    """`value` (a report's dicts, lists and strings) with each view conv's name replaced by its layer's."""
    if isinstance(value, dict):
        return {renamed(k, views): renamed(v, views) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(renamed(v, views) for v in value)
    if isinstance(value, str) and views:
        if value in views:
            return views[value][0]
        names = "|".join(map(re.escape, views))  # a whole name: not inside a longer one
        return re.sub(rf"(?<![\w.])({names})(?!\w|\.\w)", lambda m: views[m[1]][0], value)
    return value


def original_result(r: LayerResult, views: dict[str, tuple[str, ConvView]]) -> LayerResult:
    """A view conv's result as the original layer's: its name, weight shape and mask. GPTQ's codes carry over where
    the rows are the original's (Conv1d); a transposed conv's view rows are not its output channels, so its
    quantization grid has no place in the original's layout: its weights stay on their grid, stored as floats."""
    if r.name not in views:
        return r
    name, view = views[r.name]
    conv_rows = view.kind == "conv"
    return replace(r, name=name, shape=list(view.shape),
                   mask=None if r.mask is None else view.to_original(r.mask),
                   quant=r.quant | {"codes": view.to_original(r.quant["codes"])} if r.quant and conv_rows else None,
                   offset=r.offset if conv_rows else None)


def _set(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)
