"""The per-layer solver against an independent float64 OBS reference, and its masks and invariants."""
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from cnn_sparsegpt import PUBLISHED, RECOMMENDED, LayerPruner, Pattern, UserError, sparsegpt_solve
from cnn_sparsegpt.pruning import layer as layer_module



def correlated_inputs(d, T, seed=0):
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(d, d, generator=g) / d ** 0.5 + torch.eye(d)
    return A @ torch.randn(d, T, generator=g) + 0.3 * torch.randn(d, 1, generator=g)


def reference_obs(W, H, pattern, percdamp, blocksize):
    """Plain OBS sequence in float64: eager updates and explicit downdates of the full inverse Hessian."""
    W, H = W.double().clone(), H.double().clone()
    rows, d = W.shape
    H += percdamp * torch.diag(H).mean() * torch.eye(d, dtype=H.dtype)
    Hinv = torch.linalg.inv(H)
    hrow, hdiag = [], []
    for j in range(d):  # the downdated inverse after eliminating columns < j (independent of W)
        hrow.append(Hinv[j, j:].clone())
        hdiag.append(Hinv[j, j].clone())
        Hinv = Hinv - torch.outer(Hinv[:, j], Hinv[j, :]) / Hinv[j, j]
    hdiag = torch.stack(hdiag)
    pruned = torch.zeros_like(W, dtype=torch.bool)
    for j in range(d):
        if pattern.is_nm and j % pattern.m == 0:
            s = W[:, j:j + pattern.m] ** 2 / hdiag[j:j + pattern.m]
            for r in range(rows):
                pruned[r, j + s[r].argsort()[: pattern.m - pattern.n]] = True
        if not pattern.is_nm and j % blocksize == 0:
            j2 = min(j + blocksize, d)
            k = round(pattern.sparsity * (rows * j2)) - round(pattern.sparsity * (rows * j))
            s = (W[:, j:j2] ** 2 / hdiag[j:j2]).flatten()
            blk = torch.zeros(s.numel(), dtype=torch.bool)
            blk[s.argsort()[:k]] = True
            pruned[:, j:j2] = blk.view(rows, j2 - j)
        err = torch.where(pruned[:, j], W[:, j], torch.zeros_like(W[:, j])) / hdiag[j]
        W[:, j:] -= torch.outer(err, hrow[j])
        W[pruned[:, j], j] = 0
    return W, pruned


@pytest.mark.parametrize("pattern", [Pattern(sparsity=0.5), Pattern(sparsity=0.7), Pattern(n=2, m=4)])
def test_matches_float64_obs_reference(pattern):
    torch.manual_seed(0)
    rows, d = 12, 40
    X = correlated_inputs(d, 400)
    H = 2 * X @ X.t() / X.shape[1]
    W = torch.randn(rows, d)
    Qref, pruned_ref = reference_obs(W, H, pattern, 0.01, 16)
    # In float64 the two must choose the same mask: rounding differences (which differ between BLAS
    # kernels and CPUs) are ~1e-16 relative, far below the gaps between the saliencies compared here.
    Q, pruned, _ = sparsegpt_solve(W.double(), H.double(), pattern, percdamp=0.01, blocksize=16)
    assert torch.equal(pruned, pruned_ref)
    torch.testing.assert_close(Q, Qref, rtol=1e-9, atol=1e-9)
    # The float32 solver the tool runs: a near-tie may flip with ~1e-7 rounding, so masks must agree almost
    # everywhere, and the result must be as good a solution of the layer problem as the reference's.
    Q32, pruned32, _ = sparsegpt_solve(W, H, pattern, percdamp=0.01, blocksize=16)
    assert (pruned32 == pruned_ref).float().mean() > 0.97 and pruned32.sum() == pruned_ref.sum()
    assert torch.all(Q32[pruned32] == 0)
    err = [((W.double() - q.double()) @ H.double() * (W.double() - q.double())).sum() for q in (Q32, Qref)]
    assert err[0] <= err[1] * 1.01


