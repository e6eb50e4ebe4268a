"""Conv1d, Conv3d and transposed convs pruned as the Conv2d they equal, for the length of a prune.

The pruner works on Conv2d and Linear (layer.py: a weight times unfolded patches). The other convs a user's CNN
holds compute the same kind of product over other patches, so each is replaced during the prune by a `ConvView`:
a Conv2d on a re-arranged input whose output, re-arranged back, is exactly the original layer's, and whose weight is
the original's in another order. After the prune the original modules come back with the view's weights (and masks)
put back in their own layout. Every option that works on a Conv2d works on them this way (N:M runs along the
original's input channels at each kernel tap).

- Conv1d (an audio or sequence CNN): a Conv2d of height 1 on the input with a unit height (exact, same work).
- Conv3d (video, volumes): each output depth a Conv2d over the kd input slices its kernel spans, read as kd·C
  channels, with the depth positions folded into the batch (the input copied kd times over, as im2col does).
- ConvTranspose2d whose kernel equals its stride, without padding (a UNet decoder's 2×2 stride-2 up-sampling):
  each input pixel writes its own s×s block, so it is a 1×1 Conv2d with C_out·s² rows followed by pixel_shuffle.
- Any other ConvTranspose2d: the gradient of a conv, i.e. a Conv2d with the kernel flipped and its in/out axes
  swapped, run on the input with s−1 zeros inserted between pixels and padded by dilation·(k−1) − padding (s²
  times the positions to sum over, mostly zeros; the same result).
- ConvTranspose1d: the 2-D case at height 1.
- ConvTranspose3d whose kernel equals its stride, without padding (a 3-D UNet's up-sampling, nnU-Net's): the same
  1×1 conv, with C_out·sd·sh·sw rows, on the volume with its depth folded into the height, then each voxel's block
  put in place. Any other ConvTranspose3d is left as it is (named in the report).
The bias goes into the view conv, but for the pixel-shuffled view, whose rows are not the output channels: there it
stays the original's Parameter, added after the re-arrangement.
"""
from __future__ import annotations

import contextlib
import copy
import re
from collections.abc import Iterator
from dataclasses import replace

import torch
import torch.nn.functional as F
from torch import nn

from .graph import computed_weight
from .layer import LayerResult

VIEWABLE = (nn.Conv1d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.Conv3d, nn.ConvTranspose3d)


