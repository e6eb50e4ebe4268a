"""Beyond uniform SparseGPT: layer allocation (owl, dp), BN-aware saliency, statistics correction."""
import copy

import pytest
import torch
from torch import nn

from cnn_sparsegpt import PUBLISHED, UserError, prune_model
from cnn_sparsegpt.pruning.allocation import GRID, knapsack, match_budget
from cnn_sparsegpt.pruning.saliency import bn_row_scales

from .test_prune_model import TinyResNet, Untraceable, calib, make


def test_knapsack_matches_brute_force():
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        L, K = 3, 4
        errors = torch.rand(L, K, generator=g, dtype=torch.float64).cumsum(1)  # more sparsity, more error
        costs = torch.randint(0, 6, (L, K), generator=g).cumsum(1)
        need = int(costs[:, -1].sum()) // 2
        picked = knapsack(errors, costs, need)
        assert sum(int(costs[l, k]) for l, k in enumerate(picked)) >= need
        best = min(sum(float(errors[l, k]) for l, k in enumerate(c)) for c in torch.cartesian_prod(
            *[torch.arange(K)] * L).tolist() if sum(int(costs[l, k]) for l, k in enumerate(c)) >= need)
        assert sum(float(errors[l, k]) for l, k in enumerate(picked)) == pytest.approx(best)


def test_match_budget_is_exact_and_clipped():
    s = torch.tensor([0.2, 0.9, 0.99, 0.5])
    size = torch.tensor([10.0, 100.0, 5.0, 1000.0])
    out = match_budget(s, size, 0.7)
    assert float((out * size).sum() / size.sum()) == pytest.approx(0.7, abs=1e-9)
    assert out.min() >= 0 and out.max() <= 0.99


@pytest.mark.parametrize("allocation", ["owl", "dp"])
@pytest.mark.parametrize("method", ["sparsegpt", "magnitude", "wanda"])
def test_allocation_keeps_the_overall_budget(allocation, method):
    model = make()
    rep = prune_model(model, calib(), PUBLISHED, method=method, sparsity=0.7, allocation=allocation, progress=False)
    pruned = [r for r in rep.layers if not r.skipped]
    n = sum(r.mask.numel() for r in pruned)
    zeros = sum(int((~r.mask).sum()) for r in pruned)
    assert abs(zeros - 0.7 * n) <= len(pruned)  # each layer within one weight of its own target
    assert len({round(r.sparsity, 3) for r in pruned}) > 1  # not uniform
    assert rep.allocation["kind"] == allocation
    if allocation == "dp":
        assert set(rep.allocation["errors"]) == {r.name for r in pruned}
        assert all(len(e) == len(GRID) and e[0] == 0 for e in rep.allocation["errors"].values())


def test_flops_budget_counts_multiply_adds():
    model = make()
    rep = prune_model(model, calib(), PUBLISHED, method="magnitude", sparsity=0.6, allocation="owl", budget="flops",
                      progress=False)
    from cnn_sparsegpt.pruning.prune import forward_order
    positions = {}
    forward_order(make(), calib(1), positions=positions)
    pruned = [r for r in rep.layers if not r.skipped]
    flops = torch.tensor([r.mask.numel() * positions[r.name] for r in pruned], dtype=torch.float64)
    s = torch.tensor([r.sparsity for r in pruned], dtype=torch.float64)
    assert float((s * flops).sum() / flops.sum()) == pytest.approx(0.6, abs=0.01)


def test_dp_lowers_the_summed_layer_error_of_the_database():
    """The DP's choice costs no more database error than uniform at the same budget."""
    model = make()
    rep = prune_model(copy.deepcopy(model), calib(), PUBLISHED, method="sparsegpt", sparsity=0.8, allocation="dp",
                      progress=False)
    errors = {n: torch.tensor(e) for n, e in rep.allocation["errors"].items()}
    grid = torch.tensor(GRID)

    def at(e, s):  # the database error at sparsity s (linear between grid points)
        i = int(torch.searchsorted(grid, torch.tensor(s)).clamp(1, len(grid) - 1))
        t = (s - grid[i - 1]) / (grid[i] - grid[i - 1])
        return float(e[i - 1] + t * (e[i] - e[i - 1]))

    by = {r.name: r for r in rep.layers}
    chosen = sum(at(errors[n], by[n].sparsity) for n in errors)
    uniform = sum(at(errors[n], 0.8) for n in errors)
    assert chosen <= uniform * 1.02


