"""Structured (channel) pruning: dependency groups, block OBS against a float64 reference, the smaller network
against the masked one, and the run folder of a structured prune (reload, export)."""
import copy
import dataclasses

import pytest
import torch
import torchvision
from torch import nn

from cnn_sparsegpt import PUBLISHED, UserError, prune_model
from cnn_sparsegpt.kernels.block_obs import BlockOBS, damped_inverse, refit_without
from cnn_sparsegpt.pruning.channels import channel_groups
from cnn_sparsegpt.pruning.layer_plan import forward_order
from cnn_sparsegpt.pruning.slicing import apply_structure, removal_plan, slice_channels_, spec_of

from .test_prune_model import TinyResNet, calib, make


def _producers(groups):
    return {tuple(g.producers) for g in groups if g.removable}


def test_groups_of_a_residual_network():
    groups = channel_groups(make(TinyResNet), calib(1))
    by_first = {g.producers[0]: g for g in groups}
    # the stem's channels and the block's skip path are one residual stream; the classifier's outputs stay
    assert ("block.conv1",) in _producers(groups)
    assert by_first["fc"].reason == "reaches the model's output" and not by_first["fc"].removable
    for g in groups:
        for u in g.units:
            assert u.fixed or u.rows  # every removable unit has a producer row


def test_a_grouped_conv_ties_channel_j_of_each_group():
    """Its groups keep equal widths: a unit is channel j of every group, on its input and on its output."""
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 6, 3, padding=1, groups=2),
                          nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 3))
    by_first = {g.producers[0]: g for g in channel_groups(model, calib(1))}
    a, b = by_first["0"], by_first["2"]
    assert a.width == 2 and [u.rows["0"] for u in a.units] == [[j, 4 + j] for j in range(4)]
    assert [u.columns["2"] for u in a.units] == [[j] for j in range(4)]  # the weight's column j, in each group
    assert b.width == 2 and [u.rows["2"] for u in b.units] == [[j, 3 + j] for j in range(3)]
    assert [u.columns["6"] for u in b.units] == [[j, 3 + j] for j in range(3)]
    assert len(a.removable) == 4 and len(b.removable) == 3
    assert a.unit_step(8) == 4 and a.unit_step(1) == 1  # round_to counts channels: 4 units of 2


class DepthwiseMultiplier(nn.Module):
    """A depthwise conv with channel multiplier 2: each input channel owns two outputs (and their BatchNorm
    entries), and goes with them."""

    def __init__(self):
        super().__init__()
        self.stem, self.bn0 = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.dw, self.bn1 = nn.Conv2d(8, 16, 3, padding=1, groups=8, bias=False), nn.BatchNorm2d(16)
        self.pw = nn.Conv2d(16, 12, 1)
        self.fc = nn.Linear(12, 5)

    def forward(self, x):
        y = torch.relu(self.bn1(self.dw(torch.relu(self.bn0(self.stem(x))))))
        return self.fc(torch.relu(self.pw(y)).mean((2, 3)))


def test_a_depthwise_conv_with_a_channel_multiplier_goes_with_its_input():
    model = make(DepthwiseMultiplier)
    by_first = {g.producers[0]: g for g in channel_groups(model, calib(1))}
    stem = by_first["stem"]
    assert len(stem.removable) == 8 and stem.units[3].entries == {"bn0": [3], "dw": [6, 7], "bn1": [6, 7]}
    assert stem.units[3].columns == {"pw": [6, 7]}
    x = calib(64)
    rep = prune_model(model, x, structure="channels", keep_macs=0.7, round_to=2, progress=False)
    assert rep.structure["macs"][1] <= 0.7 * rep.structure["macs"][0]
    dw = model.dw
    assert dw.groups == dw.in_channels == model.stem.out_channels and dw.out_channels == 2 * dw.in_channels
    fresh = apply_structure(make(DepthwiseMultiplier), rep.structure["spec"])
    fresh.load_state_dict(model.state_dict())
    torch.testing.assert_close(fresh.eval()(x), model(x))


class GroupedBottleneck(nn.Module):
    """A ResNeXt block: 1x1, a 3x3 conv in 4 groups, 1x1, on a residual stream."""

    def __init__(self):
        super().__init__()
        self.stem, self.bn0 = nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16)
        self.conv1, self.bn1 = nn.Conv2d(16, 24, 1, bias=False), nn.BatchNorm2d(24)
        self.conv2, self.bn2 = nn.Conv2d(24, 24, 3, padding=1, groups=4, bias=False), nn.BatchNorm2d(24)
        self.conv3, self.bn3 = nn.Conv2d(24, 16, 1, bias=False), nn.BatchNorm2d(16)
        self.fc = nn.Linear(16, 5)

    def forward(self, x):
        x = torch.relu(self.bn0(self.stem(x)))
        y = torch.relu(self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x))))))
        return self.fc(torch.relu(x + self.bn3(self.conv3(y))).mean((2, 3)))


class Concat(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, padding=1)
        self.b = nn.Conv2d(3, 4, 1)
        self.bn = nn.BatchNorm2d(12)
        self.c = nn.Conv2d(12, 6, 3, padding=1)
        self.fc = nn.Linear(6 * 4 * 4, 5)

    def forward(self, x):
        y = torch.relu(self.bn(torch.cat([self.a(x), self.b(x)], 1)))
        y = nn.functional.adaptive_avg_pool2d(self.c(y), 4)
        return self.fc(torch.flatten(y, 1))


class Shuffled(nn.Module):
    """Two ShuffleNetV2 units (torchvision's channel_shuffle between them): a downsampling unit whose two branches
    are concatenated, then a unit that passes half its channels through (chunk) and transforms the other half."""

    def __init__(self, literal_sizes=False):
        super().__init__()
        self.literal_sizes = literal_sizes
        self.stem, self.bn0 = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.left, self.bnl = nn.Conv2d(8, 12, 1, bias=False), nn.BatchNorm2d(12)
        self.right, self.bnr = nn.Conv2d(8, 12, 3, padding=1, bias=False), nn.BatchNorm2d(12)
        self.inner, self.bni = nn.Conv2d(12, 10, 1, bias=False), nn.BatchNorm2d(10)
        self.outer, self.bno = nn.Conv2d(10, 12, 3, padding=1, bias=False), nn.BatchNorm2d(12)
        self.last, self.bn9 = nn.Conv2d(24, 16, 1, bias=False), nn.BatchNorm2d(16)
        self.fc = nn.Linear(16, 5)

    def shuffle(self, x):
        if self.literal_sizes:  # sizes fixed in the code: a narrower tensor would not fit them
            return x.view(x.shape[0], 2, 12, 8, 8).transpose(1, 2).reshape(x.shape[0], 24, 8, 8)
        return torchvision.models.shufflenetv2.channel_shuffle(x, 2)

    def forward(self, x):
        x = torch.relu(self.bn0(self.stem(x)))
        x = self.shuffle(torch.cat([torch.relu(self.bnl(self.left(x))), torch.relu(self.bnr(self.right(x)))], 1))
        a, b = x.chunk(2, dim=1)
        b = torch.relu(self.bno(self.outer(torch.relu(self.bni(self.inner(b))))))
        x = self.shuffle(torch.cat([a, b], 1))
        return self.fc(torch.relu(self.bn9(self.last(x))).mean((2, 3)))


class SharedHead(nn.Module):
    """A detector-style head whose convs (one weight) run on two feature maps of different sizes."""

    def __init__(self):
        super().__init__()
        self.a = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU())
        self.b = nn.Sequential(nn.Conv2d(16, 16, 3, stride=2, padding=1), nn.BatchNorm2d(16), nn.ReLU())
        self.head = nn.Sequential(nn.Conv2d(16, 24, 3, padding=1), nn.BatchNorm2d(24), nn.ReLU(), nn.Conv2d(24, 8, 1))

    def forward(self, x):
        f1 = self.a(x)
        return torch.cat([self.head(f).flatten(1) for f in (f1, self.b(f1))], 1)


