"""The residual target (residual_target.py): the last layer into a residual sum fits the dense sum."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import fx, nn

from cnn_sparsegpt import RECOMMENDED, create_model, prune_model
from cnn_sparsegpt.kernels.masks import conv_column_perm
from cnn_sparsegpt.pruning.layer import LayerPruner
from cnn_sparsegpt.pruning.residual_target import SkipPartner, inverse_scale, skip_partners, target_shift


def _layers(model):
    return [n for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]


def test_skip_partners_of_resnet20():
    """Identity blocks: conv2 fits the sum with the block input. Projection blocks: the shortcut conv comes after
    conv2 in the graph, so it fits the sum with conv2's branch (BatchNorm included) and conv2 gets none."""
    model = create_model("resnet20_cifar")
    partners = skip_partners(fx.symbolic_trace(model), _layers(model))
    assert partners["layer1.1.conv2"] == SkipPartner("relu_2", "layer1.1.bn2", "add_1")
    assert partners["layer2.0.shortcut.0"] == SkipPartner("layer2_0_bn2", "layer2.0.shortcut.1", "add_3")
    assert "layer2.0.conv2" not in partners and "layer1.0.conv1" not in partners and "fc" not in partners
    assert sorted(partners) == sorted([f"layer{s}.{b}.conv2" for s in (1, 2, 3) for b in (0, 1, 2)
                                       if not (s > 1 and b == 0)] + ["layer2.0.shortcut.0", "layer3.0.shortcut.0"])


def test_inverse_scale_and_shift():
    bn = nn.BatchNorm2d(3).eval()
    bn.weight.data = torch.tensor([2.0, 0.0, -0.5])
    bn.running_var.data = torch.tensor([4.0, 1.0, 1.0])
    scale = inverse_scale(bn, 3, "cpu")
    torch.testing.assert_close(scale, torch.tensor([(4 + bn.eps) ** 0.5 / 2, 0.0, -(1 + bn.eps) ** 0.5 / 0.5]))
    assert torch.equal(inverse_scale(None, 3, "cpu"), torch.ones(3))
    d, p = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    torch.testing.assert_close(target_shift(d, p, scale, linear=False), (d - p) * scale[:, None, None])
    d, p = torch.randn(5, 3), torch.randn(5, 3)
    torch.testing.assert_close(target_shift(d, p, scale, linear=True), (d - p) * scale)


def _columns(layer, x):
    """X (d, columns) in the weight's flattened order, and the layer's output positions as columns."""
    if isinstance(layer, nn.Linear):
        return x.reshape(-1, x.shape[-1]).t()
    cols = F.unfold(x, layer.kernel_size, layer.dilation, layer.padding, layer.stride)  # (N, d, L)
    return cols.transpose(0, 1).reshape(cols.shape[1], -1)


def _out_columns(layer, y):
    if isinstance(layer, nn.Linear):
        return y.reshape(-1, y.shape[-1]).t()
    return y.transpose(0, 1).reshape(y.shape[1], -1)


@pytest.mark.parametrize("layer", [nn.Conv2d(8, 4, 3, padding=1),  # R from the outputs (rows < d/2)
                                   nn.Conv2d(4, 16, 1, stride=2),  # R = W·D, the shift's term apart (SE)
                                   nn.Linear(24, 5), nn.Linear(6, 10)])
@pytest.mark.parametrize("intercept", [False, True])
def test_shifted_target_r_against_float64(layer, intercept):
    """R = 2·(W·X_d + δ − W·X_p)·X_pᵀ/N, and centred: W·H_c + R_c = 2·(T − T̄)(X_p − x̄)ᵀ/N, T = W·X_d + δ."""
    g = torch.Generator().manual_seed(3)
    layer = layer.requires_grad_(False)
    conv = isinstance(layer, nn.Conv2d)
    shape = (10, layer.in_channels, 6, 6) if conv else (10, 3, layer.in_features)
    x, xd = torch.randn(shape, generator=g) + 0.5, torch.randn(shape, generator=g) + 0.5
    out = layer(x).shape
    delta = torch.randn(out, generator=g) + 0.3
    pruner = LayerPruner(layer, "l", dense_target=True, track_mean=intercept, shifted_target=True)
    for i in range(0, 10, 4):
        pruner.add_batch(x[i:i + 4], xd[i:i + 4], shift=delta[i:i + 4])
    W = layer.weight.double().reshape(layer.weight.shape[0], -1)
    Xp, Xd = _columns(layer, x.double()), _columns(layer, xd.double())
    T = W @ Xd + _out_columns(layer, delta.double())
    n = Xp.shape[1]
    perm = conv_column_perm(layer.weight.shape, "cpu")
    H, R = pruner.H, pruner.R
    if intercept:
        H, R = pruner.center(H, R)
        Xc = Xp - Xp.mean(1, keepdim=True)
        lhs = (W[:, perm].float() @ H[0] + R[0]).double()
        ref = (2 * (T - T.mean(1, keepdim=True)) @ Xc.t() / n)[:, perm]
    else:
        lhs = R[0].double()
        ref = (2 * (T - W @ Xp) @ Xp.t() / n)[:, perm]
    torch.testing.assert_close(lhs, ref, rtol=1e-4, atol=1e-4 * float(ref.abs().max()))
    if intercept:
        torch.testing.assert_close(pruner.shift_mean(), T.mean(1) - (W @ Xd).mean(1))


