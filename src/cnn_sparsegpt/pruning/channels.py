"""Which channels of a network must be removed together (dependency groups), found on its torch.fx graph.

Every Conv2d (but a depthwise one) and Linear output channel is a *slot*. The graph is walked once with the
tensors' shapes (ShapeProp on one example), and each tensor's channel dimension is described as a list of slots, one
per channel: BatchNorm, activations, pooling, resizing and dropout pass it through; a residual add (or a product with a
same-width tensor, as in squeeze-excitation) ties the slots of its operands; a concat along channels joins the lists;
a depthwise conv passes its input's slots to its output (each to its k outputs, with a channel multiplier k); a
grouped conv ties channel j of each of its groups, on its input and on its output, so that every group loses as many
(its groups keep equal widths); a flatten repeats each slot over the positions it spans, so a Linear after it sees a
block of columns per channel; a permute moves the channel dimension (ConvNeXt's channels-last blocks), a Linear over
a channels-last tensor reads and writes channels like a 1x1 conv, and a LayerNorm over channels fixes them (it
normalizes them together: removing one changes the others); a channel shuffle (ShuffleNet's view into g pieces,
transpose, view back) interleaves the pieces' lists and ties channel j of every piece, so that each piece keeps as
many and the interleave stays the same; a view that only adds or merges dims after the channels (an SE's
scales as (N, C, 1, 1)) passes them; a module called again (shared weights) ties what each call reads and writes.
Tied slots form a *unit*: one channel (one per conv group, where tied by a grouped conv) to remove from every
producer that writes it (its weight rows, its BatchNorm entries, the depthwise filters on its path) and from every
consumer that reads it (its weight columns). Units that reach the model's output, come from its input or pass
through an operation this walk does not know are fixed, with the reason.

A `Group` collects the units of producers tied together (e.g. all the convs that write one ResNet stage's residual
stream): its units are removed independently, each in every member at once.

This is the project's own walk rather than Torch-Pruning's DependencyGraph: it runs on the same fx graph the pruner
executes (no second tracing engine, no extra dependency) and hands the solver exactly what it needs (the consumer
columns of each unit), and it refuses what it does not understand instead of guessing.
"""
from __future__ import annotations

import math
import operator
from dataclasses import dataclass, field
from functools import cached_property

import torch
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp

from ..utils import UserError
from .conv_views import ConvView
from .graph import calls_of, nonstandard_layers, partial_trace, trace

FIXED = -1  # a channel that cannot be removed

# modules and functions that keep each channel where it is (elementwise or per-channel, spatial only)
_PASS_MODULES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.GELU, nn.SiLU, nn.Hardswish,
                 nn.Hardsigmoid, nn.Sigmoid, nn.Tanh, nn.ELU, nn.Mish, nn.Dropout, nn.Dropout2d, nn.Identity,
                 nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d, nn.Hardtanh,
                 nn.Softplus, nn.PReLU, nn.Upsample, nn.MaxPool1d, nn.AvgPool1d, nn.AdaptiveAvgPool1d,
                 nn.AdaptiveMaxPool1d, nn.Dropout1d, nn.BatchNorm3d, nn.MaxPool3d, nn.AvgPool3d, nn.AdaptiveAvgPool3d,
                 nn.AdaptiveMaxPool3d, nn.Dropout3d, nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d,
                 nn.SELU, nn.CELU, nn.Softsign, nn.LogSigmoid, nn.AlphaDropout)
_PASS_FUNCTIONS = {torch.relu, torch.sigmoid, torch.tanh, torch.nn.functional.relu, torch.nn.functional.relu6,
                   torch.nn.functional.gelu, torch.nn.functional.silu, torch.nn.functional.hardswish,
                   torch.nn.functional.hardsigmoid, torch.nn.functional.sigmoid, torch.nn.functional.dropout,
                   torch.nn.functional.adaptive_avg_pool2d, torch.nn.functional.max_pool2d,
                   torch.nn.functional.avg_pool2d, torch.nn.functional.hardtanh, torch.nn.functional.leaky_relu,
                   torch.nn.functional.elu, torch.nn.functional.interpolate, torch.nn.functional.upsample,
                   torch.nn.functional.max_pool1d, torch.nn.functional.avg_pool1d,
                   torch.nn.functional.adaptive_avg_pool1d, torch.nn.functional.adaptive_max_pool1d,
                   torch.nn.functional.max_pool3d, torch.nn.functional.avg_pool3d,
                   torch.nn.functional.adaptive_avg_pool3d, torch.nn.functional.adaptive_max_pool2d,
                   torch.nn.functional.adaptive_max_pool3d, torch.nn.functional.dropout1d,
                   torch.nn.functional.dropout2d, torch.nn.functional.dropout3d, torch.nn.functional.mish,
                   torch.nn.functional.softplus, torch.nn.functional.selu, torch.nn.functional.celu,
                   torch.nn.functional.logsigmoid, torch.nn.functional.relu_,
                   # elementwise arithmetic on one tensor (a scalar beside it)
                   torch.abs, torch.exp, torch.neg, torch.sqrt, torch.rsqrt, torch.log, torch.square, torch.erf,
                   torch.clamp, torch.clip, torch.clamp_min, torch.clamp_max, torch.reciprocal, torch.sign,
                   operator.neg, operator.abs}
