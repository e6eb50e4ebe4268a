"""The dense target weighed by the dense network's ReLU (relu_gate.py, `inactive_weight`)."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import fx, nn

from cnn_sparsegpt import PruneConfig, UserError, create_model, prune_model
from cnn_sparsegpt.kernels.exact_obs import exact_obs_solve
from cnn_sparsegpt.kernels.masks import Pattern, conv_column_perm
from cnn_sparsegpt.pruning.layer import LayerPruner
from cnn_sparsegpt.pruning.relu_gate import ReluGate, dense_active, relu_gates


def _layers(model):
    return [n for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]


def test_relu_gates_of_resnet20():
    """conv1 → bn1 → ReLU in every block; conv2 → bn2 → sum with the block input → ReLU in identity blocks; in
    projection blocks the shortcut's conv comes last before the sum (conv2's sum operand is not computed yet)."""
    model = create_model("resnet20_cifar")
    gates = relu_gates(fx.symbolic_trace(model), _layers(model))
    assert gates["layer1.0.conv1"] == ReluGate("layer1.0.bn1")
    assert gates["layer1.1.conv2"] == ReluGate("layer1.1.bn2", "relu_2", "add_1")
    assert gates["layer2.0.shortcut.0"] == ReluGate("layer2.0.shortcut.1", "layer2_0_bn2", "add_3")
    assert gates["conv1"] == ReluGate("bn1")
    assert "layer2.0.conv2" not in gates and "layer3.0.conv2" not in gates and "fc" not in gates
    assert len(gates) == 19  # of 21 convs and linears: all but two conv2s and the fc


def test_relu_gates_need_a_relu_alone_after():
    """nn.ReLU modules count; an output read twice, or going to something else than a ReLU, is not gated."""
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.bn = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)
            self.b, self.c, self.relu = nn.Conv2d(4, 4, 1), nn.Conv2d(4, 4, 1), nn.ReLU()

        def forward(self, x):
            y = self.relu(self.bn(self.a(x)))
            z = self.b(y)
            return torch.sigmoid(self.c(z)) + z

    net = Net()
    gates = relu_gates(fx.symbolic_trace(net), ["a", "b", "c"])
    assert gates == {"a": ReluGate("bn")}
    bn = nn.BatchNorm2d(4).eval()
    bn.running_mean.fill_(0.5)
    x, skip = torch.randn(2, 3, 6, 6), torch.randn(2, 4, 4, 4)
    torch.testing.assert_close(dense_active(net.a, bn, x, skip), bn(net.a(x)) + skip > 0, rtol=0, atol=0)


def _setup(layer, seed=0):
    g = torch.Generator().manual_seed(seed)
    layer = layer.requires_grad_(False)
    conv = isinstance(layer, nn.Conv2d)
    shape = (12, layer.in_channels, 6, 6) if conv else (12, 8, layer.in_features)  # (≥ 2 samples per input)
    x = torch.randn(shape, generator=g) + 0.5
    xd = x + 0.3 * torch.randn(shape, generator=g)
    active = torch.randn(layer(x).shape, generator=g) > 0.3
    return layer, x, xd, active


def _columns(layer, x):
    if isinstance(layer, nn.Linear):
        return x.reshape(-1, x.shape[-1]).t()
    cols = F.unfold(x, layer.kernel_size, layer.dilation, layer.padding, layer.stride)
    return cols.transpose(0, 1).reshape(cols.shape[1], -1)


def _out_columns(layer, y):
    return y.reshape(-1, y.shape[-1]).t() if isinstance(layer, nn.Linear) else y.transpose(0, 1).reshape(y.shape[1], -1)


LAYERS = [nn.Conv2d(8, 4, 3, padding=1), nn.Conv2d(4, 6, 1, stride=2), nn.Linear(24, 5)]


@pytest.mark.parametrize("layer", LAYERS)
def test_per_row_sums_against_float64(layer):
    """H_r = α·H + (1 − α)·2/N Σ_active x xᵀ and R_r likewise with (W·(x_d − x))xᵀ, per row, in the solver's order."""
    alpha = 0.3
    layer, x, xd, active = _setup(layer)
    pruner = LayerPruner(layer, "l", dense_target=True, inactive_weight=alpha)
    for i in range(0, 12, 5):  # uneven batches
        pruner.add_batch(x[i:i + 5], xd[i:i + 5], active=active[i:i + 5])
    W = layer.weight.double().reshape(layer.weight.shape[0], -1)
    X, Xd, g = _columns(layer, x.double()), _columns(layer, xd.double()), _out_columns(layer, active).double()
    g = alpha + (1 - alpha) * g
    n, perm = X.shape[1], conv_column_perm(layer.weight.shape, "cpu")
    H_ref = torch.einsum("rt,it,jt->rij", g, X, X)[:, perm][:, :, perm] * 2 / n
    R_ref = ((g * (W @ (Xd - X))) @ X.t())[:, perm] * 2 / n
    H, R = pruner.H, pruner.R
    torch.testing.assert_close(pruner.active.hessian(H, pruner.nsamples)[0].double(), H_ref, rtol=1e-5,
                               atol=1e-5 * float(H_ref.abs().max()))
    torch.testing.assert_close(pruner.active.rhs(R, pruner.nsamples)[0].double(), R_ref, rtol=1e-4,
                               atol=1e-4 * float(R_ref.abs().max()))


