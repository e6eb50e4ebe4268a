"""Layers a model library defines itself (timm's): subclasses of BatchNorm, Conv2d and Linear. torch.fx traces into
any class defined outside torch.nn, so they must be kept as module calls (graph.trace), and a Conv2d/Linear that does
not compute its base class's product with its stored weight must be left as it is (graph.nonstandard_layers)."""
import warnings

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from cnn_sparsegpt import PUBLISHED, prune_model
from cnn_sparsegpt.utils import UserError


class BatchNormAct(nn.BatchNorm2d):
    """timm's BatchNormAct2d: a BatchNorm and its activation in one module."""

    def forward(self, x):
        return torch.relu(super().forward(x))


class StdConv(nn.Conv2d):
    """timm's StdConv2d: the weight standardized per output channel in forward, so a zeroed weight is not zero in
    the product."""

    def forward(self, x):
        w = F.batch_norm(self.weight.reshape(1, self.out_channels, -1), None, None, training=True, momentum=0.0,
                         eps=1e-6).reshape_as(self.weight)
        return F.conv2d(x, w, self.bias, self.stride, self.padding, self.dilation, self.groups)


class RestatedConv(nn.Conv2d):
    """A subclass that only re-states Conv2d's product (timm's Linear does so for TorchScript)."""

    def forward(self, x):
        return F.conv2d(x, self.weight, self.bias, self.stride, self.padding, self.dilation, self.groups)


class Net(nn.Module):
    def __init__(self, conv=nn.Conv2d, bn_act=False):
        super().__init__()
        self.bn_act = bn_act
        bn = BatchNormAct if bn_act else nn.BatchNorm2d
        self.stem, self.bn0 = nn.Conv2d(3, 16, 3, padding=1, bias=False), bn(16)
        self.conv1, self.bn1 = conv(16, 32, 3, padding=1, bias=False), bn(32)
        self.conv2, self.bn2 = nn.Conv2d(32, 32, 3, padding=1, bias=False), bn(32)
        self.fc = nn.Linear(32, 5)

    def forward(self, x):
        for conv, bn in ((self.stem, self.bn0), (self.conv1, self.bn1), (self.conv2, self.bn2)):
            x = bn(conv(x)) if self.bn_act else torch.relu(bn(conv(x)))
        return self.fc(x.mean((2, 3)))


def make(**kw):
    torch.manual_seed(0)
    model = Net(**kw)
    model.train()
    with torch.no_grad():  # non-trivial BatchNorm statistics
        for _ in range(3):
            model(torch.randn(16, 3, 8, 8) * 2 + 0.5)
    return model.eval()