_PASS_METHODS = {"relu", "sigmoid", "tanh", "contiguous", "clone", "relu_", "sigmoid_", "tanh_", "abs", "exp",
                 "neg", "sqrt", "rsqrt", "log", "square", "erf", "clamp", "clamp_", "clamp_min", "clamp_max", "clip",
                 "clip_", "reciprocal", "sign", "exp_", "neg_", "abs_",
                 "float", "half", "double", "bfloat16", "to", "type_as", "detach"}  # (dtype, device: channels stay)
_PIXEL_SHUFFLES = {torch.nn.functional.pixel_shuffle: True, torch.pixel_shuffle: True,  # (whether it shuffles:
                   torch.nn.functional.pixel_unshuffle: False, torch.pixel_unshuffle: False}  # depth to space)
_TIE_FUNCTIONS = {operator.add, operator.mul, operator.sub, torch.add, torch.mul, torch.sub, operator.iadd,
                  operator.imul, operator.isub, operator.truediv, operator.itruediv, torch.div, torch.true_divide,
                  operator.pow, torch.pow, torch.maximum, torch.minimum, torch.where, operator.gt, operator.lt,
                  operator.ge, operator.le, torch.gt, torch.lt, torch.ge, torch.le}  # (elementwise over tensors)
_TIE_METHODS = {"add", "mul", "sub", "add_", "mul_", "sub_", "div", "div_", "true_divide", "pow", "maximum",
                "minimum", "gt", "lt", "ge", "le"}
_SOFTMAXES = {torch.softmax, torch.nn.functional.softmax, torch.log_softmax, torch.nn.functional.log_softmax,
              "softmax", "log_softmax"}  # over the dim they are given: the channels' one normalizes them together


@dataclass
class Unit:
    """One removable channel: the producer rows and the consumer columns it owns."""
    rows: dict = field(default_factory=dict)  # producer module name -> its output channel indices, ascending (one,
    # or one per conv group where a grouped conv ties them)
    columns: dict = field(default_factory=dict)  # consumer module name -> list of input column indices
    entries: dict = field(default_factory=dict)  # per-channel module on the path (BatchNorm, depthwise conv,
    # PReLU) -> list of its channel indices
    fixed: str = ""  # why it cannot be removed ('' = it can)


OUTPUT = "reaches the model's output"
TIED = "tied to a channel that cannot be removed"
ONE_UNIT = ("its channels form a single unit (tied together, as channel shuffles tie a stream's): "
            "removing it would remove the whole tensor")


