"""Channel permutations for N:M: the swap search against brute force, the permuted network's function, and a prune
with them."""
import itertools

import pytest
import torch
import torchvision

from cnn_sparsegpt import RECOMMENDED, prune_model
from cnn_sparsegpt.kernels.nm_permute import kept_saliency, permutation_search
from cnn_sparsegpt.pruning.channels import channel_groups
from cnn_sparsegpt.pruning.slicing import permute_channels_

from .test_prune_model import TinyResNet, Untraceable, calib, make
from .test_structured import Concat, SharedHead, Shuffled, UserSE


@pytest.mark.parametrize("n,m,channels", [(2, 4, 12), (1, 4, 8), (4, 8, 16)])
def test_search_ends_where_no_swap_gains(n, m, channels):
    """The greedy's closed-form gains are right: from its result no swap of two channels (brute force) keeps more,
    and it keeps at least what the identity order keeps."""
    S = torch.rand(40, channels, generator=torch.Generator().manual_seed(channels)) ** 3
    order, swaps = permutation_search(S, n, m)
    assert sorted(order.tolist()) == list(range(channels)) and swaps > 0
    kept = kept_saliency(S, n, m, order)
    assert kept > kept_saliency(S, n, m)
    for i, j in itertools.combinations(range(channels), 2):
        other = order.clone()
        other[i], other[j] = order[j], order[i]
        assert kept_saliency(S, n, m, other) <= kept * (1 + 1e-5)


def test_search_finds_the_order_that_pairs_strong_channels_with_weak_ones():
    """Channels 0-3 strong and 4-7 weak in every row: 2:4 keeps only two strong ones per group unless each group
    gets two of each; the best order keeps all strong ones."""
    S = torch.cat([torch.full((10, 4), 1.0), torch.full((10, 4), 0.01)], 1)
    order, _ = permutation_search(S, 2, 4)
    assert kept_saliency(S, 2, 4, order) == pytest.approx(40.0)
    assert kept_saliency(S, 2, 4) == pytest.approx(20.2)


def _shuffled_groups(model, x):
    groups = [g for g in channel_groups(model, x[:1]) if not g.reason and len(g.removable) == len(g.units)]
    g = torch.Generator().manual_seed(0)
    for group in groups:
        permute_channels_(model, group, torch.randperm(len(group.units), generator=g).tolist())
    return len(groups)


@pytest.mark.parametrize("build", [lambda: make(TinyResNet), lambda: Concat().eval(),
                                   lambda: torchvision.models.mobilenet_v3_small(num_classes=10).eval(),
                                   lambda: make(UserSE), lambda: make(SharedHead), lambda: make(Shuffled)],
                         ids=["residual", "concat-flatten", "mobilenet-v3", "linear-se", "shared-head", "shuffle"])
def test_permuted_network_computes_the_same_function(build):
    """Producers' rows, BatchNorm entries, depthwise filters, squeeze-excitation paths and consumers' columns
    (one per channel, or a block of positions after a flatten) move together."""
    torch.manual_seed(0)
    model = build()
    x = torch.randn(4, 3, 32, 32) if isinstance(model, torchvision.models.MobileNetV3) else torch.randn(4, 3, 8, 8)
    with torch.no_grad():
        before = model(x)
        assert _shuffled_groups(model, x) >= 2
        torch.testing.assert_close(model(x), before, rtol=1e-4, atol=1e-5)