def test_unstructured_sparsity_exact_per_layer():
    X = correlated_inputs(100, 300)
    H = 2 * X @ X.t() / 300
    for s in (0.1, 0.5, 0.63, 0.9):
        _, pruned, _ = sparsegpt_solve(torch.randn(7, 100), H, Pattern(sparsity=s), blocksize=32)
        assert pruned.sum().item() == round(s * 700)


@pytest.mark.parametrize("method", ["sparsegpt", "magnitude", "wanda"])
@pytest.mark.parametrize("cin,cout,groups,k", [(16, 16, 16, 3), (6, 9, 3, 3), (15, 10, 5, 1)])
@pytest.mark.parametrize("sparsity", [0.5, 0.7, 0.35])
def test_grouped_conv_gets_the_layer_count(method, cin, cout, groups, k, sparsity):
    """Depthwise (9 weights per group) and grouped convs with an odd number of weights per group: the
    layer is pruned to its requested count within one weight, not every group rounded on its own."""
    torch.manual_seed(0)
    conv = nn.Conv2d(cin, cout, k, padding=k // 2, groups=groups)
    p = LayerPruner(conv, "c")
    p.add_batch(torch.randn(4, cin, 7, 7))
    res = p.prune(replace(PUBLISHED, method=method, blocksize=4), Pattern(sparsity=sparsity))
    n = conv.weight.numel()
    assert abs(int((~res.mask).sum()) - sparsity * n) <= 1
    assert int((conv.weight == 0).sum()) == int((~res.mask).sum()) and abs(res.sparsity - sparsity) <= 1 / n + 1e-6
    per_group = (~res.mask).reshape(groups, -1).sum(1).float()  # each group within one weight of its share
    assert torch.all((per_group - sparsity * n / groups).abs() < 1)


def test_nm_layout_conv_groups_along_input_channels():
    torch.manual_seed(0)
    conv = nn.Conv2d(8, 6, 3, padding=1)
    p = LayerPruner(conv, "c")
    p.add_batch(torch.randn(4, 8, 6, 6))
    res = p.prune(replace(PUBLISHED, method="sparsegpt"), Pattern(n=2, m=4))
    # (out, in, kh, kw): at each kernel tap, every group of 4 consecutive input channels keeps exactly 2
    kept = res.mask.permute(0, 2, 3, 1).reshape(6, 3, 3, 2, 4).sum(-1)
    assert torch.all(kept == 2)
    assert torch.equal(res.mask, conv.weight != 0) or torch.all(conv.weight[~res.mask] == 0)


@pytest.mark.parametrize("method", ["sparsegpt", "magnitude", "wanda"])
def test_bias_dtype_device_preserved(method):
    lin = nn.Linear(16, 5).to(torch.float64)
    bias = lin.bias.detach().clone()
    p = LayerPruner(lin, "l")
    p.add_batch(torch.randn(32, 16, dtype=torch.float64))
    res = p.prune(replace(PUBLISHED, method=method), Pattern(sparsity=0.5))
    assert torch.equal(lin.bias, bias)
    assert lin.weight.dtype == torch.float64 and lin.weight.device.type == "cpu"
    assert res.mask.dtype == torch.bool and res.mask.shape == lin.weight.shape
    assert (lin.weight == 0).sum().item() >= 40


@pytest.mark.parametrize("pattern", [Pattern(sparsity=0.5), Pattern(n=2, m=4)])
def test_error_ordering_sparsegpt_wanda_magnitude(pattern):
    torch.manual_seed(1)
    d = 64
    g = torch.Generator().manual_seed(3)
    scale = torch.rand(d, 1, generator=g) * 3 + 0.1  # uneven input norms make Wanda beat magnitude
    X = correlated_inputs(d, 2000) * scale
    errors = {}
    for method in ("sparsegpt", "wanda", "magnitude"):
        lin = nn.Linear(d, 32)
        torch.nn.init.normal_(lin.weight, generator=torch.Generator().manual_seed(5))
        p = LayerPruner(lin, "l")
        p.add_batch(X.t())
        errors[method] = p.prune(replace(PUBLISHED, method=method), pattern).error
    assert errors["sparsegpt"] < errors["wanda"] <= errors["magnitude"]


def _conv_via_unfold(conv, x):
    p = LayerPruner(conv, "c")
    X = p.columns(x)  # (groups, d, B*L)
    G, rows = conv.groups, conv.out_channels // conv.groups
    W = p.weight_matrix()[0]  # columns in the same (solver) order as X's rows
    Y = torch.bmm(W, X)  # (G, rows, B*L)
    out = F.conv2d(x, conv.weight, conv.bias, conv.stride, conv.padding if conv.padding_mode == "zeros" else 0,
                   conv.dilation, conv.groups) if conv.padding_mode == "zeros" else conv(x)
    B, _, Ho, Wo = out.shape
    Y = Y.reshape(G * rows, B, Ho * Wo).permute(1, 0, 2).reshape(B, -1, Ho, Wo)
    return Y + conv.bias.view(1, -1, 1, 1), out


@pytest.mark.parametrize("kw", [
    dict(stride=2, padding=1), dict(padding=2, dilation=2), dict(groups=2, padding=1), dict(groups=8, padding=1),
    dict(padding="same"), dict(padding=1, padding_mode="reflect"), dict(padding=1, padding_mode="circular"),
])
def test_pruned_conv_equals_matmul_over_unfolded_patches(kw):
    torch.manual_seed(0)
    conv = nn.Conv2d(8, 16, 3, **kw)
    x = torch.randn(3, 8, 9, 9)
    p = LayerPruner(conv, "c")
    p.add_batch(x)
    p.prune(replace(PUBLISHED, method="sparsegpt"), Pattern(sparsity=0.5))
    via_unfold, direct = _conv_via_unfold(conv, x)
    torch.testing.assert_close(via_unfold, direct, rtol=1e-4, atol=1e-4)
    assert 0.45 < (conv.weight == 0).float().mean().item() < 0.55


def test_dead_input_channels():
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 8, 1)
    x = torch.randn(16, 4, 5, 5)
    x[:, 1] = 0  # channel 1 never fires
    p = LayerPruner(conv, "c")
    p.add_batch(x)
    res = p.prune(replace(PUBLISHED, method="sparsegpt"), Pattern(sparsity=0.5))
    assert torch.all(conv.weight[:, 1] == 0)  # weights of a dead input cost nothing to remove
    assert torch.isfinite(conv.weight).all() and res.error is not None and res.error < 1