@dataclass
class Group:
    producers: list  # module names whose output channels are tied
    units: list  # of Unit, in the first producer's channel order
    reason: str = ""  # why the whole group is fixed ('' = prunable)
    rows_per_channel: dict = field(default_factory=dict)  # producer -> its rows per output channel of the layer
    # it stands for, where not 1 (a transposed conv's pixel-shuffled view: stride² rows each)

    @property
    def removable(self) -> list[int]:
        return [i for i, u in enumerate(self.units) if not u.fixed]

    @cached_property  # read at every allocation step; the units do not change
    def width(self) -> int:
        """Channels a unit takes from a producer: 1, or the groups of the grouped conv that tied them (a transposed
        conv's: its output channels, not its view's rows)."""
        return max((len(ch) // self.rows_per_channel.get(p, 1) for u in self.units for p, ch in u.rows.items()),
                   default=1)

    def unit_step(self, round_to: int) -> int:
        """Units per allocation step that keep the producers' channel counts multiples of round_to."""
        return round_to // math.gcd(round_to, self.width)


class _Slots:
    """Union-find over slots, with the reason a slot is fixed."""

    def __init__(self):
        self.parent: list[int] = []
        self.owner: list[tuple[str, int]] = []  # (producer, channel)
        self.fixed: dict[int, str] = {}

    def new(self, producer: str, n: int) -> list[int]:
        start = len(self.parent)
        self.parent += list(range(start, start + n))
        self.owner += [(producer, i) for i in range(n)]
        return list(range(start, start + n))

    def find(self, a: int) -> int:
        while self.parent[a] != a:
            self.parent[a] = self.parent[self.parent[a]]
            a = self.parent[a]
        return a

    def union(self, a: int, b: int) -> None:
        if a == FIXED or b == FIXED:
            self.fix(b if a == FIXED else a, TIED)
            return
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[rb] = ra
            if rb in self.fixed:
                self.fixed.setdefault(ra, self.fixed.pop(rb))

    def fix(self, a: int, reason: str) -> None:
        if a != FIXED:
            self.fixed.setdefault(self.find(a), reason)


def _tie_groups(slots: _Slots, x: list[int], groups: int) -> list[int]:
    """Tie channel j of every conv group of a grouped conv's input or output (x: its slots, groups × per group), so
    that each group loses as many channels (a grouped conv's groups have equal widths); returns the first group's
    slots, one per weight column (input) or unit (output)."""
    per = len(x) // groups
    for j in range(per):
        for g in range(1, groups):
            slots.union(x[j], x[g * per + j])
    return x[:per]


def _tie_runs(slots: _Slots, x: list[int], k: int) -> list[int]:
    """Tie each run of k consecutive channels of x into one unit (a GroupNorm's group; the r² channels a pixel
    shuffle makes one channel of); returns the first slot of each run."""
    for c in range(0, len(x) - k + 1, k):
        for s in x[c + 1:c + k]:
            slots.union(x[c], s)
    return x[::k]


def _attribute(gm: fx.GraphModule, target: str):
    owner, _, attr = target.rpartition(".")
    return getattr(gm.get_submodule(owner) if owner else gm, attr, None)


def _one_axis(t) -> bool:
    """Whether `t` (a tensor, or fx's tensor metadata) has more than one value, all along one axis: a candidate
    per-channel parameter ((C,), (C, 1, 1), (1, C, 1, 1))."""
    shape = tuple(getattr(t, "shape", ()) or ())
    return math.prod(shape) > 1 and max(shape) == math.prod(shape)


def _shape(node) -> tuple | None:
    meta = node.meta.get("tensor_meta") if isinstance(node, fx.Node) else None
    shape = getattr(meta, "shape", None)
    return tuple(shape) if shape is not None else None


def _permutation(node: fx.Node) -> list[int] | None:
    dims = list(node.args[1:]) if node.op == "call_method" else list(node.args[1:2]) or [node.kwargs.get("dims")]
    if len(dims) == 1 and isinstance(dims[0], (list, tuple)):
        dims = list(dims[0])
    return dims if all(isinstance(d, int) for d in dims) else None


def _sizes(node: fx.Node) -> list:
    """The sizes a view or reshape asks for (several arguments, or one list or tuple)."""
    args = list(node.args[1:])
    return list(args[0]) if len(args) == 1 and isinstance(args[0], (list, tuple)) else args


def _computed(size) -> bool:
    """A size the model's code computes when it runs (from x.size(), or -1), not a number fixed when it was
    written: it follows a tensor whose channels were removed."""
    return isinstance(size, fx.Node) or size == -1


def _channel_split(node: fx.Node, name: str, shape_in: tuple | None) -> int | None:
    """g where `node` views (N, C, *S) as (N, g, C/g, *S) with g fixed and C/g computed (ShuffleNet's channel
    shuffle, torchvision's channel_shuffle), else None."""
    out = _shape(node)
    if name not in ("view", "reshape") or shape_in is None or out is None or len(shape_in) < 2 or \
            len(out) != len(shape_in) + 1 or out[0] != shape_in[0] or out[3:] != shape_in[2:] or \
            out[1] * out[2] != shape_in[1] or min(out[1], out[2]) < 2:
        return None
    sizes = _sizes(node)
    ok = len(sizes) == len(out) and sizes[1] == out[1] and _computed(sizes[2])
    return out[1] if ok else None


def _channel_merge(node: fx.Node, name: str) -> bool:
    """Whether `node` views (N, a, b, *S) back as (N, a·b, *S) with a·b computed (or flattens dims 1 and 2)."""
    shape_in, out = _shape(node.args[0]), _shape(node)
    if shape_in is None or out is None or len(out) != len(shape_in) - 1 or out[0] != shape_in[0] or \
            out[1] != shape_in[1] * shape_in[2] or out[2:] != shape_in[3:]:
        return False
    if name == "flatten":
        dims = list(node.args[1:3]) + [node.kwargs.get(k) for k in ("start_dim", "end_dim") if k in node.kwargs]
        return [d % len(shape_in) if isinstance(d, int) else d for d in dims] == [1, 2]
    sizes = _sizes(node)
    return name in ("view", "reshape") and len(sizes) == len(out) and _computed(sizes[1])


def _keeps_channels(node: fx.Node, name: str) -> bool:
    """Whether `node` only adds, drops, merges or broadcasts dims after the channels (dim 1), so that each channel
    keeps its own values: a squeeze-excitation's x.view(b, c, 1, 1), unsqueeze(-1), [:, :, None, None], expand_as(x),
    a flatten(2); where the code gives the sizes, the channel count must be computed when it runs (x.size(), or -1),
    else a narrower tensor would not fit them."""
    shape_in, out = _shape(node.args[0]), _shape(node)
    if shape_in is None or out is None or len(shape_in) < 2 or len(out) < 2 or out[:2] != shape_in[:2]:
        return False
    if name in ("expand", "expand_as"):  # SENet's y.view(b, c, 1, 1).expand_as(x): each scale over its channel
        return name == "expand_as" or len(_sizes(node)) == len(out) and _computed(_sizes(node)[1])
    if math.prod(out[2:]) != math.prod(shape_in[2:]):
        return False
    arg = node.args[1] if len(node.args) > 1 else next(iter(node.kwargs.values()), None)
    if name in ("view", "reshape"):
        sizes = _sizes(node)
        return len(sizes) == len(out) and _computed(sizes[1])
    if name in ("unsqueeze", "flatten"):  # flatten(x, start_dim) from dim 2 on
        return isinstance(arg, int) and arg % (len(out) if name == "unsqueeze" else len(shape_in)) >= 2
    if name == "squeeze":  # a dim given (squeeze() would drop a batch of one)
        dims = arg if isinstance(arg, (list, tuple)) else [arg]
        return all(isinstance(d, int) and d % len(shape_in) >= 2 for d in dims)
    if node.target is operator.getitem:
        index = node.args[1] if isinstance(node.args[1], tuple) else (node.args[1],)
        return all(i is None or i is Ellipsis or i == slice(None) for i in index)
    return False


def _splits_channels(node: fx.Node, name: str) -> bool:
    """Whether `node` takes pieces of the channels by sizes the code fixes (torch.split(x, [8, 8], 1), x[:, :8])."""
    if name in ("split", "split_with_sizes", "tensor_split", "narrow"):
        dim = node.args[2] if len(node.args) > 2 else node.kwargs.get("dim", 0)
        return isinstance(dim, int) and dim in (1, -len(_shape(node.args[0]) or (0, 0)) + 1)
    if node.target is operator.getitem and isinstance(node.args[1], tuple) and len(node.args[1]) > 1:
        return node.args[1][0] == slice(None) and node.args[1][1] != slice(None)
    return False


def _swaps_1_2(node: fx.Node, name: str, ndim: int) -> bool:
    """Whether `node` is a transpose of dims 1 and 2 (or a permute that swaps only them)."""
    if name == "transpose":
        dims = [d % ndim for d in node.args[1:3] if isinstance(d, int)]
        return sorted(dims) == [1, 2]
    if name == "permute" and _permutation(node) is not None:
        return [d % ndim for d in _permutation(node)] == [0, 2, 1] + list(range(3, ndim))
    return False


def _inside_view(node: fx.Node) -> tuple[str, type] | None:
    """The ConvView (conv_views.py) whose re-arrangement of tensors `node` is part of, if any: its name and class."""
    stack = node.meta.get("nn_module_stack") or {}
    name, cls = next(reversed(stack.values()), (None, None))
    return (name, cls) if isinstance(cls, type) and issubclass(cls, ConvView) else None


def main_reason(groups: list[Group]) -> str:
    """The most frequent reason groups stay in place, but the classifier's outputs (every model has those) and ties
    (which follow from another reason): what an error should name. '' if none."""
    told = [g.reason for g in groups if g.reason and g.reason not in (OUTPUT, TIED)]
    return max(told, key=told.count) if told else next((g.reason for g in groups if g.reason), "")


def _selects_all(node: fx.Node) -> bool:
    """Whether an indexing `x[...]` selects all of x by slices from the start (GhostNet's `out[:, :self.out_chs]`
    where out has out_chs channels): it still does once channels are removed, as a slice's end may pass the size."""
    index = node.args[1] if isinstance(node.args[1], tuple) else (node.args[1],)
    return all(i is Ellipsis or isinstance(i, slice) and i.start in (None, 0) and i.step in (None, 1) for i in index) \
        and _shape(node) is not None and tuple(_shape(node)) == tuple(_shape(node.args[0]) or ())


def _chunks(node: fx.Node) -> int | None:
    """k of x.chunk(k, 1) / torch.chunk(x, k, 1) where x's channels (dim 1) split into k equal pieces, else None."""
    k = node.args[1] if len(node.args) > 1 else node.kwargs.get("chunks")
    dim = node.args[2] if len(node.args) > 2 else node.kwargs.get("dim", 0)
    shape = _shape(node.args[0])
    ok = isinstance(k, int) and k > 0 and shape is not None and len(shape) >= 2 and dim in (1, 1 - len(shape)) \
        and shape[1] % k == 0
    return k if ok else None


def channel_groups(model: nn.Module, example: torch.Tensor, purpose: str = "structured pruning",
                   nonstandard: dict[str, str] | None = None) -> list[Group]:
    """The dependency groups of `model` (eval mode, one example batch for the shapes); purpose names what needs
    them in the error an untraceable model gets; nonstandard: graph.nonstandard_layers(model, example) where the
    caller has it already."""
    try:
        gm = trace(model)
    except Exception as e:  # traced but for the parts fx cannot trace (called whole: their inputs stay)
        gm = partial_trace(model, example)
        if gm is None:
            first = str(e).splitlines()[0].split(". ")[0].rstrip(".")[:200]
            raise UserError(f"{purpose} needs a torch.fx trace of the model; {type(model).__name__} cannot be "
                            f"traced ({type(e).__name__}: {first}){_traceable_parts(model)}") from None
    with torch.no_grad():
        ShapeProp(gm).propagate(example)
    modules = dict(gm.named_modules())
    nonstandard = nonstandard_layers(model, example) if nonstandard is None else nonstandard
    slots = _Slots()
    of: dict[fx.Node, list[int]] = {}  # node -> slot of each channel (FIXED where none)
    consumers: dict[str, list[int]] = {}  # consumer module -> slot of each input column
    per_channel: dict[str, list[int]] = {}  # BatchNorm / depthwise conv / PReLU -> slot of each of its channels
    cdim: dict[fx.Node, int] = {}  # where a tensor's channels are: 1 (NCHW), or the last dim (channel-last)
    pieces: dict[fx.Node, list[list[int]]] = {}  # a chunk over channels -> the slots of each piece
    params: dict[fx.Node, str] = {}  # a tensor attribute along one axis (or a reshape of one) -> its name
    opaque = set(getattr(gm, "opaque_modules", ()))
    split: dict[fx.Node, tuple[int, list[int], bool]] = {}  # a channel shuffle's (N, g, C/g, ...) view ->
    # g, the slots of its input's channels, whether dims 1 and 2 are swapped

    def _channels(node) -> int | None:
        shape = _shape(node)
        d = cdim.get(node, 1)
        return int(shape[d]) if shape is not None and len(shape) >= 2 and d < len(shape) else None

    def fixed_list(node):
        c = _channels(node)
        return [FIXED] * c if c else []

    def normalized_together(node, x, target):
        fix_all(x, f"normalized together by {target} (a LayerNorm over channels: removing one changes the others)")
        return list(x)

    def flattened(x_node, node, name):  # (N, C, ...) -> (N, C·positions): each channel owns its positions
        x, shape, c_out = of[x_node], _shape(x_node), _channels(node)
        per = int(torch.tensor(shape[2:]).prod()) if len(shape) > 2 else 1
        if c_out != len(x) * per:
            fix_all(x, f"reshaped by {name} in a way structured pruning does not follow")
            return [FIXED] * c_out
        return [s for s in x for _ in range(per)]

    def fix_all(values, reason):
        for s in values:
            slots.fix(s, reason)

    def tied_params(node, x):  # a parameter that scales or shifts each channel (layer scale: x * gamma with gamma
        n = len(_shape(node) or ())  # (C, 1, 1)) keeps an entry per channel, sliced with them
        for a in node.all_input_nodes:
            shape = _shape(a) if a in params else None
            if shape:
                axis = next(j for j, size in enumerate(shape) if size == math.prod(shape))
                if n - len(shape) + axis == cdim[node] and shape[axis] == len(x):  # (else along positions)
                    read(per_channel, params[a], x)

    def spatial_only(node, fn):  # whether node works along dims other than the channels' (dim 1) only
        ndim = len(_shape(node.args[0]) or ())
        args = list(node.args[1:]) + list(node.kwargs.values())

        def dims(d):
            d = [d] if isinstance(d, int) else d
            return isinstance(d, (list, tuple)) and all(isinstance(i, int) for i in d) and \
                1 not in [i % ndim for i in d]

        if fn in _SOFTMAXES:
            return dims(node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else None))
        if fn is torch.nn.functional.pad:
            pad = node.kwargs.get("pad", node.args[1] if len(node.args) > 1 else None)
            return isinstance(pad, (list, tuple)) and len(pad) <= 2 * (ndim - 2)  # (it pads the last dims first)
        if fn in (torch.flip, "flip"):
            return dims(node.kwargs.get("dims", args[0] if args else None))
        if fn in (torch.roll, "roll"):
            return dims(node.kwargs.get("dims", node.args[2] if len(node.args) > 2 else None))
        if fn in (torch.transpose, "transpose", "swapaxes", torch.swapaxes):
            return len(args) >= 2 and dims(list(args[:2]))
        return False

    def in_shuffled_view(node, fn, name, view_name, tensors):  # a transposed conv whose kernel equals its stride:
        c_out = _channels(node)  # the view conv's rows (o, a, b) are output channel o's, its bias added per channel
        if fn in _PIXEL_SHUFFLES and tensors:
            return space_to_depth(of[tensors[0]], int(node.args[1]), True)
        if not tensors:  # (nothing with channels)
            return []
        if name in ("unsqueeze", "squeeze") and node.args[1:] == (-2,):  # a 1-D layer's unit height
            return list(of[tensors[0]])
        full = [of[t] for t in tensors if len(of[t]) == c_out]
        if (fn in _TIE_FUNCTIONS or fn in _TIE_METHODS) and len(full) == 1:
            read(per_channel, view_name, full[0])  # the bias: an entry per channel of the view
            return list(full[0])
        return None

    def space_to_depth(x, r, shuffle):  # pixel_shuffle: channel c of the output is channels c·r²..c·r²+r²−1 of
        k = r * r  # its input (tied: one unit, a sub-pixel conv's r² rows); pixel_unshuffle: the other way round
        return _tie_runs(slots, x, k) if shuffle else [s for s in x for _ in range(k)]

    produced: dict[str, list[int]] = {}  # producer module -> its output slots (one set for all its calls)

    def produce(target, n):
        if target not in produced:
            produced[target] = slots.new(target, n)
        return list(produced[target])

    def read(table, target, x):  # a module called again (shared weights: a detector head's convs on each level)
        if target in table:  # reads with the same weight columns, or writes with the same entries, both calls'
            for a, b in zip(table[target], x):  # channels: tied
                slots.union(a, b)
        else:
            table[target] = list(x)

    for node in gm.graph.nodes:
        args = [a for a in node.all_input_nodes if a in of]
        if node.op not in ("call_function", "call_method"):  # a module or the output reads a shuffle's inner view
            for a in node.all_input_nodes:
                if a in split:
                    fix_all(split[a][1], f"read by {node.target} after a view that splits the channels, which "
                                         "structured pruning does not follow")
        if node.op == "get_attr" and _one_axis(_attribute(gm, node.target)):  # a per-channel scale or shift, maybe
            params[node], of[node] = node.target, fixed_list(node)  # (its own entries where it meets the channels:
            # tied_params; elsewhere its channels stay, as any attribute's)
        elif node.op == "placeholder" or node.op == "get_attr":
            of[node] = fixed_list(node)
        elif node.op == "output":
            for a in args:
                fix_all(of[a], OUTPUT)
        elif node.op == "call_module":
            m = modules[node.target]
            x = of[node.args[0]] if node.args and node.args[0] in of else []
            in_dims = len(_shape(node.args[0]) or ()) if node.args else 0
            cdim[node] = cdim.get(node.args[0], 1) if node.args else 1
            owner = node.target.rpartition(".")[0]
            holder = model.get_submodule(owner) if owner else None
            if isinstance(m, nn.Conv2d) and isinstance(holder, ConvView):
                x = holder.view_columns(x)  # a ConvView's conv reads the original's channels in its own order
            if isinstance(m, nn.Conv2d):  # reads channels at dim 1 and writes them there, whatever came before
                if cdim[node] != 1 or len(x) != m.in_channels:  # (TResNet's space-to-depth: a view of a permute)
                    fix_all(x, f"read by {node.target}, a conv over a tensor whose channels it does not follow")
                    x = [FIXED] * m.in_channels
                cdim[node] = 1
            if node.target in nonstandard:  # its channels stay: a group of its own that says why (in the report)
                fix_all(x, f"read by {node.target}: {nonstandard[node.target]}")
                of[node] = produce(node.target, m.weight.shape[0])
                fix_all(of[node], f"written by {node.target}: {nonstandard[node.target]}")
            elif isinstance(m, nn.Conv2d) and m.groups == 1 or isinstance(m, nn.Linear):
                if isinstance(m, nn.Linear) and in_dims != 2:
                    if cdim[node] != in_dims - 1:  # a Linear reads the last dim: channels-last tensors only
                        fix_all(x, f"read by {node.target}, a Linear over a tensor whose last dim is not channels")
                        x = [FIXED] * m.in_features
                    cdim[node] = in_dims - 1
                read(consumers, node.target, x)
                of[node] = produce(node.target, m.weight.shape[0])
            elif isinstance(m, nn.Conv2d) and m.groups == m.in_channels == len(x) and m.out_channels % m.groups == 0:
                k = m.out_channels // m.groups  # depthwise: each input channel owns k output channels
                of[node] = [s for s in x for _ in range(k)]
                read(per_channel, node.target, of[node])
            elif isinstance(m, nn.Conv2d) and m.groups > 1 and len(x) == m.in_channels:
                read(consumers, node.target, _tie_groups(slots, x, m.groups))
                of[node] = produce(node.target, m.out_channels)
                _tie_groups(slots, of[node], m.groups)
            elif isinstance(m, nn.LayerNorm) and tuple(m.normalized_shape) == (len(x),) and \
                    cdim[node] == in_dims - 1:
                of[node] = normalized_together(node, x, node.target)
            elif isinstance(m, nn.Flatten) and node.args[0] in of and len(_shape(node) or ()) == 2 and \
                    cdim[node] == 1:
                of[node] = flattened(node.args[0], node, node.target)
            elif isinstance(m, nn.GroupNorm) and cdim[node] == 1 and len(x) == m.num_channels:
                _tie_runs(slots, x, m.num_channels // m.num_groups)  # normalized together: a group goes as one
                of[node] = list(x)
                read(per_channel, node.target, x)
            elif isinstance(m, (nn.PixelShuffle, nn.PixelUnshuffle)) and cdim[node] == 1:
                of[node] = space_to_depth(x, m.upscale_factor if isinstance(m, nn.PixelShuffle) else
                                          m.downscale_factor, isinstance(m, nn.PixelShuffle))
            elif isinstance(m, _PASS_MODULES):
                of[node] = list(x)
                if any(p.numel() == len(x) and len(x) > 1 for p in m.parameters(recurse=False)) or \
                        isinstance(m, nn.modules.batchnorm._NormBase):  # (an InstanceNorm's num_features too)
                    read(per_channel, node.target, x)
            else:  # (every tensor it reads: a part called whole may take a list of them)
                kind = type(m).__name__ + (f" with groups={m.groups}" if getattr(m, "groups", 1) != 1 else "")
                why = "a part torch.fx cannot trace, called whole" if node.target in opaque else \
                    "which structured pruning does not know"
                for a in args:
                    fix_all(of[a], f"read by {node.target} ({kind}), {why}")
                of[node] = fixed_list(node)
        elif node.op in ("call_function", "call_method"):
            fn = node.target
            name = fn if isinstance(fn, str) else getattr(fn, "__name__", str(fn))
            tensors = [a for a in node.args if isinstance(a, fx.Node) and a in of and _channels(a) and a not in params]
            cd = cdim[node] = cdim.get(tensors[0], 1) if tensors else 1
            sources = node.all_input_nodes
            c_out = _channels(node)
            view = _inside_view(node)
            inside = [a for a in node.all_input_nodes if a in split]
            if sources and all(params.get(a) == params.get(sources[0]) is not None for a in sources) and \
                    _one_axis(node.meta.get("tensor_meta")):  # the parameter reshaped (view(1, -1, 1, 1)), or
                # (sigmoid, exp)
                params[node], of[node] = params[sources[0]], fixed_list(node)  # an elementwise function of it
            elif inside:  # within a channel shuffle: its steps, else its channels stay
                g, x, swapped = split[inside[0]]
                if name in ("contiguous", "clone") or _swaps_1_2(node, name, len(_shape(inside[0]))):
                    split[node] = (g, x, swapped != (name not in ("contiguous", "clone")))
                elif len(inside) == 1 and node.args[0] is inside[0] and _channel_merge(node, name):
                    per = len(x) // g  # (N, C/g, g, ...) flattened: channel j of each piece in turn
                    of[node] = [x[k * per + j] for j in range(per) for k in range(g)] if swapped else list(x)
                    if swapped:
                        _tie_groups(slots, x, g)
                else:
                    fix_all(x, f"read by {name} after a view that splits the channels, which structured pruning "
                               "does not follow")
                    of[node] = fixed_list(node)
            elif tensors and cd == 1 and (g := _channel_split(node, name, _shape(tensors[0]))) is not None:
                split[node], of[node] = (g, list(of[tensors[0]]), False), []
            elif fn is operator.getitem and node.args[0] in pieces and isinstance(node.args[1], (int, slice)):
                chosen = pieces[node.args[0]][node.args[1]]  # a piece, or some of them (a slice)
                if isinstance(node.args[1], slice):
                    pieces[node], of[node] = chosen, []
                else:
                    of[node] = list(chosen)
            elif c_out is None and not tensors:
                of[node] = []
            elif view is not None:  # a unit height, zeros between pixels, depth taps: each channel moves whole
                if view[1].carries_channels and tensors:  # (the view conv maps them: ConvView.view_columns)
                    of[node] = list(of[tensors[0]])
                elif view[1].shuffles_rows and (moved := in_shuffled_view(node, fn, name, view[0], tensors)) \
                        is not None:
                    of[node] = moved
                else:
                    for t in tensors:
                        fix_all(of[t], f"at {view[0]}, a {model.get_submodule(view[0]).original}, whose channels "
                                       "structured pruning does not follow")
                    of[node] = fixed_list(node)
            elif fn in _PIXEL_SHUFFLES and tensors and cd == 1 and node.args[0] is tensors[0]:
                factor = node.args[1] if len(node.args) > 1 else next(iter(node.kwargs.values()))
                of[node] = space_to_depth(of[tensors[0]], int(factor), _PIXEL_SHUFFLES[fn])
            elif tensors and cd == 1 and node.args[0] is tensors[0] and spatial_only(node, fn):
                of[node] = list(of[tensors[0]])  # (a softmax over positions, a spatial pad, flip or roll)
            elif fn in _SOFTMAXES and tensors and cd == 1:
                of[node] = normalized_together(node, of[tensors[0]], name)
            elif fn in (torch.permute, "permute") and tensors and _permutation(node) is not None:
                dims = [d % len(_shape(tensors[0])) for d in _permutation(node)]
                cdim[node] = dims.index(cd)  # the channels move with their dim
                of[node] = list(of[tensors[0]])
            elif fn is torch.nn.functional.layer_norm and tensors and cd == len(_shape(tensors[0])) - 1 and \
                    tuple(node.args[1] if len(node.args) > 1 else node.kwargs["normalized_shape"]) == (c_out,):
                of[node] = normalized_together(node, of[tensors[0]], "layer_norm")
            elif cd != 1 and fn not in _PASS_FUNCTIONS and fn not in _PASS_METHODS and fn not in _TIE_FUNCTIONS \
                    and fn not in _TIE_METHODS and name != "stochastic_depth":
                for t in tensors:  # reshapes and reductions below assume channels at dim 1
                    fix_all(of[t], f"read by {name} on a channels-last tensor, which structured pruning does not "
                                   "follow")
                of[node] = fixed_list(node)
            elif (fn in _PASS_FUNCTIONS or fn in _PASS_METHODS or name == "stochastic_depth") and tensors:
                of[node] = list(of[tensors[0]])
            elif (fn in _TIE_FUNCTIONS or fn in _TIE_METHODS) and len({cdim.get(t, 1) for t in tensors if len(
                    _shape(t) or ()) == len(_shape(node) or ())}) > 1:  # (B, N, C) tokens with dim 1 read as channels
                for t in tensors:
                    fix_all(of[t], f"{name} of tensors whose channels lie at different dims, which structured pruning "
                                   "does not follow")
                of[node] = fixed_list(node)
            elif fn in _TIE_FUNCTIONS or fn in _TIE_METHODS:
                full = [of[t] for t in tensors if len(of[t]) == c_out]
                for other in full[1:]:
                    for a, b in zip(full[0], other):
                        slots.union(a, b)
                of[node] = list(full[0]) if full else fixed_list(node)
                if full:
                    tied_params(node, full[0])
            elif fn in (torch.cat, torch.concat) and (node.kwargs.get("dim", node.args[1] if len(node.args) > 1
                                                                    else 0) in (1, -3)) and \
                    (isinstance(node.args[0], (list, tuple)) or node.args[0] in pieces):
                if node.args[0] in pieces:  # the pieces of a chunk, as they are (a tuple or a slice of it)
                    of[node] = [s for piece in pieces[node.args[0]] for s in piece]
                else:
                    of[node] = [s for p in node.args[0] for s in of.get(p, [FIXED] * (_channels(p) or 0))]
            elif fn in (torch.flatten, "flatten", "view", "reshape") and tensors and c_out is not None \
                    and len(node.meta["tensor_meta"].shape) == 2:
                of[node] = flattened(tensors[0], node, name)
            elif fn in (torch.mean, "mean", torch.sum, "sum", torch.amax, "amax") and tensors and c_out == len(
                    of[tensors[0]]):
                of[node] = list(of[tensors[0]])  # a reduction over positions
            elif name == "chunk" and tensors and _chunks(node) is not None:
                k, x = _chunks(node), of[tensors[0]]  # each piece's j-th channels go together: a smaller tensor
                per = len(x) // k  # still splits where the pieces meet (Ultralytics' C2f: cv1(x).chunk(2, 1))
                pieces[node] = [x[i * per:(i + 1) * per] for i in range(k)]
                _tie_groups(slots, x, k)
                of[node] = []
            elif fn is operator.getitem and tensors and _selects_all(node):
                of[node] = list(of[tensors[0]])
            elif cd == 1 and tensors and node.args[0] is tensors[0] and _keeps_channels(node, name):
                of[node] = list(of[tensors[0]])  # an SE's scales as (N, C, 1, 1): each channel's values stay its own
            elif name in ("size", "dim", "getattr") or fn is getattr:
                of[node] = []
            else:
                why = f"read by {name}, " + ("which splits it into channel counts fixed in the code (a narrower tensor "
                                             "would not fit them; x.chunk(k, 1) would follow it)"
                                             if cd == 1 and _splits_channels(node, name) else
                                             "which structured pruning does not know")
                for t in tensors:
                    fix_all(of[t], why)
                of[node] = fixed_list(node)
        else:
            of[node] = fixed_list(node)

    shuffled = {f"{name}.conv": m.geometry["stride"][0] * m.geometry["stride"][1] for name, m in model.named_modules()
                if isinstance(m, ConvView) and m.shuffles_rows}  # view conv -> its rows per output channel
    # units: classes of tied slots; groups: producers whose slots share classes
    units: dict[int, Unit] = {}
    for s, (producer, ch) in enumerate(slots.owner):
        r = slots.find(s)
        units.setdefault(r, Unit()).rows.setdefault(producer, []).append(ch)
    for consumer, cols in consumers.items():
        for j, s in enumerate(cols):
            if s != FIXED:
                units[slots.find(s)].columns.setdefault(consumer, []).append(j)
    for module, chans in per_channel.items():
        for j, s in enumerate(chans):
            if s != FIXED:
                units[slots.find(s)].entries.setdefault(module, []).append(j)
    for r, reason in slots.fixed.items():
        units[slots.find(r)].fixed = reason
    parent = {}

    def top(p):
        while parent.setdefault(p, p) != p:
            p = parent[p]
        return p

    for u in units.values():
        names = list(u.rows)
        for other in names[1:]:
            parent[top(other)] = top(names[0])
    by_group: dict[str, list[Unit]] = {}
    for u in units.values():
        by_group.setdefault(top(next(iter(u.rows))), []).append(u)
    groups = []
    for members in by_group.values():
        producers = sorted({p for u in members for p in u.rows}, key=list(modules).index)
        first = producers[0]
        members.sort(key=lambda u: u.rows.get(first, [1 << 30])[0])
        if len(members) == 1 and not members[0].fixed:
            members[0].fixed = ONE_UNIT
        reason = "" if any(not u.fixed for u in members) else members[0].fixed
        groups.append(Group(producers, members, reason, {p: shuffled[p] for p in producers if p in shuffled}))
    for part in opaque:  # the channels between the layers of its children that fx traces alone
        groups += _inside_part(model, part, example, nonstandard)
    groups.sort(key=lambda g: list(modules).index(g.producers[0]))
    return groups


def _traceable_parts(model: nn.Module) -> str:
    """For the error of a model fx cannot trace: its top-level parts that fx traces alone, with their share of the
    model's Conv2d/Linear weights (a torchvision detector's backbone), to be pruned on their own."""
    def weights(m):
        return sum(layer.weight.numel() for layer in m.modules() if isinstance(layer, (nn.Conv2d, nn.Linear)))

    total, found = max(weights(model), 1), []
    for name, child in model.named_children():
        w = weights(child)
        if w and not isinstance(child, (nn.Conv2d, nn.Linear)):  # (a layer alone has no channels to free)
            try:
                trace(child)
            except Exception:
                continue
            found.append((w / total, name))
    if not found:
        return ""
    named = ", ".join(f"{name} ({share:.0%} of its layers' weights)" for share, name in sorted(found, reverse=True)[:3])
    return (f". Its part{'s' * (len(found) > 1)} {named} trace{'s' * (len(found) == 1)} alone: prune "
            f"{'them' if len(found) > 1 else 'it'} from Python on the inputs the model gives "
            f"{'them' if len(found) > 1 else 'it'} (README: a torchvision detector's backbone)")


def _inside_part(model: nn.Module, path: str, example: torch.Tensor, nonstandard: dict[str, str]) -> list[Group]:
    """The removable groups inside the children of `path`, a part fx cannot trace (called whole), that fx traces
    alone, each walked as a model of its own on the input it gets: the part's code reads their inputs and outputs,
    so those stay, and the channels between their layers may go (an Ultralytics Detect head's branches, each
    conv, conv, conv: 41% of YOLOv8n's multiply-adds). A child that is never called itself (a ModuleList) is looked
    into."""
    groups = []
    for name, child in model.get_submodule(path).named_children():
        sub = f"{path}.{name}"
        try:
            (args, kwargs), = calls_of(model, child, [example])
        except IndexError:  # not called: its children may be
            groups += _inside_part(model, sub, example, nonstandard)
            continue
        if kwargs or len(args) != 1 or not isinstance(args[0], torch.Tensor):
            continue
        inner = {k[len(sub) + 1:]: v for k, v in nonstandard.items() if k.startswith(f"{sub}.")}
        try:
            found = channel_groups(child, args[0], nonstandard=inner)
        except UserError:  # fx cannot trace it alone either
            continue
        groups += [_prefixed(g, sub) for g in found if g.removable]
    return groups


def _prefixed(g: Group, path: str) -> Group:
    """A group found in submodule `path` walked alone, named as in the whole model."""
    def names(d):
        return {f"{path}.{k}": v for k, v in d.items()}
    return Group([f"{path}.{n}" for n in g.producers],
                 [Unit(names(u.rows), names(u.columns), names(u.entries), u.fixed) for u in g.units], g.reason)