def test_a_module_called_twice_ties_what_both_calls_read_and_counts_both_calls():
    """Before, the second call's input replaced the first's as the head conv's columns: a's and b's channels were
    separate groups, the slicing cut the shared conv for one of them, and the re-fit pass crashed (a traceback); the
    multiply-adds counted the first call only."""
    model = make(SharedHead)
    groups = channel_groups(model, calib(1))
    assert _producers(groups) == {("a.0", "b.0"), ("head.0",)}
    shared = next(g for g in groups if g.producers == ["a.0", "b.0"])
    assert all(u.columns == {"b.0": [i], "head.0": [i]} for i, u in enumerate(shared.units))
    positions = {}
    forward_order(model, calib(1), positions=positions)
    assert positions["head.0"] == 8 * 8 + 4 * 4 and positions["a.0"] == 8 * 8
    rep = prune_model(model, calib(), structure="channels", keep_macs=0.7, outputs="values", round_to=1,
                      progress=False)
    assert model.a[0].out_channels == model.b[0].out_channels == model.head[0].in_channels
    macs = 8 * 8 * 27 * 16 + 4 * 4 * 144 * 16 + (8 * 8 + 4 * 4) * (144 * 24 + 24 * 8)
    assert rep.structure["macs"][0] == macs and rep.structure["macs"][1] <= 0.7 * macs


class PixelShuffles(nn.Module):
    """A space-to-depth stem and sub-pixel up-sampling (a super-resolution network's), as modules and as functions."""

    def __init__(self):
        super().__init__()
        self.a, self.down = nn.Conv2d(3, 16, 3, padding=1), nn.PixelUnshuffle(2)
        self.b, self.up = nn.Conv2d(64, 32, 3, padding=1), nn.PixelShuffle(2)
        self.c, self.d = nn.Conv2d(8, 24, 3, padding=1), nn.Conv2d(6, 4, 1)
        self.fc = nn.Linear(4, 5)

    def forward(self, x):
        y = torch.relu(self.b(self.down(torch.relu(self.a(x)))))  # 8×8 -> 4×4, 64 channels
        y = torch.relu(self.c(self.up(y)))  # back to 8×8: channel j of up's output is b's channels 4j..4j+3
        y = nn.functional.pixel_shuffle(y, 2)
        return self.fc(self.d(y).mean((2, 3)))


def test_pixel_shuffles_tie_a_sub_pixel_convs_rows_and_spread_a_channel_over_its_columns():
    """pixel_shuffle's output channel j is its input's channels j·r²..j·r²+r²−1: they go together, as one unit of
    the producer (before, every channel a shuffle read stayed: 'which structured pruning does not know');
    pixel_unshuffle spreads a channel over r² consecutive columns of its consumer."""
    groups = {tuple(g.producers): g for g in channel_groups(make(PixelShuffles), calib(1))}
    assert all(u.columns == {"b": list(range(4 * i, 4 * i + 4))} for i, u in enumerate(groups["a",].units))
    assert [u.rows for u in groups["b",].units] == [{"b": list(range(4 * j, 4 * j + 4))} for j in range(8)]
    assert [u.columns for u in groups["b",].units] == [{"c": [j]} for j in range(8)]
    assert len(groups["c",].units) == 6 and not groups["c",].reason and groups["c",].width == 4
    model, x = make(PixelShuffles), calib(64)
    rep = prune_model(model, x, structure="channels", keep_macs=0.6, round_to=4, progress=False)
    assert rep.structure["macs"][1] <= 0.6 * rep.structure["macs"][0] and model.b.out_channels % 4 == 0
    fresh = apply_structure(make(PixelShuffles), rep.structure["spec"])
    fresh.load_state_dict(model.state_dict())
    torch.testing.assert_close(fresh.eval()(x), model(x))


class UserOps(nn.Module):
    """Elementwise arithmetic, InstanceNorms (affine and not), spatial pads, flips and softmaxes between convs, as a
    user's code writes them: each channel's values stay its own."""

    def __init__(self):
        super().__init__()
        self.a, self.norm = nn.Conv2d(3, 16, 3, padding=1), nn.InstanceNorm2d(16, affine=True)
        self.b, self.plain = nn.Conv2d(16, 16, 3), nn.InstanceNorm2d(16)
        self.c, self.group = nn.Conv2d(16, 8, 1), nn.GroupNorm(4, 16)

    def forward(self, x):
        y = self.norm(self.group(self.a(x))).clamp(-3, 3) / 2
        y = torch.where(y > 0, y, 0.1 * y)
        y = nn.functional.pad(torch.flip(y, dims=[3]), (1, 1, 1, 1), mode="reflect")
        z = self.plain(self.b(y))
        return self.c(z.softmax(-1) + z.float() ** 2).mean((2, 3))


class _LibraryGroupNorm(nn.GroupNorm):
    """A model library's GroupNorm (timm's): a subclass whose forward calls the function, which fx would trace into
    (a `group_norm` call the walk does not follow) were it not kept a module call (graph.LEAVES)."""

    def forward(self, x):
        return nn.functional.group_norm(x, self.num_groups, self.weight, self.bias, self.eps)


# an op between two convs -> whether the first one's channels may go
BETWEEN = {
    "pad": (lambda y: nn.functional.pad(y, (1, 1, 1, 1)), True), "clamp": (lambda y: y.clamp(0, 6), True),
    "divide": (lambda y: y / 2, True), "negate": (lambda y: -y, True), "exp": (torch.exp, True),
    "power": (lambda y: y ** 2, True), "where": (lambda y: torch.where(y > 0, y, 0.1 * y), True),
    "softmax over positions": (lambda y: y.softmax(-1), True), "flip": (lambda y: y.flip(3), True),
    "roll": (lambda y: torch.roll(y, 1, dims=2), True), "transpose": (lambda y: y.transpose(2, 3), True),
    "dtype": (lambda y: y.float(), True), "instance norm": (nn.InstanceNorm2d(16), True),
    "softmax over channels": (lambda y: y.softmax(1), False), "pad channels": (lambda y: nn.functional.pad(
        y, (0, 0, 0, 0, 1, 1))[:, 1:-1], False), "flip channels": (lambda y: y.flip(1), False),
    "group norm": (nn.GroupNorm(4, 16), True), "a library's group norm": (_LibraryGroupNorm(4, 16), True),
}