def test_all_zero_inputs_fall_back_to_magnitude():
    lin = nn.Linear(8, 4)
    p = LayerPruner(lin, "l")
    p.add_batch(torch.zeros(10, 8))
    with pytest.warns(RuntimeWarning, match="all zero"):
        res = p.prune(replace(PUBLISHED, method="sparsegpt"), Pattern(n=2, m=4))
    assert "magnitude" in res.reason and res.sparsity == 0.5


def test_singular_hessian_retries_damping():
    lin = nn.Linear(6, 3)
    p = LayerPruner(lin, "l")
    p.add_batch(torch.ones(10, 6))  # rank one: percdamp=0 cannot factor
    with pytest.warns(RuntimeWarning, match="Cholesky failed"):
        res = p.prune(replace(PUBLISHED, method="sparsegpt", percdamp=0.0), Pattern(sparsity=0.5))
    assert res.percdamp > 0 and torch.isfinite(lin.weight).all()


@pytest.mark.parametrize("config", [replace(PUBLISHED, solver="exact", percdamp=0.0),
                                    replace(RECOMMENDED, nm="2:4", percdamp=0.0)], ids=["exact", "recommended"])
def test_singular_hessian_raises_damping_in_every_solve(config):
    # rank 16 of 128: without damping, the exact solve, the swap, cg and the dense target raised LinAlgError
    torch.manual_seed(0)
    lin = nn.Linear(128, 8)
    p = LayerPruner(lin, "l")
    p.add_batch(torch.randn(300, 16) @ torch.randn(16, 128))
    with pytest.warns(RuntimeWarning, match="solve failed at percdamp=0 "):
        res = p.prune(config, Pattern(n=2, m=4))
    assert res.percdamp > 0 and res.sparsity == 0.5 and torch.isfinite(lin.weight).all()


