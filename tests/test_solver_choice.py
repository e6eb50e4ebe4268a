"""`solver` (sparsegpt | exact | auto) and `hessians` (pruned | dense) through prune_model."""
import copy

import pytest
import torch

from cnn_sparsegpt import PUBLISHED, PruneConfig, UserError, prune_model
from cnn_sparsegpt.kernels import solver as solver_module

from .test_prune_model import TinyResNet, calib, make


@pytest.mark.parametrize("nm, sparsity", [("2:4", None), (None, 0.7)])
def test_exact_solver_errs_less_than_sparsegpt(nm, sparsity):
    x = calib(64)
    reps = {s: prune_model(make(TinyResNet), x, PUBLISHED, solver=s, nm=nm, sparsity=sparsity, progress=False)
            for s in ("sparsegpt", "exact")}
    for a, b in zip(reps["sparsegpt"].layers, reps["exact"].layers):
        if a.skipped:
            continue
        assert b.solver == "exact" and a.solver == "sparsegpt" and abs(a.sparsity - b.sparsity) < 1e-6
    first = next(r for r in reps["exact"].layers if not r.skipped)  # the same inputs: the exact greedy is better
    assert first.error <= next(r for r in reps["sparsegpt"].layers if r.name == first.name).error * 1.0001


def test_auto_solver_uses_the_budget(monkeypatch):
    monkeypatch.setattr(solver_module, "EXACT_BUDGET", 16 * 72 ** 3)  # block.conv1 (16 x 72) in, conv2 (16x144) out
    rep = prune_model(make(TinyResNet), calib(64), PUBLISHED, solver="auto", nm="2:4", progress=False)
    by = {r.name: r.solver for r in rep.layers if not r.skipped}
    assert by["block.conv1"] == "exact" and by["block.conv2"] == "sparsegpt"
    assert rep.config.solver == "auto" and "solver" in rep.as_dict()["layers"][1]


def test_dense_hessians_prune_each_layer_as_in_the_dense_network():
    """hessians='dense': a layer's mask is the one it gets when every layer before it is still dense."""
    x = calib(64)
    whole = make(TinyResNet)
    # BatchNorm statistics stay as trained in both (re-estimating them on the way would change the inputs)
    rep = prune_model(whole, x, PUBLISHED, hessians="dense", sparsity=0.6, bn_recalibration=False, progress=False)
    alone = make(TinyResNet)
    prune_model(alone, x, PUBLISHED, sparsity=0.6, ignore=["stem", "block.conv1", "block.down.0", "fc"],
                prune_all=True, bn_recalibration=False, progress=False)  # only block.conv2, on dense inputs
    agree = (rep.masks["block.conv2.weight"] == (alone.block.conv2.weight != 0)).float().mean()
    assert agree > 0.99
    seq = make(TinyResNet)
    rep_seq = prune_model(seq, x, PUBLISHED, sparsity=0.6, bn_recalibration=False, progress=False)
    assert not torch.equal(rep_seq.masks["block.conv2.weight"], rep.masks["block.conv2.weight"])


def test_solver_options_are_checked():
    assert PruneConfig(method="magnitude").resolved().solver == "sparsegpt"  # auto: nothing to choose there
    with pytest.raises(UserError, match="OBS solver of method sparsegpt"):
        prune_model(make(TinyResNet), calib(), method="magnitude", solver="exact", sparsity=0.5)
    with pytest.raises(UserError, match="does not quantize"):
        prune_model(make(TinyResNet), calib(), solver="exact", nm="2:4", wbits=4)
    with pytest.raises(UserError, match="unknown hessians"):
        prune_model(make(TinyResNet), calib(), hessians="both", nm="2:4")
    with pytest.raises(UserError, match="block OBS"):
        prune_model(make(TinyResNet), calib(), structure="channels", keep_macs=0.5, solver="exact")