def calib():
    return torch.randn(64, 3, 8, 8, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("options", [dict(nm="2:4"), dict(structure="channels", keep_macs=0.6)],
                         ids=["2:4", "channels"])
def test_a_batchnorm_subclass_prunes_as_batchnorm_then_relu(options):
    """Before graph.trace, a BatchNormAct's statistics were silently not re-estimated (timm EfficientNet-B0: none of
    its 49)."""
    plain, fused = make(), make(bn_act=True)
    fused.load_state_dict(plain.state_dict())
    before = fused.bn2.running_var.clone()
    reports = [prune_model(m, calib(), progress=False, **options) for m in (plain, fused)]
    assert fused.bn2.running_var.shape != before.shape or not torch.allclose(fused.bn2.running_var, before, 0.01)
    for (k, a), b in zip(plain.state_dict().items(), fused.state_dict().values()):
        assert a.shape == b.shape, k
        torch.testing.assert_close(a.float(), b.float(), rtol=1e-3, atol=1e-5, msg=k)
    if "structure" in options:  # its channels were removed, not left as read by an unknown module
        assert reports[1].structure["macs"][1] < 0.65 * reports[1].structure["macs"][0]


def test_a_conv_that_transforms_its_weight_is_left_as_it_is_and_reported():
    model = make(conv=StdConv)
    kept = model.conv1.weight.clone()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        rep = prune_model(model, calib(), sparsity=0.5, progress=False)
    by = {r.name: r for r in rep.layers}
    assert by["conv1"].skipped and by["conv1"].reason.startswith("StdConv computes something else than Conv2d")
    assert torch.equal(model.conv1.weight, kept) and not by["conv2"].skipped and by["conv2"].sparsity == 0.5
    assert any("conv1" in str(w.message) and "StdConv" in str(w.message) for w in caught)

    model = make(conv=StdConv)
    rep = prune_model(model, calib(), structure="channels", keep_macs=0.8, progress=False)
    assert torch.equal(model.conv1.weight, kept)  # neither sliced nor re-fitted
    assert any("conv1: StdConv computes" in g["fixed"] for g in rep.structure["groups"])
    with pytest.raises(UserError, match="channel groups stay in place, e.g. read by conv1: StdConv computes"):
        prune_model(make(conv=StdConv), calib(), structure="channels", keep_macs=0.3, progress=False)
    model = make(conv=StdConv)
    model.conv2 = StdConv(32, 32, 3, padding=1, bias=False)  # nothing left to remove: the error says why
    with pytest.raises(UserError, match="no channel of this model can be removed: read by conv.: StdConv computes"):
        prune_model(model, calib(), structure="channels", keep_macs=0.8, progress=False)


def test_a_subclass_that_restates_its_base_prunes_as_the_base():
    plain, restated = make(), make(conv=RestatedConv)
    restated.load_state_dict(plain.state_dict())
    a, b = (prune_model(m, calib(), PUBLISHED, sparsity=0.5, progress=False) for m in (plain, restated))
    assert torch.equal(a.masks["conv1.weight"], b.masks["conv1.weight"])
    torch.testing.assert_close(plain.conv1.weight, restated.conv1.weight)


class Splits(nn.Module):
    """Res2Net's pattern: splits of a width that is not a multiple of M, concatenated into one consumer."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.a, self.b = nn.Conv2d(8, 6, 3, padding=1), nn.Conv2d(8, 6, 3, padding=1)
        self.head = nn.Conv2d(12, 8, 1)
        self.fc = nn.Linear(8, 5)

    def forward(self, x):
        x = torch.relu(self.stem(x))
        x = torch.relu(self.head(torch.cat([torch.relu(self.a(x)), torch.relu(self.b(x))], 1)))
        return self.fc(x.mean((2, 3)))


def test_nm_permutation_leaves_splits_that_share_an_nm_group():
    torch.manual_seed(0)
    model = Splits().eval()
    rep = prune_model(model, calib(), nm="2:4", permute=True, progress=False)
    assert all("head" not in g["consumers"] for g in rep.permutation["groups"])  # (it raised in a reshape)
    assert not {r.name: r for r in rep.layers}["head"].skipped


class SumBlock(nn.Module):
    def __init__(self, bn):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(8, 8, 3, padding=1, bias=False), bn(8)

    def forward(self, x):
        return torch.relu(self.bn(self.conv(x)) + x)


def test_targets_that_need_an_affine_batchnorm_do_not_take_a_subclass():
    """The residual target's shift and the ReLU gate pass through the BatchNorm as an affine map: not through an
    activation inside it (the intercept's offset, before the normalization, still goes into its running mean)."""
    from cnn_sparsegpt.pruning.graph import trace
    from cnn_sparsegpt.pruning.intercept import offset_sinks
    from cnn_sparsegpt.pruning.residual_target import skip_partners

    for bn, partnered in ((nn.BatchNorm2d, True), (BatchNormAct, False)):
        model = SumBlock(bn).eval()
        gm = trace(model)
        assert ("conv" in skip_partners(gm, ["conv"])) == partnered
        assert "conv" in offset_sinks(model, ["conv"], gm)


@pytest.mark.parametrize("norm", ["hook", "parametrization"])
def test_a_weight_normed_conv_is_left_as_it_is(norm):
    """weight_norm computes the weight from weight_g and weight_v: a pruned weight would be overwritten."""
    model = make()
    if norm == "hook":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # (deprecated in favour of the parametrization)
            model.conv1 = nn.utils.weight_norm(model.conv1)
    else:
        model.conv1 = nn.utils.parametrizations.weight_norm(model.conv1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rep = prune_model(model, calib(), sparsity=0.5, progress=False)
    by = {r.name: r for r in rep.layers}
    assert by["conv1"].skipped and "its weight is computed" in by["conv1"].reason
    assert (model.conv1.weight != 0).all() and not by["conv2"].skipped
    only = nn.Sequential(nn.utils.parametrizations.weight_norm(nn.Conv1d(4, 8, 3)))
    with pytest.warns(RuntimeWarning, match="no layer was pruned"):  # (with --prune-all: a layer of its own)
        assert not prune_model(only, torch.randn(8, 4, 16), sparsity=0.5, prune_all=True, progress=False).masks


class Ghost(nn.Module):
    """GhostNet's module: a conv, a depthwise conv of its output, both concatenated, then `out[:, :keep]`."""

    def __init__(self, keep):
        super().__init__()
        self.keep = keep
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.primary, self.cheap = nn.Conv2d(8, 16, 1), nn.Conv2d(16, 16, 3, padding=1, groups=16)
        self.head = nn.Conv2d(keep, 16, 3, padding=1)
        self.fc = nn.Linear(16, 5)

    def forward(self, x):
        x1 = torch.relu(self.primary(torch.relu(self.stem(x))))
        x = torch.cat([x1, torch.relu(self.cheap(x1))], 1)[:, :self.keep]
        return self.fc(torch.relu(self.head(x)).mean((2, 3)))


@pytest.mark.parametrize("keep", [32, 30])
def test_an_index_that_selects_all_channels_passes_them_through(keep):
    """`out[:, :keep]` with keep = all channels still selects all once channels go; a real slice (30 of 32) would not
    follow a removal (its bound is the module's own attribute), so its channels stay."""
    from cnn_sparsegpt.pruning.channels import channel_groups

    torch.manual_seed(0)
    model = Ghost(keep).eval()
    groups = {g.producers[0]: g for g in channel_groups(model, calib()[:1])}
    assert bool(groups["primary"].removable) == (keep == 32)
    if keep == 32:
        prune_model(model, calib(), structure="channels", keep_macs=0.7, progress=False)
        assert model.primary.out_channels < 16 and model.head.in_channels == 2 * model.primary.out_channels
        assert model(calib()).shape == (64, 5)


class MixedSum(nn.Module):
    """MixNet's MixedConv2d (convs whose outputs are concatenated) in a residual sum: one channel group whose units
    each belong to one part of the concatenation."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.a, self.b = nn.Conv2d(8, 4, 3, padding=1), nn.Conv2d(8, 4, 3, padding=1)
        self.head = nn.Conv2d(8, 8, 3, padding=1)
        self.fc = nn.Linear(8, 5)

    def forward(self, x):
        x = torch.relu(self.stem(x))
        x = torch.relu(torch.cat([self.a(x), self.b(x)], 1) + x)
        return self.fc(torch.relu(self.head(x)).mean((2, 3)))


def test_nm_permutation_leaves_groups_across_a_concatenation():
    """A permutation would move a channel from one part's rows to the other's (timm MixNet: a KeyError)."""
    torch.manual_seed(0)
    model = MixedSum().eval()
    dense = model(calib())
    rep = prune_model(model, calib(), PUBLISHED, nm="2:4", permute=True, bn_recalibration=False, progress=False)
    assert all("a" not in g["producers"] for g in rep.permutation["groups"])
    assert torch.isfinite(model(calib())).all() and dense.shape == (64, 5)


class PartReader(MixedSum):
    """Inception-ResNet-v2's pattern: one part of a concatenation in a residual sum is also read on its own (by c),
    so c reads only some units of the group."""

    def __init__(self):
        super().__init__()
        self.c = nn.Conv2d(4, 8, 3, padding=1)

    def forward(self, x):
        x = torch.relu(self.stem(x))
        a = self.a(x)
        x = torch.relu(torch.cat([a, self.b(x)], 1) + x) + self.c(torch.relu(a))
        return self.fc(torch.relu(self.head(x)).mean((2, 3)))


def test_a_consumer_that_reads_part_of_a_group_prices_only_that_part():
    """Before, the OBS cost curve assumed every unit has columns in every consumer (a ValueError)."""
    torch.manual_seed(0)
    model = PartReader().eval()
    rep = prune_model(model, calib(), structure="channels", keep_macs=0.7, round_to=2, progress=False)
    assert model.stem.out_channels < 8 and model.c.in_channels == model.a.out_channels
    assert model.a.out_channels + model.b.out_channels == model.stem.out_channels
    assert torch.isfinite(model(calib())).all() and rep.structure["macs"][1] <= 0.7 * rep.structure["macs"][0]


class SpaceToDepthSE(nn.Module):
    """TResNet's stem (space-to-depth: a view of a permute) before convs whose outputs a squeeze-excite gate scales."""

    def __init__(self):
        super().__init__()
        self.stem, self.conv = nn.Conv2d(12, 16, 3, padding=1), nn.Conv2d(16, 16, 3, padding=1)
        self.fc1, self.fc2 = nn.Conv2d(16, 8, 1), nn.Conv2d(8, 16, 1)
        self.head, self.fc = nn.Conv2d(16, 16, 3, padding=1), nn.Linear(16, 5)

    def forward(self, x):
        n, c, h, w = x.shape
        x = x.view(n, c, h // 2, 2, w // 2, 2).permute(0, 3, 5, 1, 2, 4).reshape(n, c * 4, h // 2, w // 2)
        x = torch.relu(self.stem(x))
        y = self.conv(x)
        x = torch.relu(x + y * torch.sigmoid(self.fc2(torch.relu(self.fc1(y.mean((2, 3), keepdim=True))))))
        return self.fc(torch.relu(self.head(x)).mean((2, 3)))


def test_a_conv_after_a_permuted_view_writes_channels_at_dim_1():
    """Before, the convs after the stem took the permute's channel dim (3): the gate's product was not tied to the
    stream, fc2 alone lost rows, and the pruned network failed in the next forward (TResNet)."""
    torch.manual_seed(0)
    model = SpaceToDepthSE().eval()
    prune_model(model, calib(), structure="channels", keep_macs=0.7, round_to=4, progress=False)
    assert model.stem.out_channels < 16 and model.fc2.out_channels == model.conv.out_channels == model.stem.out_channels
    assert model(calib()).shape == (64, 5)