def test_inputs_below_float32_range_are_magnitude_pruned():
    # a random-weight SSDlite's deep layers see inputs of 1e-22: H's products are denormals, rounding only (its exact
    # solve removed 62 of 64 weights per row at 2:4, then the swap failed); the all-zero rule takes them
    lin = nn.Linear(128, 8)
    p = LayerPruner(lin, "l")
    p.add_batch(torch.randn(300, 128) * 1e-22)
    with pytest.warns(RuntimeWarning, match="all but zero"):
        res = p.prune(replace(RECOMMENDED, nm="2:4"), Pattern(n=2, m=4))
    assert "magnitude" in res.reason and res.sparsity == 0.5 and torch.isfinite(lin.weight).all()


def test_non_finite_solve_is_solved_again_at_more_damping(monkeypatch):
    real = layer_module.prune_matrix

    def nan_at_first(Wg, H, method, pattern, percdamp, *args, **kwargs):
        Q, pruned, damp = real(Wg, H, method, pattern, percdamp, *args, **kwargs)
        return (Q * float("nan") if percdamp == 0.01 else Q), pruned, damp
    monkeypatch.setattr(layer_module, "prune_matrix", nan_at_first)
    lin = nn.Linear(8, 4)
    p = LayerPruner(lin, "l")
    p.add_batch(torch.randn(40, 8))
    with pytest.warns(RuntimeWarning, match="solve failed at percdamp=0.01"):
        res = p.prune(replace(PUBLISHED, solver="exact"), Pattern(sparsity=0.5))
    assert res.percdamp == pytest.approx(0.1) and torch.isfinite(lin.weight).all()


def test_hessian_never_positive_definite_is_a_user_error(monkeypatch):
    def fail(*args, **kwargs):
        raise torch.linalg.LinAlgError("not positive-definite")
    monkeypatch.setattr(layer_module, "prune_matrix", fail)
    p = LayerPruner(nn.Linear(8, 4), "l")
    p.add_batch(torch.randn(20, 8))
    with pytest.raises(UserError, match="layer l: .* not positive definite even with percdamp"):
        p.prune(replace(PUBLISHED, solver="exact"), Pattern(sparsity=0.5))


def test_nm_skip_when_channels_not_divisible():
    conv = nn.Conv2d(3, 8, 3)
    p = LayerPruner(conv, "stem")
    p.add_batch(torch.randn(2, 3, 8, 8))
    w = conv.weight.detach().clone()
    res = p.prune(replace(PUBLISHED, method="sparsegpt"), Pattern(n=2, m=4))
    assert res.skipped and "not divisible" in res.reason and torch.equal(conv.weight, w)


def test_deterministic():
    masks = []
    for _ in range(2):
        torch.manual_seed(0)
        lin = nn.Linear(32, 8)
        p = LayerPruner(lin, "l")
        p.add_batch(correlated_inputs(32, 100).t())
        masks.append(p.prune(replace(PUBLISHED, method="sparsegpt"), Pattern(sparsity=0.6)).mask)
    assert torch.equal(*masks)


@pytest.mark.parametrize("cin,groups", [(3, 1), (64, 1), (64, 2)])
def test_hessian_is_running_mean_of_2xxt(cin, groups):
    torch.manual_seed(0)
    conv = nn.Conv2d(cin, 8, 3, padding=1, groups=groups)  # d = 27, 576 (blocked syrk path), 288 per group
    p = LayerPruner(conv, "c")
    xs = [torch.randn(2, cin, 6, 6), torch.randn(3, cin, 6, 6)]
    for x in xs:
        p.add_batch(x)
    X = torch.cat([p.columns(x) for x in xs], dim=-1)
    ref = 2 * X @ X.transpose(1, 2) / X.shape[-1]
    torch.testing.assert_close(p.H, ref, rtol=1e-4, atol=1e-4)
    assert torch.equal(p.H, p.H.transpose(1, 2))