def test_nm_with_allocation_is_an_error():
    with pytest.raises(UserError, match="N:M is uniform"):
        prune_model(make(), calib(), PUBLISHED, method="sparsegpt", nm="2:4", allocation="dp", progress=False)


def test_bn_row_scales_and_bn_aware_masks():
    model = make()
    scales = bn_row_scales(model)
    assert set(scales) == {"stem", "block.conv1", "block.conv2", "block.down.0"}
    bn = model.block.bn1
    torch.testing.assert_close(scales["block.conv1"], (bn.weight / (bn.running_var + bn.eps).sqrt()) ** 2)
    # a row whose BN multiplies it by ~0 is worth ~nothing: BN-aware magnitude prunes it first
    with torch.no_grad():
        model.block.bn1.weight[0] = 1e-4
    rep = prune_model(model, calib(), PUBLISHED, method="magnitude", sparsity=0.5, bn_aware=True,
                      bn_recalibration=False, progress=False)
    mask = {r.name: r.mask for r in rep.layers}["block.conv1"]
    assert not mask[0].any() and rep.config.bn_aware


def test_stat_correction_matches_dense_means():
    """Layers with a bias get the dense per-channel mean output on the calibration images, exactly."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
                          nn.Flatten(), nn.Linear(8 * 8 * 8, 16), nn.ReLU(), nn.Linear(16, 4)).eval()
    x = calib()
    dense = copy.deepcopy(model)
    means = {}
    hooks = [m.register_forward_hook(lambda mod, i, o, k=k: means.setdefault(k, []).append(o))
             for k, m in (("conv", dense[2]), ("fc", dense[5]))]
    with torch.no_grad():
        dense(x)
    for h in hooks:
        h.remove()
    rep = prune_model(model, x, PUBLISHED, method="magnitude", sparsity=0.8, stat_correction=True, progress=False)
    assert set(rep.stat_corrected) == {"2", "5"}
    got = {}
    hooks = [m.register_forward_hook(lambda mod, i, o, k=k: got.setdefault(k, []).append(o))
             for k, m in (("conv", model[2]), ("fc", model[5]))]
    with torch.no_grad():
        model(x)
    torch.testing.assert_close(got["conv"][0].mean((0, 2, 3)), means["conv"][0].mean((0, 2, 3)), rtol=0, atol=1e-4)
    torch.testing.assert_close(got["fc"][0].mean(0), means["fc"][0].mean(0), rtol=0, atol=1e-4)


def test_stat_correction_of_batchnorm_outputs():
    model, dense = make(TinyResNet), make(TinyResNet)
    x = calib()
    outs = {}
    for net, key in ((dense, "dense"), (model, "pruned")):
        if key == "pruned":
            prune_model(model, x, PUBLISHED, method="magnitude", sparsity=0.8, stat_correction=True, progress=False)
        h = net.block.bn2.register_forward_hook(lambda m, i, o, key=key: outs.setdefault(key, o))
        with torch.no_grad():
            net(x)
        h.remove()
    for stat in (lambda y: y.mean((0, 2, 3)), lambda y: y.var((0, 2, 3), unbiased=False)):
        torch.testing.assert_close(stat(outs["pruned"]), stat(outs["dense"]), rtol=0.02, atol=0.02)


@pytest.mark.parametrize("cls", [TinyResNet, Untraceable])  # the KL runs from each layer on, or whole passes
@pytest.mark.filterwarnings("ignore:torch.fx cannot trace")  # Untraceable: the per-layer fallback, on purpose
def test_dp_kl_measure_scales_each_curve_to_its_output_kl(cls):
    rep = prune_model(make(cls), calib(), PUBLISHED, method="sparsegpt", sparsity=0.8, allocation="dp", dp_measure="kl",
                      progress=False)
    kl = rep.allocation["kl_at_sparsity"]
    assert rep.allocation["dp_measure"] == "kl" and set(kl) == set(rep.allocation["errors"])
    assert all(v >= 0 for v in kl.values())
    pruned = [r for r in rep.layers if not r.skipped]
    n = sum(r.mask.numel() for r in pruned)
    assert abs(sum(int((~r.mask).sum()) for r in pruned) - 0.8 * n) <= len(pruned)


@pytest.mark.parametrize("use_fx", [True, False])
@pytest.mark.parametrize("method", ["magnitude", "wanda"])
def test_methods_without_a_hessian_accumulate_none(method, use_fx, monkeypatch):
    """Magnitude needs nothing from the inputs and Wanda only ‖X_j‖²: as published (no re-fit reads H) no d×d
    Hessian is accumulated, and the reported error, measured on the layers' outputs, is the Hessian's."""
    import cnn_sparsegpt.pruning.layer as layer

    reference = make()
    ref = prune_model(reference, calib(), PUBLISHED, method=method, sparsity=0.5, prune_all=True, progress=False,
                      use_fx=use_fx,
                      refine="cg")  # cg reads H: the Hessian path, same masks on the first layer
    real = layer.accumulate_xxt_
    monkeypatch.setattr(layer, "accumulate_xxt_", lambda *a, **k: (_ for _ in ()).throw(AssertionError("H built")))
    model = make()
    rep = prune_model(model, calib(), PUBLISHED, method=method, sparsity=0.5, prune_all=True, progress=False,
                      use_fx=use_fx)
    monkeypatch.setattr(layer, "accumulate_xxt_", real)
    assert all(r.error_from == "outputs" and r.error >= 0 for r in rep.layers)
    first = rep.layers[0]
    assert first.name == "stem" and torch.equal(first.mask, ref.layers[0].mask)
    h = layer.LayerPruner(make().stem, "stem")
    h.add_batch(calib())
    Wg, _ = h.weight_matrix()
    Q = layer.LayerPruner(model.stem, "stem").weight_matrix()[0]
    from cnn_sparsegpt.kernels.solver import relative_error
    assert first.error == pytest.approx(float(relative_error(Wg, Q, h.H)), rel=1e-4)


@pytest.mark.parametrize("cls", ["TinyResNet", "InPlaceNet"])
def test_each_change_matches_whole_runs(cls):
    """The KL measures' runs from each change's first module on (the dense prefix once, in chunks of images) give
    the outputs of whole forward passes with that change, also through in-place ops and for a change of two
    modules; the model is left as it was."""
    from contextlib import contextmanager

    from torch import fx

    from cnn_sparsegpt.pruning.graph import each_change

    from . import test_prune_model as tpm

    model, x = tpm.make(getattr(tpm, cls)), tpm.calib()
    before = copy.deepcopy(model.state_dict())
    names = [n for n, m in model.named_modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
    changes = {n: [n] for n in names} | {"pair": [names[-1], names[1]]}

    @contextmanager
    def halved(key):
        ws = [model.get_submodule(n).weight for n in changes[key]]
        for w in ws:
            w.data.mul_(0.5)
        try:
            yield
        finally:
            for w in ws:
                w.data.mul_(2)

    got = dict(each_change(fx.symbolic_trace(model), list(x.split(5)), changes, halved))
    assert list(got) == names[:2] + ["pair"] + names[2:] + [None]  # by the first module read, in graph order
    torch.testing.assert_close(torch.cat(got[None]), model(x))
    for key in changes:
        with halved(key):
            torch.testing.assert_close(torch.cat(got[key]), model(x))
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, before[k])


def test_kl_measure_in_chunks_matches_one_run():
    """The KL measure run in chunks of images (a CPU's large activations) gives the same per-layer KL."""
    from dataclasses import replace

    from cnn_sparsegpt.pruning.allocation import allocate

    model, x = make(), calib()
    names = [n for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))][1:-1]
    config = replace(PUBLISHED, sparsity=0.7, allocation="dp", dp_measure="kl")
    whole = allocate(config, model, [x], names)["kl_at_sparsity"]
    parts = allocate(config, model, [x], names, chunk=24)["kl_at_sparsity"]
    assert whole.keys() == parts.keys()
    for n in names:
        assert abs(whole[n] - parts[n]) <= 1e-5 * abs(whole[n]) + 1e-12