@pytest.mark.parametrize("op", BETWEEN)
def test_elementwise_and_spatial_ops_keep_each_channel_its_own(op):
    """Before, each of the first thirteen and the GroupNorm fixed every channel it read ('which structured pruning does
    not know'); a GroupNorm's channels go a group at a time."""
    f, free = BETWEEN[op]

    class Between(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.f, self.b = nn.Conv2d(3, 16, 3, padding=1), f, nn.Conv2d(16, 8, 3, padding=1)

        def forward(self, x):
            return self.b(self.f(self.a(x))).mean((2, 3))

    group = next(g for g in channel_groups(Between().eval(), calib(1)) if g.producers == ["a"])
    assert bool(group.removable) == free, group.reason


class LayerScale(nn.Module):
    """Parameters that scale or shift each channel as user code holds them: (C, 1, 1), (1, C, 1, 1), and (C,)
    reshaped through a sigmoid; and one along the positions (1, 1, H, W), which leaves the channels alone."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = nn.Conv2d(3, 16, 3, padding=1), nn.Conv2d(16, 16, 3, padding=1), nn.Conv2d(16, 8, 1)
        self.gamma, self.beta = nn.Parameter(torch.rand(16, 1, 1) + 0.5), nn.Parameter(torch.randn(1, 16, 1, 1))
        self.gate, self.where = nn.Parameter(torch.randn(16)), nn.Parameter(torch.randn(1, 1, 8, 8))

    def forward(self, x):
        y = torch.relu(self.a(x)) * self.gamma + self.beta + self.where
        y = torch.relu(self.b(y)) * self.gate.sigmoid().view(1, -1, 1, 1)
        return self.c(y).mean((2, 3))


def test_a_per_channel_parameter_keeps_an_entry_per_channel_and_is_sliced_with_them():
    """Before, a (C, 1, 1) scale was not seen as per-channel: the prune sliced the channels and not the scale, and the
    smaller network stopped with a size RuntimeError (a traceback); a (1, C, 1, 1) one or a reshaped (C,) one fixed
    every channel it met."""
    groups = {tuple(g.producers): g for g in channel_groups(make(LayerScale), calib(1))}
    assert [u.entries for u in groups["a",].units] == [{"gamma": [i], "beta": [i]} for i in range(16)]
    assert [u.entries for u in groups["b",].units] == [{"gate": [i]} for i in range(16)]
    model, x = make(LayerScale), calib(64)
    rep = prune_model(model, x, structure="channels", keep_macs=0.5, round_to=4, progress=False)
    kept = model.a.out_channels
    assert kept < 16 and model.gamma.shape == (kept, 1, 1) and model.beta.shape == (1, kept, 1, 1)
    assert model.gate.shape == (model.b.out_channels,) and model.where.shape == (1, 1, 8, 8)
    fresh = apply_structure(make(LayerScale), rep.structure["spec"])
    fresh.load_state_dict(model.state_dict())
    torch.testing.assert_close(fresh.eval()(x), model(x))


class UserSE(nn.Module):
    """Squeeze-excitation as user code writes it: Linear layers on the pooled channels, their scales brought back
    as (N, C, 1, 1) by a view, unsqueezes or None-indexing (form), multiplying the block's output."""

    def __init__(self, form="view"):
        super().__init__()
        self.form = form
        self.stem, self.bn0 = nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16)
        self.conv, self.bn = nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16)
        self.squeeze, self.excite = nn.Linear(16, 8), nn.Linear(8, 16)
        self.fc = nn.Linear(16, 5)

    def forward(self, x):
        x = torch.relu(self.bn0(self.stem(x)))
        y = self.bn(self.conv(x))
        b, c, _, _ = y.size()
        s = torch.sigmoid(self.excite(torch.relu(self.squeeze(y.mean((2, 3))))))
        s = {"view": lambda: s.view(b, c, 1, 1), "unsqueeze": lambda: s.unsqueeze(-1).unsqueeze(-1),
             "index": lambda: s[:, :, None, None], "expand": lambda: s.view(b, c, 1, 1).expand_as(y),
             "literal": lambda: s.view(b, 16, 1, 1)}[self.form]()
        return self.fc(torch.relu(x + y * s).mean((2, 3)))


@pytest.mark.parametrize("form", ["view", "unsqueeze", "index", "expand", "literal"])
def test_a_squeeze_excitation_of_linear_layers_ties_its_scales_to_the_channels_they_scale(form):
    """Before, the scales' view, unsqueeze or [:, :, None, None] fixed every channel of the stream they multiply
    ('read by view'); a view whose channel count is a number in the code still does (a narrower tensor would not fit
    it)."""
    groups = channel_groups(make(lambda: UserSE(form)), calib(1))
    stream = next(g for g in groups if "stem" in g.producers)
    if form == "literal":
        assert not stream.removable and "view" in next(g for g in groups if "excite" in g.producers).reason
        return
    assert set(stream.producers) == {"stem", "conv", "excite"} and len(stream.removable) == 16
    assert stream.units[3].columns == {"conv": [3], "squeeze": [3], "fc": [3]}


def test_a_split_into_sizes_the_code_fixes_says_so():
    class Split(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.c = nn.Conv2d(3, 16, 3), nn.Conv2d(8, 8, 3, padding=1), nn.Conv2d(16, 4, 1)

        def forward(self, x):
            u, v = torch.split(self.a(x), [8, 8], 1)
            return self.c(torch.cat([self.b(u), v], 1))

    reason = next(g.reason for g in channel_groups(Split(), calib(1)) if g.producers == ["a"])
    assert reason.startswith("read by split, which splits it into channel counts fixed in the code")


class TinyRetina(nn.Module):
    """A backbone's two feature maps read only by torchvision's RetinaNetHead, whose convs run on both maps with one
    weight (what the README's recipe prunes for a RetinaNet: backbone and head as one module)."""

    def __init__(self):
        super().__init__()
        from torchvision.models.detection.retinanet import RetinaNetHead
        self.a = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU())
        self.b = nn.Sequential(nn.Conv2d(16, 16, 3, stride=2, padding=1), nn.BatchNorm2d(16), nn.ReLU())
        self.head = RetinaNetHead(16, num_anchors=3, num_classes=4)

    def forward(self, x):
        f1 = self.a(x)
        return self.head([f1, self.b(f1)])


def test_a_retinanet_head_on_every_map_loses_inner_channels_and_keeps_its_outputs():
    model, x = make(TinyRetina), calib(128)
    dense = {k: v.shape for k, v in model(x[:2]).items()}
    prune_model(model, x, structure="channels", keep_macs=0.6, outputs="values", round_to=1, progress=False)
    inner = [m.out_channels for h in (model.head.classification_head, model.head.regression_head)
             for m in h.conv.modules() if isinstance(m, nn.Conv2d)]
    assert min(inner) < 16 and {k: v.shape for k, v in model(x[:2]).items()} == dense


def test_a_channel_shuffle_interleaves_the_pieces_and_ties_channel_j_of_each():
    """ShuffleNetV2's streams were fixed ('read by view'): a shuffle moves channel j of piece k to 2j + k, so the
    two concatenated halves lose the same channels (j with 12 + j), and a chunk after it ties them further."""
    groups = channel_groups(make(Shuffled), calib(1))
    stream = next(g for g in groups if "left" in g.producers)
    assert set(stream.producers) == {"left", "right", "outer"} and len(stream.removable) == len(stream.units)
    # channel j of left, right and outer go together (a chunk of the first shuffle's output is a's and b's pieces)
    assert all(u.rows["left"] == u.rows["right"] for u in stream.units)
    last = [c for u in stream.units for c in u.columns["last"]]
    assert sorted(last) == list(range(24)) and len(stream.units) * stream.width == 12
    fixed = channel_groups(make(lambda: Shuffled(literal_sizes=True)), calib(1))
    assert not next(g for g in fixed if "left" in g.producers).removable
    assert "view" in next(g for g in fixed if "left" in g.producers).reason


def test_concat_and_flatten_map_channels_to_columns():
    groups = channel_groups(Concat().eval(), torch.randn(1, 3, 8, 8))
    by_first = {g.producers[0]: g for g in groups}
    b = by_first["b"]  # its channel j is channel 8 + j of the concat: column 8 + j of c and entry 8 + j of bn
    assert [u.columns["c"] for u in b.units] == [[8 + j] for j in range(4)]
    assert [u.entries["bn"] for u in b.units] == [[8 + j] for j in range(4)]
    c = by_first["c"]  # flatten: each channel of c owns its 16 positions in fc's columns
    assert c.units[2].columns["fc"] == list(range(32, 48))


@pytest.mark.parametrize("name", ["mobilenet_v3_small", "efficientnet_b0"])
def test_groups_of_torchvision_models(name):
    model = getattr(torchvision.models, name)(num_classes=10).eval()
    groups = channel_groups(model, torch.randn(1, 3, 64, 64))
    removable = [g for g in groups if g.removable]
    assert len(removable) >= 10
    # squeeze-excitation ties a depthwise stage's channels to the SE expansion conv's outputs: one group
    assert any(len(g.producers) >= 2 for g in removable)
    dw = [u for g in removable for u in g.units if any("block" in e or "features" in e for e in u.entries)]
    assert dw  # the depthwise convs and BatchNorms on a channel's path lose their entries with it


def test_convnext_prunes_its_mlp_channels_and_keeps_the_layer_normed_stream():
    """Channels-last blocks: permutes followed, each block's MLP hidden (Linear -> GELU -> Linear over NHWC) is a
    group; the residual stream is normalized across channels by LayerNorms, so it stays, with that reason."""
    model = torchvision.models.convnext_tiny(num_classes=10).eval()
    groups = channel_groups(model, torch.randn(1, 3, 32, 32))
    removable = [g for g in groups if g.removable]
    assert len(removable) == 18  # 3 + 3 + 9 + 3 blocks
    for g in removable:
        assert len(g.producers) == 1 and g.producers[0].endswith("block.3")
        assert list(g.units[0].columns) == [g.producers[0][:-1] + "5"] and g.units[0].columns[g.producers[0][:-1]
                                                                                             + "5"] == [0]
    assert any("LayerNorm over channels" in u.fixed for g in groups for u in g.units)