def _settled_resnet20(seed=0):
    torch.manual_seed(seed)
    model, x = create_model("resnet20_cifar"), torch.randn(64, 3, 16, 16)
    model.train()
    with torch.no_grad():  # BatchNorm statistics of these images, so that activations keep their scale
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.momentum = None
        model(x)
    return model.eval(), x


def _block_sum(model, block, x):
    """The pre-ReLU sum of a block of ResNet-20, BN(conv2(·)) + shortcut(·), on the network's input x."""
    captured = {}
    handle = block.register_forward_pre_hook(lambda m, inp: captured.__setitem__("x", inp[0]))
    with torch.no_grad():
        model(x)
        handle.remove()
        h = captured["x"]
        y = F.relu(block.bn1(block.conv1(h)))
        return block.bn2(block.conv2(y)) + block.shortcut(h)


def test_residual_target_fits_the_dense_sum():
    """Without BatchNorm re-estimation: layer1.0's skip is the unpruned stem (no error), so its conv2 is as without
    the residual target; layer1.1.conv2 then sees the same inputs in both runs and, fitting the sum, gives a
    smaller error of the block's sum against the dense network's."""
    model, x = _settled_resnet20()
    dense = copy.deepcopy(model)
    runs = {}
    for on in (False, True):
        m = copy.deepcopy(model)
        report = prune_model(m, x, RECOMMENDED, nm="2:4", residual_target=on, bn_recalibration=False,
                             solver="sparsegpt", refine="none", progress=False)  # (fast; any solver fits R)
        assert report.config.residual_target is on
        fitted = {r.name: r.skip_fitted for r in report.layers if r.skip_fitted}
        assert fitted == ({"layer1.0.conv2": "relu", "layer1.1.conv2": "relu_2", "layer1.2.conv2": "relu_4",
                           "layer2.0.shortcut.0": "layer2_0_bn2", "layer2.1.conv2": "relu_8",
                           "layer2.2.conv2": "relu_10", "layer3.0.shortcut.0": "layer3_0_bn2",
                           "layer3.1.conv2": "relu_14", "layer3.2.conv2": "relu_16"} if on else {})
        runs[on] = m
    a, b = runs[False], runs[True]
    assert torch.equal(a.layer1[0].conv2.weight, b.layer1[0].conv2.weight)
    assert torch.equal(a.layer1[1].conv1.weight, b.layer1[1].conv1.weight)
    assert not torch.equal(a.layer1[1].conv2.weight, b.layer1[1].conv2.weight)
    target = _block_sum(dense, dense.layer1[1], x)
    errors = {on: (_block_sum(m, m.layer1[1], x) - target).square().sum().item() for on, m in runs.items()}
    assert errors[True] < 0.99 * errors[False]  # (2.5% here: a random network's own 2:4 error dominates)


def test_residual_target_is_the_same_in_both_memory_policies(monkeypatch):
    """Every partner's skip operand is at hand in both policies, the last block's too (its sum comes after the
    last barrier: GraphExecutor's keep_until)."""
    from cnn_sparsegpt.pruning.prune import _Pruner

    served = []
    shift = _Pruner._shift

    def recorded(self, partner, scale, i, module):
        delta = shift(self, partner, scale, i, module)
        if partner is not None:
            served.append((partner.node, delta is not None))
        return delta

    monkeypatch.setattr(_Pruner, "_shift", recorded)
    model, x = _settled_resnet20(1)
    weights = []
    for low_memory in (False, True):
        served.clear()
        m = copy.deepcopy(model)
        prune_model(m, x, RECOMMENDED, nm="2:4", residual_target=True, low_memory=low_memory, solver="sparsegpt",
                    refine="none", progress=False)
        assert len({node for node, _ in served}) == 9 and all(ok for _, ok in served)
        weights.append(m.layer3[0].shortcut[0].weight)
    torch.testing.assert_close(weights[0], weights[1], rtol=1e-3, atol=1e-4)


def test_a_network_without_residual_sums_says_the_option_changed_nothing():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1),
                          nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 8 * 8, 10)).eval()
    with pytest.warns(RuntimeWarning, match="no layer fitted a residual sum"):
        report = prune_model(model, torch.randn(32, 3, 8, 8), RECOMMENDED, nm="2:4", residual_target=True,
                             prune_all=True, progress=False)
    assert not any(r.skip_fitted for r in report.layers)


def test_a_batchnorm_without_running_statistics_gives_no_partner():
    """σ/γ needs the BatchNorm's running variance: a block whose BatchNorm has none is left out (it was picked
    before, and the prune would have failed on the missing statistics)."""
    class Block(nn.Module):
        def __init__(self, track):
            super().__init__()
            self.conv = nn.Conv2d(4, 4, 3, padding=1)
            self.bn = nn.BatchNorm2d(4, track_running_stats=track)

        def forward(self, x):
            return self.bn(self.conv(x)) + x

    assert skip_partners(fx.symbolic_trace(Block(True)), ["conv"]) == {"conv": SkipPartner("x", "bn", "add")}
    assert skip_partners(fx.symbolic_trace(Block(False)), ["conv"]) == {}