class ConvView(nn.Module):
    """`original` as a Conv2d (`conv`) between two re-arrangements of tensors (`prepare`, `finish`); one subclass per
    kind of view (`view_for` chooses), each with its weight layout (`to_view`, `to_original`)."""
    kind = ""
    rows_are_outputs = True  # the view conv's rows are the original's output channels
    weight_rows = True  # ... and the rows (dim 0) of the original's weight (not a transposed conv's)
    carries_channels = True  # its re-arrangements move each channel as a whole: the channel walk carries them
    shuffles_rows = False  # its conv's rows become output channels by a pixel shuffle (the walk ties each one's rows)
    spatial = 2  # dimensions after the channels of what `finish` returns (known without running: fx traces it)

    def __init__(self, original: nn.Module, two: nn.Module, conv: nn.Conv2d):
        """two: the original's geometry in 2-D (a 1-D layer's at height 1)."""
        super().__init__()
        self.original = type(original).__name__
        self.one_d = isinstance(original, (nn.Conv1d, nn.ConvTranspose1d))
        self.geometry = {k: getattr(two, k) for k in ("kernel_size", "stride", "padding", "dilation", "groups")}
        w = original.weight.detach()
        conv.to(device=w.device, dtype=w.dtype)
        conv.weight.data.copy_(self.to_view(w))
        if conv.bias is not None:
            conv.bias.data.copy_(original.bias.detach())
        self.conv = conv
        self.bias = None  # added after `finish` (the pixel-shuffled view's, whose rows are not the output channels)
        self.shape = list(original.weight.shape)
        self.positions = None  # the original's (conv2d_views)
        keys = ("in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation", "groups", "padding_mode")
        self.rebuild = (_base(original),  # its torch class and arguments, as built: as_original
                        {k: getattr(original, k) for k in keys} | {"bias": original.bias is not None} |
                        ({"output_padding": original.output_padding} if original.transposed else {}))

    def to_view(self, w: torch.Tensor) -> torch.Tensor:
        """The original's weight (or mask) in the view conv's layout."""
        return self._to_view(w.unsqueeze(2) if self.one_d else w)

    def to_original(self, v: torch.Tensor) -> torch.Tensor:
        """The inverse of `to_view`."""
        v = self._to_original(v)
        return v.squeeze(2) if self.one_d else v

    def _to_view(self, w: torch.Tensor) -> torch.Tensor:
        return w

    def _to_original(self, v: torch.Tensor) -> torch.Tensor:
        return v

    def view_columns(self, slots: list) -> list:
        """The channel walk's slots of the original input's channels as the view conv's input channels."""
        return slots

    def as_original(self) -> nn.Module:
        """A layer of the original's kind (its torch class) holding the view's weights and channel counts: the
        user's layer as the prune has made it so far, e.g. to time the network on a runtime (pruning/speedup.py)."""
        cls, kwargs = self.rebuild
        w = self.conv.weight
        layer = cls(**kwargs).to(device=w.device, dtype=w.dtype)
        _put_back(layer, self)
        if self.bias is not None:
            layer.bias = nn.Parameter(self.bias.detach().clone())
        return layer

    def prepare(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def finish(self, y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return y

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.one_d:
            x = x.unsqueeze(-2)
        y = self.finish(self.conv(self.prepare(x)), x)
        if self.bias is not None:
            y = y + self.bias.view(-1, *[1] * self.spatial)
        return y.squeeze(-2) if self.one_d else y


class HeightOneView(ConvView):
    """Conv1d: a Conv2d of height 1 on the input with a unit height."""
    kind = "conv"

    def __init__(self, original: nn.Conv1d):
        two = _as_2d(original)
        super().__init__(original, two, nn.Conv2d(
            two.in_channels, two.out_channels, two.kernel_size, two.stride, two.padding, two.dilation, two.groups,
            bias=original.bias is not None, padding_mode=two.padding_mode))


class PixelShuffleView(ConvView):
    """A transposed conv whose kernel equals its stride (square), nothing else set: each input pixel writes its own
    s×s block, a 1×1 conv with C_out·s² rows (o, a, b) reading W[c, o, a, b], then pixel_shuffle."""
    kind = "pixels"
    rows_are_outputs = weight_rows = carries_channels = False  # (the pixel shuffle: C_out·s² rows to C_out channels)
    shuffles_rows = True

    def __init__(self, original: nn.Module):
        two = _as_2d(original)
        s = two.stride
        super().__init__(original, two, nn.Conv2d(two.in_channels, two.out_channels * s[0] * s[1], 1,
                                                  groups=two.groups, bias=False))
        self.bias = original.bias  # the original's Parameter itself (or None)

    def _to_view(self, w):
        g, (cin, og, kh, kw) = self.geometry["groups"], w.shape
        return w.reshape(g, cin // g, og, kh, kw).permute(0, 2, 3, 4, 1).reshape(g * og * kh * kw, cin // g, 1, 1)

    def _to_original(self, v):
        g, (kh, kw) = self.geometry["groups"], self.geometry["kernel_size"]
        og, cg = v.shape[0] // (g * kh * kw), v.shape[1]
        return v.reshape(g, og, kh, kw, cg).permute(0, 4, 1, 2, 3).reshape(g * cg, og, kh, kw)

    def finish(self, y, x):
        return F.pixel_shuffle(y, self.geometry["stride"][0])


class VoxelShuffleView(PixelShuffleView):
    """A ConvTranspose3d whose kernel equals its stride, nothing else set: the pixel-shuffled view's 1×1 conv, with
    C_out·sd·sh·sw rows (o, a, b, c), on the volume with its depth folded into the height; each voxel's sd×sh×sw
    block then put in place. (Its input and output channels stay in a channel prune: the walk does not follow them
    through these re-arrangements.)"""
    kind = "voxels"
    spatial = 3
    shuffles_rows = False  # (its re-arrangements: depth folded into the height, then each voxel's block)

    def __init__(self, original: nn.ConvTranspose3d):
        s = original.stride
        ConvView.__init__(self, original, original, nn.Conv2d(
            original.in_channels, original.out_channels * s[0] * s[1] * s[2], 1, groups=original.groups, bias=False))
        self.bias = original.bias

    def _to_view(self, w):  # (C_in, O/g, kd, kh, kw) -> (g·O/g·kd·kh·kw, C_in/g, 1, 1)
        g = self.geometry["groups"]
        return w.unflatten(0, (g, -1)).permute(0, 2, 3, 4, 5, 1).flatten(0, 4)[..., None, None]

    def _to_original(self, v):
        g, k = self.geometry["groups"], self.geometry["kernel_size"]
        return v[..., 0, 0].unflatten(0, (g, -1, *k)).permute(0, 5, 1, 2, 3, 4).flatten(0, 1)

    def prepare(self, x):  # (N, C, D, H, W) -> (N, C, D·H, W)
        return x.flatten(2, 3)

    def finish(self, y, x):  # (N, O·sd·sh·sw, D·H, W) -> (N, O, D·sd, H·sh, W·sw)
        (sd, sh, sw), (d, h, w) = self.geometry["stride"], x.shape[2:]
        y = y.unflatten(1, (-1, sd, sh, sw)).unflatten(-2, (d, h))
        return y.permute(0, 1, 5, 2, 6, 3, 7, 4).flatten(6, 7).flatten(4, 5).flatten(2, 3)


class ZeroInsertedView(ConvView):
    """Any other transposed conv: the gradient of a conv, i.e. a Conv2d with the kernel flipped and its in/out axes
    swapped, on the input with stride−1 zeros after each pixel, padded by dilation·(k−1) − padding."""
    kind = "zeros"
    weight_rows = False

    def __init__(self, original: nn.Module):
        two = _as_2d(original)
        super().__init__(original, two, nn.Conv2d(two.in_channels, two.out_channels, two.kernel_size,
                                                  dilation=two.dilation, groups=two.groups,
                                                  bias=original.bias is not None))
        k, d, p, op, s = two.kernel_size, two.dilation, two.padding, two.output_padding, two.stride
        q = [d[i] * (k[i] - 1) - p[i] for i in (0, 1)]  # the zero-inserted input's padding (< 0: cropped)
        self.zeros = (0, s[1] - 1, 0, 0, 0, s[0] - 1)
        self.pad = (q[1], q[1] + op[1] - (s[1] - 1), q[0], q[0] + op[0] - (s[0] - 1))  # (the last pixel's zeros off)

    def _to_view(self, w):
        g, (cin, og, kh, kw) = self.geometry["groups"], w.shape
        return w.reshape(g, cin // g, og, kh, kw).transpose(1, 2).reshape(g * og, cin // g, kh, kw).flip(-2, -1)

    def _to_original(self, v):
        g, (kh, kw) = self.geometry["groups"], self.geometry["kernel_size"]
        og, cg = v.shape[0] // g, v.shape[1]
        return v.flip(-2, -1).reshape(g, og, cg, kh, kw).transpose(1, 2).reshape(g * cg, og, kh, kw)

    def prepare(self, x):  # every op keeps the channels at dim 1, one by one (the channel walk follows)
        x = F.pad(x.unsqueeze(-1).unsqueeze(-3), self.zeros).flatten(-4, -3).flatten(-2, -1)
        return F.pad(x, self.pad)


class DepthView(ConvView):
    """Conv3d (batched inputs): each output depth is a Conv2d over the kd input slices its kernel spans, as
    kd·C channels (tap-major within each group, so that N:M groups are input channels at one tap), with the depth
    positions folded into the batch. The input is copied kd times over."""
    kind = "depth"

    def __init__(self, original: nn.Conv3d):
        kd, g = original.kernel_size[0], original.groups
        two = nn.Module()
        two.kernel_size, two.stride, two.dilation = (original.kernel_size[1:], original.stride[1:],
                                                      original.dilation[1:])
        two.padding, two.groups = (0, 0), g
        self.depth = {"kernel": kd, "stride": original.stride[0], "dilation": original.dilation[0], "groups": g}
        super().__init__(original, two, nn.Conv2d(original.in_channels * kd, original.out_channels, two.kernel_size,
                                                  two.stride, 0, two.dilation, g, bias=original.bias is not None))
        self.conv.nm_channels = original.in_channels // g  # N:M along one tap's channels (LayerPruner.skip_reason)
        self.pad = original._reversed_padding_repeated_twice  # int or 'same' padding, all three dims, done first
        self.mode = "constant" if original.padding_mode == "zeros" else original.padding_mode

    def _to_view(self, w):  # (O, Cg, kd, kh, kw) -> (O, kd·Cg, kh, kw)
        return w.transpose(1, 2).flatten(1, 2)

    def _to_original(self, v):
        return v.unflatten(1, (self.depth["kernel"], -1)).transpose(1, 2)

    def view_columns(self, slots):  # channel j·Cg + c is view input j·kd·Cg + t·Cg + c at each tap t
        g, kd = self.depth["groups"], self.depth["kernel"]
        per = len(slots) // g
        return [s for j in range(g) for _ in range(kd) for s in slots[j * per:(j + 1) * per]]

    def prepare(self, x):  # (N, C, D, H, W) -> (N·D_out, kd·C, H, W); no channel count (a channel prune slices C)
        t = self.depth
        span = t["dilation"] * (t["kernel"] - 1) + 1
        x = F.pad(x, self.pad, mode=self.mode).unfold(2, span, t["stride"])[..., ::t["dilation"]]
        x = x.permute(0, 2, 1, 5, 3, 4).unflatten(2, (t["groups"], -1)).transpose(3, 4)
        return x.flatten(2, 4).flatten(0, 1)

    def finish(self, y, x):  # (N·D_out, O, H', W') -> (N, O, D_out, H', W')
        return y.unflatten(0, (x.shape[0], -1)).transpose(1, 2)


def view_for(m: nn.Module) -> ConvView:
    """The ConvView that stands in for `m` (a VIEWABLE layer)."""
    if isinstance(m, nn.Conv1d):
        return HeightOneView(m)
    if isinstance(m, nn.Conv3d):
        return DepthView(m)
    if isinstance(m, nn.ConvTranspose3d):
        return VoxelShuffleView(m)
    two = _as_2d(m)
    plain = two.padding == (0, 0) and two.output_padding == (0, 0) and two.dilation == (1, 1)
    square = two.stride[0] == two.stride[1]  # (pixel_shuffle takes one factor)
    return PixelShuffleView(m) if plain and square and tuple(two.kernel_size) == tuple(two.stride) \
        else ZeroInsertedView(m)


def _as_2d(m: nn.Module) -> nn.Module:
    """A layer's 2-D geometry: a 2-D layer itself, a 1-D one's at height 1 (only the attributes the views read)."""
    if not isinstance(m, (nn.Conv1d, nn.ConvTranspose1d)):
        return m
    two = nn.Module()
    for k in ("kernel_size", "stride", "dilation"):
        setattr(two, k, (1, getattr(m, k)[0]))
    two.padding = m.padding if isinstance(m.padding, str) else (0, m.padding[0])
    if isinstance(m, nn.ConvTranspose1d):
        two.output_padding = (0, m.output_padding[0])
    for k in ("in_channels", "out_channels", "groups", "padding_mode"):
        setattr(two, k, getattr(m, k))
    return two


def why_not(m: nn.Module) -> str:
    """Why a layer of a viewable type cannot be viewed ('' = it can)."""
    if "weight" not in m._parameters:
        return computed_weight(m)
    if isinstance(m, nn.ConvTranspose3d) and not _voxel_blocks(m):
        return f"a ConvTranspose3d is pruned where its kernel equals its stride, without padding or dilation (a 3-D " \
               f"UNet's up-sampling); this one's kernel {tuple(m.kernel_size)}, stride {tuple(m.stride)}, padding " \
               f"{tuple(m.padding)} is not: left as it is"
    base = _base(m)
    if any(getattr(type(m), f) is not getattr(base, f) for f in ("forward", "_conv_forward") if hasattr(base, f)):
        return f"{type(m).__name__} is a subclass of {base.__name__} with its own forward, which may compute " \
               "something else with its weight: left as it is"
    return ""  # (a subclass that only adds methods, as torchvision's Conv3DSimple, computes what its base does)


def _base(m: nn.Module) -> type:
    """The torch class among VIEWABLE that a layer is (a subclass's base)."""
    return next(b for b in VIEWABLE if isinstance(m, b))


def _voxel_blocks(m: nn.ConvTranspose3d) -> bool:
    """Whether each input voxel writes its own block (kernel = stride, no padding, dilation or output padding)."""
    return tuple(m.kernel_size) == tuple(m.stride) and not any(m.padding) and not any(m.output_padding) and \
        tuple(m.dilation) == (1, 1, 1) and m.padding_mode == "zeros"


def viewable(model: nn.Module) -> dict[str, nn.Module]:
    """name → module, for the layers `conv2d_views` replaces."""
    return {n: m for n, m in model.named_modules() if n and isinstance(m, VIEWABLE) and not why_not(m)}


@contextlib.contextmanager
def conv2d_views(model: nn.Module, positions: dict[str, int] | None = None
                 ) -> Iterator[dict[str, tuple[str, ConvView]]]:
    """Replace every viewable layer of `model` by its ConvView for the block; yield {view conv's name: (original
    name, view)}. On leaving (also on an error) the original modules are back in place with the views' weights, and
    with their new channel counts where a channel prune sliced the view conv. positions: the original layers'
    (`layer_plan.forward_order` with kinds=VIEWABLE), which each view keeps as its own (a zero-inserted view applies
    its weight at s² times as many positions, mostly zeros)."""
    found = viewable(model)
    positions = positions or {}
    views: dict[str, tuple[str, ConvView]] = {}
    for name, m in found.items():
        view = view_for(m)
        view.positions = positions.get(name)
        _set(model, name, view)
        views[f"{name}.conv"] = (name, view)
    try:
        yield views
    finally:
        for name, view in views.values():
            _put_back(found[name], view)
            _set(model, name, found[name])


def without_views(model: nn.Module) -> nn.Module:
    """A copy of `model` (inside conv2d_views) with every ConvView replaced by a layer of its original's kind with the
    view's weights (ConvView.as_original): the network the user will run, for timing it."""
    out = copy.deepcopy(model)
    for name in [n for n, m in out.named_modules() if isinstance(m, ConvView)]:
        _set(out, name, out.get_submodule(name).as_original())
    return out


def view_names(views: dict[str, tuple[str, ConvView]]) -> dict[str, str]:
    """Each view conv's name → its original layer's, the name a user's layer names and regexes see."""
    return {k: name for k, (name, _) in views.items()}


def view_positions(views: dict[str, tuple[str, ConvView]]) -> dict[str, int]:
    """The view convs' positions as their original layers' (see conv2d_views)."""
    return {k: v.positions for k, (_, v) in views.items() if v.positions is not None}


def _put_back(original: nn.Module, view: ConvView) -> None:
    """The view conv's weight (and its bias, where it holds one) into the original layer, in its layout; new
    Parameters and channel counts where their shapes changed."""
    w = view.to_original(view.conv.weight.detach())
    if w.shape == original.weight.shape:
        original.weight.data.copy_(w)
    else:
        original.weight = nn.Parameter(w.clone(), requires_grad=original.weight.requires_grad)
        g = original.groups
        transposed = isinstance(original, nn.modules.conv._ConvTransposeNd)
        original.in_channels, original.out_channels = (w.shape[0], w.shape[1] * g) if transposed else \
            (w.shape[1] * g, w.shape[0])
    if view.bias is not None and view.bias is not original.bias:  # the view's own, sliced by a channel prune
        original.bias = view.bias
    if view.bias is None and original.bias is not None:  # the view conv's own
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
    the view's rows are the original weight's (Conv1d, Conv3d); a transposed conv's are not (its weight's dim 0 is
    its input channels), so its quantization grid has no place in its layout: its weights stay on their grid, stored
    as floats."""
    if r.name not in views:
        return r
    name, view = views[r.name]
    return replace(r, name=name, shape=list(view.shape),
                   mask=None if r.mask is None else view.to_original(r.mask),
                   quant=r.quant | {"codes": view.to_original(r.quant["codes"])} if r.quant and view.weight_rows
                   else None, offset=r.offset if view.rows_are_outputs else None)


def _set(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)