def test_untraceable_model_is_a_clear_error():
    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.c = nn.Conv2d(3, 8, 3)

        def forward(self, x):
            return self.c(x) if x.sum() > 0 else -self.c(x)

    with pytest.raises(UserError, match="cannot be traced") as e:
        channel_groups(Branchy(), torch.randn(1, 3, 8, 8))
    assert "alone" not in str(e.value)  # a single layer is no part to prune alone

    class Detector(nn.Module):  # a torchvision detector's shape: a backbone fx traces, a forward it cannot
        def __init__(self):
            super().__init__()
            self.backbone = TinyResNet()
            self.head = nn.Linear(5, 4)

        def forward(self, images):
            return [self.head(self.backbone(x[None])) for x in images]

    with pytest.raises(UserError, match=r"cannot be traced \(TraceError: Proxy object cannot be iterated\)\. Its "
                                        r"part backbone \(\d+% of its layers' weights\) traces alone: prune it"):
        channel_groups(Detector(), torch.randn(1, 3, 8, 8))


def _reference_block_obs(W, H, blocks, k):
    """Float64 brute force: the greedy removal of k blocks, each step trying every block with a full re-solve."""
    removed = []
    for _ in range(k):
        best = None
        for i in range(len(blocks)):
            if i in removed:
                continue
            cols = torch.cat([blocks[j] for j in removed + [i]])
            Q = refit_without(W, H, cols, 0.0)
            err = float(((W - Q) @ H * (W - Q)).sum())
            if best is None or err < best[0]:
                best = (err, i, Q)
        removed.append(best[1])
    return removed, best[0], best[2]


def test_block_obs_agrees_with_a_float64_reference():
    g = torch.Generator().manual_seed(0)
    X = torch.randn(24, 400, generator=g, dtype=torch.float64)
    X[1] += 0.8 * X[0]  # correlated inputs: the update matters
    H = X @ X.t() / 400
    W = torch.randn(5, 24, generator=g, dtype=torch.float64)
    blocks = torch.arange(24).reshape(8, 3)  # 8 channels of 3 taps
    ref_order, ref_err, ref_Q = _reference_block_obs(W, H, list(blocks), 3)
    obs = BlockOBS(W, damped_inverse(H, 0.0), blocks)
    order, total = [], 0.0
    alive = list(range(8))
    for step in range(3):
        costs = obs.costs(torch.tensor(alive))
        j = alive[int(torch.argmin(costs))]
        total += float(costs.min())
        order.append(j)
        alive.remove(j)
        obs.remove(torch.tensor([j]))
        if step == 1:  # updates applied part way, the rest pending: the same
            obs.flush()
    assert order == ref_order
    assert total == pytest.approx(ref_err, rel=1e-9)
    obs.flush()  # the sequential updates are the reference's joint re-fit (its Gram: BlockOBS holds WᵀW, not W)
    kept = blocks[alive].flatten()  # a flush keeps only these columns' rows and columns
    assert obs.K.shape == (len(kept), len(kept)) and obs.Hinv.shape == obs.K.shape
    torch.testing.assert_close(obs.gram(kept, kept), (ref_Q.t() @ ref_Q)[kept][:, kept], rtol=1e-9, atol=1e-9)
    obs.remove(torch.tensor(alive[:1]))  # pending again: the Gram reads through the factors as after a flush
    rest = blocks[alive[1:]].flatten()
    pending = obs.gram(rest, rest)
    obs.flush()
    Q4 = refit_without(W, H, torch.cat([blocks[j] for j in order + alive[:1]]), 0.0)
    torch.testing.assert_close(obs.K, (Q4.t() @ Q4)[rest][:, rest], rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(pending, obs.K, rtol=1e-9, atol=1e-9)
    A = H[rest][:, rest]  # H⁻¹ of the columns alive: the inverse of their own Hessian
    torch.testing.assert_close(obs.hinv(rest, rest), torch.linalg.inv(A), rtol=1e-8, atol=1e-8)


def test_grouped_consumer_costs_agree_with_a_float64_reference():
    """A unit read by a grouped conv is column j of every group; its cost is the sum of each group's OBS error on
    that group's own H, relative to the conv's whole output energy: the greedy order and curve match brute force."""
    from cnn_sparsegpt.pruning.allocation import dense_statistics
    from cnn_sparsegpt.pruning.structured import _cost_curve

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 6, 3, padding=1, groups=2)).eval()
    x = calib(32)
    group = next(g for g in channel_groups(model, x[:1]) if g.producers == ["0"])
    stats = dense_statistics(model, [x], ["2"], hessian=True)
    order, curve = _cost_curve(group, stats, 0.0, 3, 1)
    Wg, _ = stats["2"].weight_matrix()
    Ws, Hs = Wg.double(), stats["2"].H.double() / 2
    norm = float((torch.bmm(Ws, Hs) * Ws).sum())

    def error(units):  # every group re-fitted without the units' 9 taps each
        cols, total = torch.tensor([t * 4 + j for j in units for t in range(9)]), 0.0
        for W, H in zip(Ws, Hs):
            D = W - refit_without(W, H, cols, 0.0)
            total += float((D @ H * D).sum())
        return total / norm

    ref, gone = [], []
    for _ in range(3):
        errs = {j: error(gone + [j]) for j in range(4) if j not in gone}
        gone.append(min(errs, key=errs.get))
        ref.append(errs[gone[-1]])
    assert order == gone
    assert curve == pytest.approx(ref, rel=1e-6)


def test_consumers_too_wide_for_obs_cost_each_channel_its_own_output_energy(monkeypatch):
    """Above MAX_OBS_COLUMNS inputs a consumer is not downdated: a unit costs tr(W_B H_BB W_Bᵀ) over the consumer's
    output energy, removals add, and the greedy removes the cheapest units first."""
    from cnn_sparsegpt.pruning import structured
    from cnn_sparsegpt.pruning.allocation import dense_statistics

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 6, 3, padding=1)).eval()
    x = calib(32)
    group = next(g for g in channel_groups(model, x[:1]) if g.producers == ["0"])
    stats = dense_statistics(model, [x], ["2"], hessian=True)
    monkeypatch.setattr(structured, "MAX_OBS_COLUMNS", 8)  # the consumer's 72 inputs count as wide
    order, curve = structured._cost_curve(group, stats, 0.01, 5, 1)
    W, H = stats["2"].weight_matrix()[0][0].double(), stats["2"].H[0].double() / 2
    own = [float((W[:, c] @ H[c][:, c] * W[:, c]).sum()) / float((W @ H * W).sum())
           for c in (torch.arange(9) * 8 + j for j in range(8))]
    assert order == sorted(range(8), key=own.__getitem__)[:5]
    assert curve == pytest.approx([sum(sorted(own)[:k]) for k in range(1, 6)], rel=1e-9)


@pytest.mark.parametrize("arch", [TinyResNet, GroupedBottleneck, DepthwiseMultiplier, Shuffled, SharedHead,
                                  UserSE, PixelShuffles, UserOps, LayerScale])