@pytest.mark.parametrize("layer", LAYERS)
@pytest.mark.parametrize("intercept", [False, True])
def test_gated_fit_is_the_weighted_least_squares(layer, intercept):
    """With nothing pruned, each row's weights are the damped weighted least-squares fit of the dense outputs
    W·x_d (damping pulls towards W, as the dense target's does), with an intercept: on the weighted means, and the
    offset the weighted mean residual."""
    alpha, damp = 0.25, 0.01
    layer, x, xd, active = _setup(layer, seed=1)
    dense_weight = layer.weight.clone()
    pruner = LayerPruner(layer, "l", dense_target=True, track_mean=intercept, inactive_weight=alpha)
    for i in range(0, 12, 4):
        pruner.add_batch(x[i:i + 4], xd[i:i + 4], active=active[i:i + 4])
    config = PruneConfig(sparsity=0.0, solver="exact", refine="none", percdamp=damp)
    res = pruner.prune(config, intercept=intercept)
    assert res.inactive_weight == alpha and res.solver == "exact"
    W = dense_weight.double().reshape(dense_weight.shape[0], -1)
    X, Xd = _columns(layer, x.double()), _columns(layer, xd.double())
    g = alpha + (1 - alpha) * _out_columns(layer, active).double()
    Y = W @ Xd
    n = X.shape[1]
    for r in range(W.shape[0]):
        m, md = (X * g[r]).sum(1) / g[r].sum(), (Xd * g[r]).sum(1) / g[r].sum()
        Xc = X - m[:, None] if intercept else X
        y = Y[r] - W[r] @ md if intercept else Y[r]
        H = 2 * (Xc * g[r]) @ Xc.t() / n
        lam = damp * H.diagonal().mean()
        w = torch.linalg.solve(H + lam * torch.eye(len(H), dtype=H.dtype), 2 * (Xc * g[r]) @ y / n + lam * W[r])
        got = layer.weight[r].double().reshape(-1)
        torch.testing.assert_close(got, w, rtol=2e-3, atol=2e-3 * float(w.abs().max()))
        if intercept:
            torch.testing.assert_close(res.offset[r].double(), W[r] @ md - got @ m, rtol=2e-3, atol=2e-3)


def test_exact_solver_takes_per_row_hessians():
    """The same H for every row, given per row, prunes as the shared one (up to float rounding): rows still compete
    for the layer's removals."""
    g = torch.Generator().manual_seed(4)
    rows, d = 6, 16
    X = torch.randn(d, 200, generator=g)
    H = (2 * X @ X.t() / 200)[None]
    W = torch.randn(1, rows, d, generator=g)
    for pattern in (Pattern(sparsity=0.6), Pattern(n=2, m=4)):
        Q, pruned, _ = exact_obs_solve(W, H, pattern)
        Qr, pruned_r, _ = exact_obs_solve(W, H[:, None].expand(1, rows, d, d), pattern)
        assert (pruned == pruned_r).float().mean() > 0.98
        assert int(pruned.sum()) == int(pruned_r.sum())
        torch.testing.assert_close(Qr, Q, rtol=1e-3, atol=1e-3)


def _settled_resnet20():
    torch.manual_seed(0)
    model, x = create_model("resnet20_cifar"), torch.randn(32, 3, 16, 16)
    model.train()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.momentum = None
        model(x)
    return model.eval(), x


def test_prune_model_applies_it_where_the_exact_solver_runs():
    """The report names the layers fitted with the weight; with 1 (the default) none is, and the weights differ."""
    model, x = _settled_resnet20()
    runs = {}
    for weight in (1.0, 0.5):
        m = copy.deepcopy(model)
        report = prune_model(m, x, nm="2:4", inactive_weight=weight, ignore=("layer3.*",), progress=False)
        assert report.config.inactive_weight == weight
        runs[weight] = (m, {r.name for r in report.layers if r.inactive_weight == weight})
    assert runs[1.0][1] == set()
    gated = runs[0.5][1]
    assert "layer1.0.conv1" in gated and "layer1.1.conv2" in gated and "layer2.0.shortcut.0" in gated
    assert "layer2.0.conv2" not in gated and "conv1" not in gated  # (the stem is not pruned)
    assert not torch.equal(runs[1.0][0].layer1[0].conv1.weight, runs[0.5][0].layer1[0].conv1.weight)
    # off where the solver is SparseGPT's
    report = prune_model(copy.deepcopy(model), x, nm="2:4", inactive_weight=0.5, solver="sparsegpt",
                         ignore=("layer2.*", "layer3.*"), progress=False)
    assert not any(r.inactive_weight for r in report.layers)


def test_inactive_weight_is_checked():
    with pytest.raises(UserError, match="inactive_weight"):
        PruneConfig(inactive_weight=1.5).validate()


def test_applies_only_where_the_exact_solver_runs():
    from cnn_sparsegpt.pruning.relu_gate import applies
    on = PruneConfig(nm="2:4", inactive_weight=0.3).resolved()
    assert applies(on, torch.empty(16, 16, 3, 3))
    assert not applies(on, torch.empty(512, 512, 3, 3))  # SparseGPT's sweep there (and 87 GB of per-row sums)
    assert not applies(PruneConfig(nm="2:4").resolved(), torch.empty(16, 16, 3, 3))  # weight 1: off
    assert not applies(PruneConfig(nm="2:4", inactive_weight=0.3, refine="admm").resolved(), torch.empty(16, 16, 3, 3))
