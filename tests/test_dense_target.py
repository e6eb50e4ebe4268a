"""The asymmetric target (dense_target.py): fit W·X_dense with Ŵ·X_pruned."""
import copy

import torch
from torch import nn

from cnn_sparsegpt import PUBLISHED, prune_model
from cnn_sparsegpt.pruning.dense_target import DenseInputs, dense_target_weights


def _mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 48), nn.ReLU(),
                         nn.Linear(48, 10))


def test_unchanged_inputs_keep_the_weights():
    X = torch.randn(1, 32, 500)
    H = 2 * X @ X.transpose(1, 2) / 500
    W = torch.randn(1, 8, 32)
    torch.testing.assert_close(dense_target_weights(W, H, torch.zeros_like(W), 0.01), W, rtol=0, atol=0)


def test_unchanged_conv_inputs_give_an_exactly_zero_correction():
    """R = W·(C − H) is summed from W·(X_d − X_p)·X_pᵀ: exactly 0 where the inputs did not change, not the rounding
    noise of two differently computed products (which the re-fit and cg amplified, thread-count dependent)."""
    from cnn_sparsegpt.pruning.layer import LayerPruner

    torch.manual_seed(0)
    conv = nn.Conv2d(16, 32, 3, padding=1)
    x = torch.randn(20, 16, 12, 12)
    pruner = LayerPruner(conv, "conv", dense_target=True)
    for b in x.split(7):
        pruner.add_batch(b, b.clone())
    assert pruner.rhs_outputs and torch.count_nonzero(pruner.R) == 0


def test_first_pruned_layer_is_as_before_and_later_layers_fit_the_dense_outputs():
    model, x = _mlp(), torch.randn(512, 16)
    dense = copy.deepcopy(model)
    runs = {}
    for dt in (False, True):
        m = copy.deepcopy(model)
        runs[dt] = (m, prune_model(m, x, PUBLISHED, method="sparsegpt", sparsity=0.8, prune_all=True,
                                   dense_target=dt, progress=False))
        assert runs[dt][1].config.dense_target is dt
    # the first layer sees the dense inputs either way: the same weights
    assert torch.equal(runs[False][0][0].weight, runs[True][0][0].weight)
    # later layers: the asymmetric error ‖W X_d − Ŵ X_p‖² is smaller with the dense target
    Xd = DenseInputs(dense, [x])
    for i in (2, 4):
        errs = {}
        for dt, (m, _) in runs.items():
            xp = m[:i](x)
            xd = next(Xd.stream(str(i)))
            errs[dt] = (dense[i](xd) - m[i](xp)).square().sum().item()
        assert errs[True] < errs[False]
    # and so is the network's output error
    out = {dt: (dense(x) - m(x)).square().mean().item() for dt, (m, _) in runs.items()}
    assert out[True] < out[False]


def test_dense_inputs_ignore_later_changes_to_the_model():
    model, x = _mlp(), torch.randn(64, 16)
    di = DenseInputs(model, list(x.split(32)))
    expected = model[:2](x)
    with torch.no_grad():
        model[0].weight.zero_()
    got = torch.cat(list(di.stream("2")))
    torch.testing.assert_close(got, expected)
    assert di.seconds > 0


def test_reconstruct_keeps_masks_and_moves_towards_the_dense_outputs():
    model, x = _mlp(), torch.randn(512, 16)
    dense = copy.deepcopy(model)
    plain, rec = copy.deepcopy(model), copy.deepcopy(model)
    prune_model(plain, x, PUBLISHED, method="magnitude", sparsity=0.8, prune_all=True, progress=False)
    rep = prune_model(rec, x, PUBLISHED, method="magnitude", sparsity=0.8, prune_all=True, progress=False,
                      reconstruct=5)
    assert rep.reconstruct["epochs"] == 5 and rep.reconstruct["loss"][-1] < rep.reconstruct["loss"][0]
    assert "reconstruct" in rep.timings
    for name, mask in rep.masks.items():  # the same masks as the plain prune, pruned weights exactly zero
        w = dict(rec.named_parameters())[name]
        assert torch.equal(w[~mask], torch.zeros_like(w[~mask]))
        assert torch.equal(mask, dict(plain.named_parameters())[name] != 0)
    assert all(p.requires_grad for p in rec.parameters())  # left as it was found
    err = {k: (dense(x) - m(x)).square().mean().item() for k, m in (("plain", plain), ("rec", rec))}
    assert err["rec"] < err["plain"]