def test_smaller_network_equals_the_masked_one(arch):
    """Without reconstruction, slicing a unit away is the same function as zeroing its producer rows (and its
    BatchNorm's affine entries) and its consumer columns; a grouped conv keeps its groups, each narrower."""
    model = make(arch)
    groups = channel_groups(model, calib(1))
    gone = {g: set(group.removable[:3]) for g, group in enumerate(groups) if len(group.removable) > 4}
    drop_cols, drop_rows, drop_entries = removal_plan(groups, gone)
    masked = copy.deepcopy(model)
    mods = dict(masked.named_modules())
    with torch.no_grad():
        for name, rows in drop_rows.items():
            mods[name].weight[rows] = 0
            if mods[name].bias is not None:
                mods[name].bias[rows] = 0
        for name, ix in drop_entries.items():  # (a per-channel parameter's entries need nothing: the consumer's
            if isinstance(mods.get(name), (nn.BatchNorm2d, nn.InstanceNorm2d)) and mods[name].affine or \
                    isinstance(mods.get(name), nn.GroupNorm):  # columns are zeroed)
                mods[name].weight[ix] = 0
                mods[name].bias[ix] = 0
        for name, cols in drop_cols.items():
            mods[name].weight[:, cols] = 0
    slice_channels_(model, drop_cols, drop_rows, drop_entries)
    x = calib(16)
    torch.testing.assert_close(model(x), masked(x), rtol=1e-5, atol=1e-5)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert any(m.out_channels < 16 for m in convs) and all(m.weight.shape[0] == m.out_channels for m in convs)
    if arch is GroupedBottleneck:
        assert model.conv2.groups == 4 and model.conv2.in_channels == model.conv2.out_channels == 12  # 3 units of 4
        assert model.conv2.weight.shape[1] == 3 and model.conv1.out_channels == model.conv3.in_channels == 12