def test_inverse_cholesky_factor():
    from cnn_sparsegpt.kernels.linalg import _lower_triangular_inverse_, _reverse_, inverse_cholesky

    X = correlated_inputs(300, 900)
    H = (2 * X @ X.t() / 900)[None]
    U, _ = inverse_cholesky(H, 0.01)
    Hd = H[0] + 0.01 * torch.diag(H[0]).mean() * torch.eye(300)
    torch.testing.assert_close(U[0].t() @ U[0], torch.linalg.inv(Hd), rtol=1e-3, atol=1e-4)
    assert torch.equal(U[0], torch.triu(U[0]))
    L = torch.linalg.cholesky(Hd)[None]
    eye = torch.eye(300)[None]
    torch.testing.assert_close(_lower_triangular_inverse_(L.clone(), leaf=64) @ L, eye, rtol=0, atol=1e-4)
    for d in (7, 8, 300):
        M = torch.randn(2, d, d)
        assert torch.equal(_reverse_(M.clone(), step=3), M.flip(-2, -1))


def test_solver_leaves_h_unchanged():
    X = correlated_inputs(64, 200)
    X[5] = 0  # a dead input: its diagonal is changed during the solve and must be restored
    H = 2 * X @ X.t() / 200
    H0 = H.clone()
    sparsegpt_solve(torch.randn(8, 64), H, Pattern(n=2, m=4))
    assert torch.equal(H, H0)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("pattern", [Pattern(sparsity=0.5), Pattern(n=2, m=4)])
def test_cuda_graph_matches_the_loop(pattern):
    X = correlated_inputs(1100, 3000).cuda()
    H = 2 * X @ X.t() / 3000
    W = torch.randn(64, 1100, generator=torch.Generator().manual_seed(3)).cuda()
    graphs = {}
    for d in (1100, 700):  # the second layer replays the graph recorded for the first (same block shape)
        Qg, mg, _ = sparsegpt_solve(W[:, :d], H[:d, :d], pattern, graphs=graphs)  # full blocks, then a partial one
        Ql, ml, _ = sparsegpt_solve(W[:, :d], H[:d, :d], pattern, column_loop="loop")
        assert torch.equal(mg, ml)
        torch.testing.assert_close(Qg, Ql, rtol=1e-6, atol=1e-6)
    assert len(graphs) == 1


@pytest.mark.parametrize("groups", [1, 2])
def test_levels_solved_together_match_one_by_one(groups):
    """sparsegpt_curve (a matrix's levels as one batch over a shared factor, each counted on its own) gives each
    level's solve: the same errors as separate solves, up to rounding; a row scale is applied per level."""
    from cnn_sparsegpt.kernels.solver import relative_error, sparsegpt_curve

    g = torch.Generator().manual_seed(0)
    rows, d = 12, 300  # three of SparseGPT's 128-column blocks
    X = torch.randn(groups, d, 3 * d, generator=g)
    X[:, : d // 2] += X[:, d // 2:]  # correlated inputs
    X[:, 3] = 0  # a dead input
    H = X @ X.transpose(1, 2) / X.shape[-1]
    W = torch.randn(groups, rows, d, generator=g)
    scale = torch.rand(groups, rows, generator=g) + 0.5
    levels = [0.1, 0.5, 0.5, 0.9, 0.98]
    for row_scale in (None, scale):
        got = sparsegpt_curve(W, H, levels, 0.01, row_scale)
        want = [relative_error(W, sparsegpt_solve(W, H, Pattern(sparsity=s), 0.01, row_scale=row_scale)[0], H)
                for s in levels]
        torch.testing.assert_close(got, torch.stack(want), rtol=1e-4, atol=1e-7)
    _, pruned, _ = sparsegpt_solve(W[:1].expand(3, rows, d), H[:1], Pattern(sparsity=0.0),
                                   sparsities=torch.tensor([0.2, 0.5, 0.75], dtype=torch.float64))
    assert pruned.flatten(1).sum(1).tolist() == [round(s * rows * d) for s in (0.2, 0.5, 0.75)]