def test_prune_with_permutations_keeps_more_saliency_and_stays_n_m():
    model, x = make(), calib()
    with torch.no_grad():
        dense = model(x)
    rep = prune_model(model, x, RECOMMENDED, nm="2:4", permute=True, progress=False)
    assert rep.config.permute is True and rep.permutation["groups"]
    for g in rep.permutation["groups"]:
        assert g["pruned_after"] <= g["pruned_before"] + 1e-9
    for r in rep.layers:
        if not r.skipped:
            assert r.sparsity == 0.5
            groups = r.mask.reshape(r.mask.shape[0], r.mask.shape[1] // 4, 4, -1) if r.mask.dim() == 4 else \
                r.mask.reshape(r.mask.shape[0], -1, 4)
            assert (groups.sum(2 if r.mask.dim() == 4 else -1) == 2).all()  # 2 of every 4 input channels
    off = make()
    rep_off = prune_model(off, x, RECOMMENDED, nm="2:4", permute=False, progress=False)
    assert rep_off.permutation == {} and rep_off.config.permute is False
    with torch.no_grad():
        assert (model(x) - dense).abs().mean() < 1.0  # still the network it was, after a permutation and a prune


def test_the_default_permutes_the_groups_the_swap_takes(monkeypatch):
    """permute None (auto): every group of a small network at N:M; a group read by a layer wider than the swap's
    budget stays in order (and is named); an untraceable model is pruned in its own order, not refused."""
    import cnn_sparsegpt.kernels.refine as refine

    x = calib()
    rep = prune_model(make(), x, RECOMMENDED, nm="2:4", progress=False)
    assert rep.config.permute is None and rep.config.refine == "swap"
    assert rep.permutation["groups"] and not rep.permutation["left_wide"]
    assert {r.refine for r in rep.layers if not r.skipped} == {"swap"}
    everything = prune_model(make(), x, RECOMMENDED, nm="2:4", permute=True, progress=False).permutation
    assert [g["producers"] for g in everything["groups"]] == [g["producers"] for g in rep.permutation["groups"]]
    widths = sorted({refine.cost_flops(r.shape[0], int(torch.tensor(r.shape[1:]).prod())) for r in rep.layers
                     if not r.skipped})
    monkeypatch.setattr(refine, "SWAP_BUDGET", widths[0])  # only the narrowest layers take the swap now
    some = prune_model(make(), x, RECOMMENDED, nm="2:4", progress=False)
    assert some.permutation["left_wide"] and len(some.permutation["groups"]) < len(everything["groups"])
    assert {r.refine for r in some.layers if not r.skipped} == {"swap", "cg"}
    untraced = prune_model(make(Untraceable), x, RECOMMENDED, nm="2:4", progress=False)
    assert not untraced.permutation["groups"] and "torch.fx" in untraced.permutation["note"]
    assert all(r.sparsity == 0.5 for r in untraced.layers if not r.skipped)


def test_permute_needs_a_trace_and_n_m():
    from cnn_sparsegpt import UserError

    with pytest.raises(UserError, match=r"permute \(channel order for N:M\) needs a torch.fx trace"):
        prune_model(make(Untraceable), calib(), RECOMMENDED, nm="2:4", permute=True, progress=False)
    with pytest.raises(UserError, match="give nm"):
        prune_model(make(), calib(), RECOMMENDED, sparsity=0.5, permute=True, progress=False)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_permute_on_cuda_stays_on_the_device_and_n_m():
    model, x = make().cuda(), calib().cuda()
    rep = prune_model(model, x, RECOMMENDED, nm="2:4", permute=True, progress=False)
    assert all(p.is_cuda for p in model.parameters()) and rep.permutation["groups"]
    assert all(r.sparsity == 0.5 for r in rep.layers if not r.skipped)


class ChannelsLastMLP(torch.nn.Module):
    """A ConvNeXt-like block: Linear layers over NHWC inputs, with biases."""

    def __init__(self):
        super().__init__()
        self.stem = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.up = torch.nn.Linear(8, 16)
        self.down = torch.nn.Linear(16, 8)
        self.fc = torch.nn.Linear(8, 5)

    def forward(self, x):
        y = self.down(torch.nn.functional.gelu(self.up(self.stem(x).permute(0, 2, 3, 1))))
        return self.fc(y.mean((1, 2)))


def test_saliencies_leave_biases_out_of_the_output_energy():
    """Each consumer's saliencies are over its output energy ‖Wx‖², not ‖Wx + b‖², also for channels-last Linears."""
    from cnn_sparsegpt.pruning.permute import _saliencies

    torch.manual_seed(0)
    model, x = ChannelsLastMLP().eval(), [torch.randn(4, 3, 6, 6)]
    before = _saliencies(model, x, ["up", "down"])
    with torch.no_grad():
        model.up.bias.add_(5.0)  # changes up's outputs, not its Wx; down's inputs change, so only up is compared
    after = _saliencies(model, x, ["up"])
    torch.testing.assert_close(after["up"], before["up"])
    assert before["down"].shape == (8, 16)
    with torch.no_grad():
        ref = model(x[0])
        assert _shuffled_groups(model, x[0]) >= 1
        torch.testing.assert_close(model(x[0]), ref, rtol=1e-4, atol=1e-5)