class ConvBNLinear(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 3, padding=1)
        self.conv2 = nn.Conv2d(6, 5, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(5)
        self.fc = nn.Linear(5, 4)

    def forward(self, x):
        y = self.bn(self.conv2(torch.relu(self.conv1(x))))
        return self.fc(torch.relu(y).mean((2, 3)))


def _least_squares_with_intercept(X, Y):
    """[W b] minimising ‖Y − W X − b‖² (float64, no damping): X (d, T), Y (rows, T)."""
    A = torch.cat([X, torch.ones(1, X.shape[1], dtype=X.dtype)])
    sol = torch.linalg.lstsq(A.t(), Y.t()).solution.t()
    return sol[:, :-1], sol[:, -1]


def test_dense_target_refit_fits_an_intercept_into_the_bias_or_the_batchnorm():
    """The sequential re-fit of a smaller network's layers to the dense outputs is a least squares with an
    intercept where the offset is free: a bias takes it, or the running mean of the BatchNorm that reads the
    layer (statistics not re-estimated here, so its shift is visible)."""
    from cnn_sparsegpt.pruning.dense_target import DenseInputs
    from cnn_sparsegpt.pruning.structured import refit_to_dense_outputs

    torch.manual_seed(0)
    dense = ConvBNLinear().double().eval()
    dense.bn.running_mean.normal_(0, 0.1)
    dense.bn.running_var.uniform_(0.01, 0.05)
    # images of different mean colours: the classifier's pooled inputs vary between images as much as their means
    batches = [torch.randn(8, 3, 6, 6, dtype=torch.float64) + 2 * torch.randn(8, 3, 1, 1, dtype=torch.float64)
               for _ in range(2)]
    model = copy.deepcopy(dense)
    with torch.no_grad():
        model.conv1.weight.add_(0.3 * torch.randn_like(model.conv1.weight))  # its consumers' inputs changed
    targets = DenseInputs(dense, batches)
    refit_to_dense_outputs(model, targets, batches, ["conv2", "fc"], {}, percdamp=0.0, bn_recalibration=False)

    x = torch.cat(batches)
    cols = nn.functional.unfold(torch.relu(model.conv1(x)), 3, padding=1)  # (N, 6·9, positions)
    X = cols.transpose(0, 1).reshape(cols.shape[1], -1)
    Yd = nn.functional.unfold(torch.relu(dense.conv1(x)), 3, padding=1)
    Y = dense.conv2.weight.flatten(1) @ Yd.transpose(0, 1).reshape(Yd.shape[1], -1)
    close = dict(rtol=1e-3, atol=1e-4)  # a batch's Hessian terms are summed in float32 (LayerPruner)
    W, b = _least_squares_with_intercept(X, Y)
    assert b.abs().max() > 0.05  # an intercept that matters
    torch.testing.assert_close(model.conv2.weight.flatten(1), W, **close)
    torch.testing.assert_close(dense.bn.running_mean - model.bn.running_mean, b, **close)  # the BN subtracts it
    feats = lambda m: torch.relu(m.bn(m.conv2(torch.relu(m.conv1(x))))).mean((2, 3)).t()  # noqa: E731
    W, b = _least_squares_with_intercept(feats(model), dense.fc.weight @ feats(dense))
    assert b.abs().max() > 0.05
    torch.testing.assert_close(model.fc.weight, W, **close)
    torch.testing.assert_close(model.fc.bias, dense.fc.bias + b, **close)


def test_dense_target_refit_without_an_intercept_solves_on_the_whole_hessian():
    """Without an offset sink (no bias, no BatchNorm, or intercept=False) the re-fit solves on ΣXXᵀ itself, whose
    sums are kept on their upper blocks only: a 400-input layer (several blocks) gets the plain least squares."""
    from cnn_sparsegpt.pruning.dense_target import DenseInputs
    from cnn_sparsegpt.pruning.structured import refit_to_dense_outputs

    torch.manual_seed(0)
    dense = nn.Sequential(nn.Linear(16, 400), nn.ReLU(), nn.Linear(400, 10, bias=False)).double().eval()
    batches = [torch.randn(600, 16, dtype=torch.float64) for _ in range(2)]
    model = copy.deepcopy(dense)
    with torch.no_grad():
        model[0].weight.add_(0.3 * torch.randn_like(model[0].weight))  # the last layer's inputs changed
    refit_to_dense_outputs(model, DenseInputs(dense, batches), batches, ["2"], {}, percdamp=0.0,
                           bn_recalibration=False, intercept=False)
    x = torch.cat(batches)
    X, Y = model[1](model[0](x)).t(), dense(x).t()  # (400, N) pruned inputs, (10, N) dense outputs
    W = torch.linalg.solve(X @ X.t(), X @ Y.t()).t()
    torch.testing.assert_close(model[2].weight, W, rtol=1e-3, atol=1e-4)  # sums of float32 products


def test_dense_target_refit_of_a_grouped_conv_is_one_fit_per_group():
    from cnn_sparsegpt.pruning.dense_target import DenseInputs
    from cnn_sparsegpt.pruning.structured import refit_to_dense_outputs

    torch.manual_seed(0)
    dense = ConvBNLinear().double().eval()
    dense.conv2 = nn.Conv2d(6, 4, 3, padding=1, groups=2, bias=False).double()
    dense.bn, dense.fc = nn.BatchNorm2d(4).double().eval(), nn.Linear(4, 4).double()
    dense.bn.running_mean.normal_(0, 0.1)
    batches = [torch.randn(8, 3, 6, 6, dtype=torch.float64) + 2 * torch.randn(8, 3, 1, 1, dtype=torch.float64)
               for _ in range(2)]
    model = copy.deepcopy(dense)
    with torch.no_grad():
        model.conv1.weight.add_(0.3 * torch.randn_like(model.conv1.weight))
    refit_to_dense_outputs(model, DenseInputs(dense, batches), batches, ["conv2"], {}, percdamp=0.0,
                           bn_recalibration=False)
    x = torch.cat(batches)
    for g in range(2):  # group g: inputs 3g..3g+2, outputs 2g, 2g+1
        cols = nn.functional.unfold(torch.relu(model.conv1(x))[:, 3 * g:3 * g + 3], 3, padding=1)
        X = cols.transpose(0, 1).reshape(cols.shape[1], -1)
        Yd = nn.functional.unfold(torch.relu(dense.conv1(x))[:, 3 * g:3 * g + 3], 3, padding=1)
        Y = dense.conv2.weight[2 * g:2 * g + 2].flatten(1) @ Yd.transpose(0, 1).reshape(Yd.shape[1], -1)
        W, b = _least_squares_with_intercept(X, Y)
        assert b.abs().max() > 0.05  # an intercept that matters
        close = dict(rtol=1e-3, atol=1e-4)
        torch.testing.assert_close(model.conv2.weight[2 * g:2 * g + 2].flatten(1), W, **close)
        torch.testing.assert_close((dense.bn.running_mean - model.bn.running_mean)[2 * g:2 * g + 2], b, **close)


def test_channel_prune_meets_its_target_and_rebuilds_from_the_spec():
    model, x = make(TinyResNet), calib(64)
    dense_out = model(x)
    rep = prune_model(model, x, structure="channels", keep_macs=0.6, round_to=4, progress=False)
    macs_dense, macs_kept = rep.structure["macs"]
    assert macs_kept <= 0.6 * macs_dense and rep.pattern == "channels" and rep.masks == {}
    assert all(ch["kept"] % 4 == 0 or ch["kept"] == ch["channels"] for ch in rep.structure["groups"])
    out = model(x)
    assert out.shape == dense_out.shape  # the classifier's outputs are all there
    fresh = apply_structure(make(TinyResNet), rep.structure["spec"])
    fresh.load_state_dict(model.state_dict())  # the new shapes, exactly
    torch.testing.assert_close(fresh.eval()(x), out)
    assert rep.structure["spec"] == {n: spec_of(m) for n, m in dict(model.named_modules()).items()
                                     if n in rep.structure["spec"]}


def test_grouped_convs_prune_end_to_end_and_rebuild():
    """A ResNeXt block (channel costs by KL, dense-target re-fits) and torchvision's RegNet-Y (grouped convs beside
    squeeze-excitation): the groups stay, each narrower, and the smaller network rebuilds from the spec."""
    model, x = make(GroupedBottleneck), calib(64)
    rep = prune_model(model, x, structure="channels", keep_macs=0.6, round_to=4, progress=False)
    assert rep.structure["macs"][1] <= 0.6 * rep.structure["macs"][0]
    assert model.conv2.groups == 4 and model.conv2.out_channels < 24 and model.conv2.out_channels % 4 == 0
    fresh = apply_structure(make(GroupedBottleneck), rep.structure["spec"])
    fresh.load_state_dict(model.state_dict())
    torch.testing.assert_close(fresh.eval()(x), model(x))

    torch.manual_seed(0)
    model = torchvision.models.regnet_y_400mf(num_classes=10)
    x = torch.randn(16, 3, 32, 32)
    groups = channel_groups(model.eval(), x[:1])
    channels = sum(len(g.units) * g.width for g in groups)
    assert sum(len(g.removable) * g.width for g in groups) >= 0.99 * channels  # only the classifier's outputs stay
    with torch.no_grad():
        model.train()(x)
    rep = prune_model(model.eval(), x, structure="channels", keep_macs=0.6, batch_size=16, progress=False)
    assert rep.structure["macs"][1] <= 0.6 * rep.structure["macs"][0]
    fresh = apply_structure(torchvision.models.regnet_y_400mf(num_classes=10), rep.structure["spec"])
    fresh.load_state_dict(model.state_dict())
    torch.testing.assert_close(fresh.eval()(x), model(x))


def test_structured_options_are_checked():
    with pytest.raises(UserError, match="exactly one of keep_macs"):
        prune_model(make(TinyResNet), calib(), structure="channels")
    with pytest.raises(UserError, match="not combinable"):
        prune_model(make(TinyResNet), calib(), structure="channels", keep_macs=0.5, sparsity=0.5, reconstruct=1)
    with pytest.raises(UserError, match="not combinable"):
        prune_model(make(TinyResNet), calib(), structure="channels", keep_macs=0.5, wbits=4)
    with pytest.raises(UserError, match="exactly one of"):
        prune_model(make(TinyResNet), calib(), structure="channels", keep_macs=0.5, sparsity=0.5, nm="2:4")
    with pytest.raises(UserError, match="give that too"):
        prune_model(make(TinyResNet), calib(), PUBLISHED, sparsity=0.5, keep_macs=0.5)
    with pytest.raises(UserError, match="cannot remove enough"):
        prune_model(make(TinyResNet), calib(), structure="channels", keep_macs=0.01, progress=False)
    # options of weight masks do nothing to a channel prune alone: refused (the published preset's values pass), and
    # with a pattern they are the weight stage's
    for option in ({"method": "magnitude"}, {"refine": "cg"}, {"target_share": 0.5}, {"prune_all": True}):
        with pytest.raises(UserError, match=f"{next(iter(option))}=.* applies to weight masks"):
            prune_model(make(TinyResNet), calib(), structure="channels", keep_macs=0.5, **option)
    config = dataclasses.replace(PUBLISHED, structure="channels", keep_macs=0.5)
    both = dataclasses.replace(config, nm="2:4", method="magnitude", refine="cg")
    assert [(s.method, s.refine) for s in both.stages] == [("sparsegpt", "auto"), ("magnitude", "cg")]


@pytest.mark.parametrize("pattern", [{"nm": "2:4"}, {"sparsity": 0.5}])
def test_channels_then_a_pattern_on_the_smaller_network(pattern):
    """structure='channels' with sparsity or nm: the channel prune, then that pattern's prune of the weights that
    stay (each stage its own defaults), in one call; the masks are the smaller network's and it rebuilds from the
    spec."""
    model, x = make(TinyResNet), calib(64)
    rep = prune_model(model, x, structure="channels", keep_macs=0.6, round_to=4, progress=False, **pattern)
    assert rep.pattern == f"channels+{pattern.get('nm', pattern.get('sparsity'))}"
    assert rep.structure["macs"][1] <= 0.6 * rep.structure["macs"][0]
    assert [s["structure"] for s in rep.stages] == ["channels", "none"] and rep.stages[1]["keep_macs"] is None
    assert rep.stages[0]["percdamp"] == 0.001 and rep.stages[1]["percdamp"] == 0.01  # (each stage's own default)
    params = dict(model.named_parameters())
    assert rep.masks and rep.sparsity == pytest.approx(0.5, abs=0.01)
    for name, mask in rep.masks.items():
        assert mask.shape == params[name].shape and torch.all(params[name][~mask] == 0)
        if "nm" in pattern and mask.ndim == 4:  # 2 of every 4 input channels at each tap
            assert torch.all(mask.permute(0, 2, 3, 1).reshape(-1, 4).sum(1) == 2)
    assert model.block.conv1.out_channels < 8 or model.block.conv2.out_channels < 16
    fresh = apply_structure(make(TinyResNet), rep.structure["spec"])
    fresh.load_state_dict(model.state_dict())
    torch.testing.assert_close(fresh.eval()(x), model(x))


def _structured_mnist_run(tmp_path, data_dir, *more):
    from cnn_sparsegpt.commands.cli import main
    from cnn_sparsegpt.models import create_model

    ckpt = tmp_path / "mnist_cnn.pt"
    torch.manual_seed(0)
    torch.save(create_model("mnist_cnn").state_dict(), ckpt)
    run = tmp_path / "run"
    assert main(["-q", "prune", "--model", "mnist_cnn", "--weights", str(ckpt), "--data-dir", str(data_dir),
                 "--structure", "channels", "--keep-params", "0.5", "--nsamples", "32", "--eval-samples", "64",
                 "--out", str(run), *more]) == 0
    return run, main


def test_a_channel_run_prints_each_layers_shapes(tmp_path, data_dir):
    """Its table shows shapes before and after (not the weight-sparsity columns, which would read 'skipped')."""
    import json

    from cnn_sparsegpt.commands.pipeline import format_report

    run, _ = _structured_mnist_run(tmp_path, data_dir)
    text = format_report(json.loads((run / "report.json").read_text()))
    assert text.startswith("layer") and "shape before" in text and "skipped" not in text
    assert "multiply-adds per image kept" in text and "top-1 dense" in text


def test_a_channel_run_with_a_pattern_loads_with_its_masks(tmp_path, data_dir):
    """`prune --structure channels --keep-params 0.5 --nm 2:4`: the run folder's model is the smaller one, its masks
    the 2:4 masks of its weights; the summary says both."""
    import json

    from cnn_sparsegpt import load_run
    from cnn_sparsegpt.commands.pipeline import format_report

    run, _ = _structured_mnist_run(tmp_path, data_dir, "--nm", "2:4")
    model, report, masks = load_run(run)
    assert report["pattern"] == "channels+2:4" and masks
    params = dict(model.named_parameters())
    assert all(params[k].shape == m.shape and torch.all(params[k][~m] == 0) for k, m in masks.items())
    assert "then 2:4 (sparsegpt): sparsity 0.500" in format_report(json.loads((run / "report.json").read_text()))


def test_structured_run_folder_exports(tmp_path, data_dir):
    pytest.importorskip("onnxruntime")
    run, main = _structured_mnist_run(tmp_path, data_dir)
    state = torch.load(run / "model.pt", weights_only=True)
    program = torch.export.load(str(run / "model.pt2")).module()  # loads with torch alone
    assert program(torch.randn(3, 1, 28, 28)).shape == (3, 10)
    assert state["6.weight"].shape[0] < 128 and state["9.weight"].shape[1] == state["6.weight"].shape[0]
    assert state["6.weight"].shape[1] == state["2.weight"].shape[0] * 196  # physically smaller, consistent
    assert main(["-q", "export", str(run), "--onnx", str(tmp_path / "m.onnx")]) == 0
    import cnn_sparsegpt as cs
    model, report, _ = cs.load_run(run)  # the pruned nn.Module in Python, its new shapes
    assert model[6].weight.shape == state["6.weight"].shape and report["structure"]["spec"]
    x = torch.randn(3, 1, 28, 28)
    torch.testing.assert_close(model(x), program(x))


@pytest.mark.slow
def test_structured_run_folder_finetunes(tmp_path, data_dir):
    run, main = _structured_mnist_run(tmp_path, data_dir)
    assert main(["-q", "finetune", str(run), "--max-steps", "2", "--data-dir", str(data_dir)]) == 0


def test_latency_times_dense_and_pruned_side_by_side(tmp_path, data_dir, capsys):
    pytest.importorskip("onnxruntime")
    import json

    run, main = _structured_mnist_run(tmp_path, data_dir)
    # openvino here, after test_folders' streamed loading in the same session, segfaulted at the next subprocess
    # while each model had its own OpenVINO Core (runtimes.openvino_core)
    for runtime in ("onnxruntime", "torch", "openvino"):
        out = tmp_path / f"{runtime}.json"
        assert main(["latency", str(run), "--runtime", runtime, "--batch-sizes", "1", "2", "--warmup", "1",
                     "--runs", "2", "--rounds", "1", "--out", str(out)]) == 0
        r = json.loads(out.read_text())
        assert [row["batch"] for row in r["rows"]] == [1, 2] and r["runtime"] == runtime
        assert all(row["dense_s"] > 0 and row["pruned_s"] > 0 and len(row["calls"]["dense"]) == 2 for row in r["rows"])
    printed = capsys.readouterr().out  # the prune's summary too: multiply-adds kept, no weight-sparsity line
    assert "speed-up" in printed and "M multiply-adds per image kept" in printed
    assert "of the pruned layers" not in printed
    assert main(["latency", str(run), "--runtime", "tensorrt"]) == 2
    assert "tensorrt" in capsys.readouterr().err


def test_mobilenet_v3_prunes_to_a_smaller_network_that_rebuilds():
    """Depthwise convs, squeeze-excitation products and hardswish on the paths: sliced consistently."""
    torch.manual_seed(0)
    model = torchvision.models.mobilenet_v3_small(num_classes=10)
    x = torch.randn(32, 3, 64, 64)
    with torch.no_grad():
        model.train()(x)  # non-trivial BatchNorm statistics
    model.eval()
    rep = prune_model(model, x, structure="channels", keep_macs=0.6, batch_size=16, progress=False)
    macs_dense, macs_kept = rep.structure["macs"]
    assert macs_kept <= 0.6 * macs_dense
    out = model(x)
    fresh = apply_structure(torchvision.models.mobilenet_v3_small(num_classes=10), rep.structure["spec"])
    fresh.load_state_dict(model.state_dict())
    torch.testing.assert_close(fresh.eval()(x), out)


def test_shufflenet_v2_loses_channels_of_its_shuffled_stream_and_rebuilds():
    """A stage of 4 units ties its stream's channels in eights (x0.5: 48 and 96 channels, units of 8) and loses
    some; stage 3's 8 units (7 chunks between 8 shuffles) tie its 96 into one unit, which stays, with that reason."""
    torch.manual_seed(0)
    model = torchvision.models.shufflenet_v2_x0_5(num_classes=10)
    x = torch.randn(32, 3, 32, 32)
    with torch.no_grad():
        model.train()(x)
    model.eval()
    reasons = {g.producers[0]: g.reason for g in channel_groups(model, x[:1])}
    assert "single unit" in reasons["stage3.0.branch1.2"] and not reasons["stage4.0.branch1.2"]
    rep = prune_model(model, x, structure="channels", keep_macs=0.15, channel_costs="layer", progress=False)
    assert model.stage4[0].branch1[2].out_channels < 96 and model.conv5[0].in_channels < 192
    fresh = apply_structure(torchvision.models.shufflenet_v2_x0_5(num_classes=10), rep.structure["spec"])
    fresh.load_state_dict(model.state_dict())
    torch.testing.assert_close(fresh.eval()(x), model(x))


@pytest.mark.slow  # ~130 s on 2 cores: the OBS cost curves of 18 MLP groups of up to 3072 channels
def test_convnext_prunes_end_to_end_and_rebuilds():
    torch.manual_seed(0)
    model = torchvision.models.convnext_tiny(num_classes=10).eval()
    x = torch.randn(8, 3, 32, 32)
    rep = prune_model(model, x, structure="channels", keep_macs=0.9, batch_size=8, progress=False)
    macs_dense, macs_kept = rep.structure["macs"]
    assert macs_kept <= 0.9 * macs_dense
    fresh = apply_structure(torchvision.models.convnext_tiny(num_classes=10), rep.structure["spec"])
    fresh.load_state_dict(model.state_dict())
    torch.testing.assert_close(fresh.eval()(x[:2]), model(x[:2]))


def _cbs(i, o, k=1, stride=1):
    return nn.Sequential(nn.Conv2d(i, o, k, stride, k // 2, bias=False), nn.BatchNorm2d(o), nn.SiLU())


class _C2f(nn.Module):
    """Ultralytics' C2f, shortened: one conv's output chunked in two, the second half through a residual block."""

    def __init__(self, c, h):
        super().__init__()
        self.cv1, self.m, self.cv2 = _cbs(c, 2 * h), _cbs(h, h, 3), _cbs(3 * h, c)

    def forward(self, x):
        y = list(self.cv1(x).chunk(2, 1))
        y.append(y[-1] + self.m(y[-1]))
        return self.cv2(torch.cat(y, 1))


class _Detect(nn.Module):
    """A head fx cannot trace (a check on values), called with a list of feature maps, with layers of its own."""

    def __init__(self, chs):
        super().__init__()
        self.cv = nn.ModuleList(nn.Sequential(_cbs(c, 16, 3), nn.Conv2d(16, 6, 1)) for c in chs)

    def forward(self, xs):
        outs = [cv(x) for cv, x in zip(self.cv, xs)]
        assert float(outs[0].detach().abs().mean()) >= 0
        return torch.cat([o.flatten(2) for o in outs], 2)


class _TinyDetector(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem, self.b1, self.down, self.b2 = _cbs(3, 16, 3), _C2f(16, 8), _cbs(16, 32, 3, 2), _C2f(32, 16)
        self.head = _Detect([16, 32])

    def forward(self, x):
        p3 = self.b1(self.stem(x))
        return self.head([p3, self.b2(self.down(p3))])


def test_a_model_fx_traces_but_in_part_is_channel_pruned_around_the_part():
    """The part fx cannot trace is called whole (its inputs keep their channels; its layers are re-fitted from its
    stored inputs), the channels inside its children that fx traces alone may go, and a chunk over channels ties
    each piece's j-th channels (so the smaller tensor still splits where the pieces meet): an Ultralytics detector's
    shape."""
    model, x = make(_TinyDetector), calib(32)
    groups = {g.producers[0]: g for g in channel_groups(model, x[:1])}
    assert "a part torch.fx cannot trace" in groups["b1.cv2.0"].reason and not groups["b1.cv2.0"].removable
    inside = groups["head.cv.0.0.0"]  # a branch of the head, walked alone: its inner channels
    assert len(inside.removable) == 16 and list(inside.units[0].columns) == ["head.cv.0.1"]
    assert list(inside.units[0].entries) == ["head.cv.0.0.1"]  # (its BatchNorm)
    chunked = groups["b1.cv1.0"]  # half j and half j+8 of cv1, with the residual block's output j added to the latter
    assert set(chunked.producers) == {"b1.cv1.0", "b1.m.0"} and len(chunked.units) == 8
    assert sorted(chunked.units[0].rows["b1.cv1.0"]) == [0, 8] and chunked.removable
    dense_out, head_before = model(x), copy.deepcopy(model.head)
    rep = prune_model(model, x, structure="channels", keep_macs=0.7, progress=False)
    macs_dense, macs_kept = rep.structure["macs"]
    assert macs_kept <= 0.7 * macs_dense
    shapes = {layer["name"]: (layer["shape_before"], layer["shape_after"]) for layer in rep.structure["layers"]}
    assert shapes["b1.cv2.0"][0][0] == shapes["b1.cv2.0"][1][0]  # its outputs go to the head: all kept
    assert shapes["head.cv.0.0.0"][0][1] == shapes["head.cv.0.0.0"][1][1]  # the channels the head reads
    assert shapes["head.cv.0.1"][0][0] == shapes["head.cv.0.1"][1][0]  # and those it writes
    assert any(before != after for before, after in shapes.values())
    chunked = [b for b in ("b1", "b2") if shapes[f"{b}.cv1.0"][1][0] < shapes[f"{b}.cv1.0"][0][0]]
    assert chunked and all(shapes[f"{b}.m.0"][1][0] * 2 == shapes[f"{b}.cv1.0"][1][0] for b in chunked)
    out = model(x)
    assert out.shape == dense_out.shape and (out - dense_out).norm() < 0.5 * dense_out.norm()
    assert not torch.equal(model.head.cv[0][0][0].weight, head_before.cv[0][0][0].weight)  # re-fitted in the part
    fresh = apply_structure(make(_TinyDetector), rep.structure["spec"])
    fresh.load_state_dict(model.state_dict())
    torch.testing.assert_close(fresh.eval()(x), out)
    low = make(_TinyDetector)  # the part's layers from one forward each instead of its stored inputs: the same
    prune_model(low, x, structure="channels", keep_macs=0.7, low_memory=True, progress=False)
    for (name, w), w_low in zip(model.state_dict().items(), low.state_dict().values()):
        torch.testing.assert_close(w, w_low, rtol=1e-5, atol=1e-6, msg=name)


def test_n_m_permutation_reorders_a_partly_traced_models_chunked_channels_and_keeps_its_function():
    from cnn_sparsegpt.kernels.masks import Pattern
    from cnn_sparsegpt.pruning.permute import permute_for_nm_
    model, x = make(_TinyDetector), calib(32)
    dense_out = model(x)
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    done = permute_for_nm_(model, [x], names, Pattern(n=2, m=4), False, True)
    assert any("b1.cv1.0" in g["producers"] and g["swaps"] for g in done["groups"])
    torch.testing.assert_close(model(x), dense_out, rtol=1e-4, atol=1e-5)


class _ChunkSlice(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 8, 1), nn.Conv2d(8, 4, 1)

    def forward(self, x):
        return self.b(torch.cat(self.a(x).chunk(2, 1)[::-1], 1))  # the pieces reordered, concatenated as a tuple


def test_a_slice_of_a_chunks_pieces_is_followed_into_a_concatenation():
    model, x = _ChunkSlice().eval(), torch.randn(64, 3, 4, 4)
    group = channel_groups(model, x[:1])[0]
    assert [(u.rows["a"], u.columns["b"]) for u in group.units] == [([j, j + 4], [j, j + 4]) for j in range(4)]
    dense = model(x)
    prune_model(model, x, structure="channels", keep_macs=0.7, round_to=1, progress=False)
    assert model.a.weight.shape[0] == model.b.weight.shape[1] < 8 and model(x).shape == dense.shape


def test_a_channel_prune_with_too_few_samples_per_input_leaves_those_layers_as_sliced():
    """As the weight prune's re-fits: a layer re-fitted on fewer than 2 samples (image positions) per input would fit
    the calibration images and not others, so it is left as sliced, with a warning and the report's reason."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 6, 3, padding=1), nn.ReLU(),
                          nn.Flatten(), nn.Linear(6 * 64, 4)).eval()  # the Linear: 64 inputs per channel kept
    x = calib(16)
    with pytest.warns(RuntimeWarning, match="left as sliced, without a re-fit"):
        rep = prune_model(model, x, structure="channels", keep_macs=0.6, round_to=1, progress=False)
    assert rep.structure["not_refitted"] == {"5": f"16 calibration samples for {model[5].in_features} inputs (< 2 "
                                                  "per input)"}


def test_a_channel_prune_takes_the_memory_policy_and_low_memory_gives_the_same_network():
    """The dense target's re-fit pass holds activations of the whole calibration set (two networks): low_memory
    recomputes them instead, as in the weight prune, for the same result; unset, free memory decides."""
    x = calib(64)
    runs = {}
    for low in (False, True, None):
        model = make(TinyResNet)
        rep = prune_model(model, x, structure="channels", keep_macs=0.6, round_to=4, low_memory=low,
                          progress=False)
        runs[low] = (model, rep)
    assert runs[True][1].memory_policy == "low-memory" and runs[None][1].memory_policy.startswith("default (")
    for (name, w), w_low in zip(runs[False][0].state_dict().items(), runs[True][0].state_dict().values()):
        torch.testing.assert_close(w, w_low, rtol=1e-5, atol=1e-6, msg=name)


def test_block_obs_inverse_raises_damping_where_h_is_singular():
    X = torch.randn(16, 3) @ torch.randn(3, 12)  # rank 3 of 12: no inverse without damping
    H = X.t() @ X
    with pytest.warns(RuntimeWarning, match="Cholesky failed at percdamp=0"):
        Hinv = damped_inverse(H, 0.0)
    assert torch.isfinite(Hinv).all()
    assert torch.equal(damped_inverse(H, 0.01), torch.cholesky_inverse(torch.linalg.cholesky(
        H.double() + 0.01 * torch.diagonal(H.double()).mean() * torch.eye(12, dtype=torch.float64))))


def test_channel_prune_with_a_hessian_never_positive_definite_is_a_user_error(monkeypatch):
    from cnn_sparsegpt.pruning import prune as prune_module

    def fail(*args, **kwargs):
        raise torch.linalg.LinAlgError("linalg.cholesky: the input is not positive-definite")
    monkeypatch.setattr(prune_module, "prune_channels", fail)
    with pytest.raises(UserError, match="channel prune: .* not positive definite even with raised damping"):
        prune_model(make(), calib(), structure="channels", keep_macs=0.5, progress=False)


class TokenBlock(nn.Module):
    """A transformer block on (B, N, C) tokens (MobileViT's, walked alone inside a part fx cannot trace): the
    placeholder's dim 1 is tokens, not channels."""

    def __init__(self, c=8, hidden=16):
        super().__init__()
        self.norm, self.proj = nn.LayerNorm(c), nn.Linear(c, c)
        self.fc1, self.fc2 = nn.Linear(c, hidden), nn.Linear(hidden, c)

    def forward(self, x):
        x = x + self.proj(self.norm(x))
        return x + self.fc2(torch.relu(self.fc1(x)))


def test_sum_of_tokens_and_a_linear_keeps_the_stream():
    """x + proj(x) with x (B, N, C): the walk read dim 1 (tokens) as x's channels and left proj's outputs free, so
    timm's MobileViT was sliced to a network that could not run (an AttributeError traceback). Now the sum of tensors
    whose channels lie at different dims keeps them; the MLP's hidden channels still go."""
    groups = channel_groups(TokenBlock().eval(), torch.randn(2, 5, 8))
    free = {p for g in groups if g.removable for p in g.producers}
    assert free == {"fc1"}, [(g.producers, g.reason) for g in groups]
    assert any("different dims" in g.reason for g in groups if "proj" in g.producers)