def test_dense_graph_in_step_serves_the_same_inputs_as_truncated_passes():
    from cnn_sparsegpt import create_model

    torch.manual_seed(0)
    model, x = create_model("resnet18_cifar").eval(), torch.randn(8, 3, 32, 32)
    names = ["layer1.0.conv1", "layer2.0.conv2", "layer2.0.downsample.0", "layer4.1.conv2", "fc"]
    truncated, stepped = DenseInputs(model, list(x.split(4))), DenseInputs(model, list(x.split(4)))
    assert stepped.follow_graph(names)
    for name in names:  # in graph order, as the pruned run asks for them
        for a, b in zip(truncated.stream(name), stepped.stream(name), strict=True):
            torch.testing.assert_close(a, b)
    stepped.free()


def test_dense_target_prune_is_the_same_with_either_way_of_serving_dense_inputs(monkeypatch):
    from cnn_sparsegpt import create_model
    from cnn_sparsegpt.pruning import dense_target

    def no_truncated_passes(*args, **kwargs):
        raise AssertionError("a traceable model's dense inputs come from its graph, in both memory policies")

    monkeypatch.setattr(dense_target, "inputs_of", no_truncated_passes)
    torch.manual_seed(0)
    model, x = create_model("resnet20_cifar"), torch.randn(64, 3, 32, 32)
    results = []
    for low_memory in (False, True):  # low memory: the dense graph recomputes as the pruned one does
        m = copy.deepcopy(model)
        results.append(prune_model(m, x, PUBLISHED, method="sparsegpt", sparsity=0.7, dense_target=True,
                                   low_memory=low_memory,
                                   progress=False, bn_recalibration=False))
    passes = [r.timings["dense_target"] for r in results]
    assert all(p > 0 for p in passes)
    for a, b in zip(*(r.layers for r in results)):
        assert a.name == b.name and (a.error is None) == (b.error is None)
        if a.error is not None:
            assert abs(a.error - b.error) <= 1e-3 * max(a.error, 1e-6)


def test_memory_policy_counts_the_dense_copy():
    from cnn_sparsegpt.pruning.graph import memory_policy

    gb = 2**30
    low, why = memory_policy(gb // 1024, 1024, torch.device("cpu"), free=5 * gb)  # 2 GB of activations
    assert not low and why.startswith("default (2 activations")
    low, why = memory_policy(gb // 1024, 1024, torch.device("cpu"), free=5 * gb, copies=2)  # 4 GB > 2.5 GB
    assert low and "4 activations" in why


def test_target_share_spans_the_own_weights_target_and_the_dense_one():
    """target_share α fits W·X_p + α·W·(X_d − X_p): α = 0 is the published target (the same prune up to rounding),
    α = 1 the dense target exactly, and a share between them lands between them in the dense-output error."""
    from cnn_sparsegpt import RECOMMENDED

    model, x = _mlp(1), torch.randn(512, 16)
    dense = copy.deepcopy(model)
    runs = {}
    for key, opts in {"published": dict(dense_target=False), "0": dict(target_share=0.0),
                      "0.5": dict(target_share=0.5), "1": dict(target_share=1.0), "default": {}}.items():
        m = copy.deepcopy(model)
        prune_model(m, x, RECOMMENDED, method="sparsegpt", sparsity=0.8, prune_all=True, allocation="uniform",
                    refine="none", progress=False, **opts)
        runs[key] = m
    for a, b in (("published", "0"), ("1", "default")):
        for pa, pb in zip(runs[a].parameters(), runs[b].parameters()):
            torch.testing.assert_close(pa, pb, rtol=1e-4, atol=1e-5)
    err = {k: (dense(x) - m(x)).square().mean().item() for k, m in runs.items()}
    assert err["1"] < err["0.5"] < err["0"]
