"""Joint sparsity and weight quantization (quant.py): exact masks, kept weights on their grids, GPTQ < RTN."""
import pytest
import torch
from torch import nn

from cnn_sparsegpt import PUBLISHED, Pattern, prune_model
from cnn_sparsegpt.kernels.quant import fit_grid
from cnn_sparsegpt.kernels.solver import prune_matrix, relative_error

from .test_refine import _conv_problem


def _on_grid(Q, grid, tol=1e-4):
    c = Q / grid.scale + grid.zero
    return bool(((c - c.round()).abs() <= tol).all() and (c.round() >= 0).all() and (c.round() <= grid.maxq).all())


@pytest.mark.parametrize("pattern", [Pattern(n=2, m=4), Pattern(sparsity=0.5), Pattern(sparsity=0.0)], ids=str)
@pytest.mark.parametrize("bits", [8, 4, 3])
def test_gptq_joint_beats_round_to_nearest(pattern, bits):
    W, H = _conv_problem()
    grid = fit_grid(W, bits)
    errors = {}
    for quant in ("gptq", "rtn"):
        Q, pruned, _ = prune_matrix(W, H, "sparsegpt", pattern, grid=grid, quant=quant)
        assert torch.equal(Q[pruned], torch.zeros_like(Q[pruned]))  # pruned: exact zeros
        assert _on_grid(Q, grid)
        if pattern.is_nm:
            assert ((~pruned).view(-1, 4).sum(-1) == 2).all()
        errors[quant] = relative_error(W, Q, H)
    plain = relative_error(W, prune_matrix(W, H, "sparsegpt", pattern)[0], H)
    assert plain <= errors["gptq"] < errors["rtn"]


def test_prune_model_writes_codes_that_rebuild_the_weights():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 16, 3, padding=1),
                          nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(16 * 64, 10))
    rep = prune_model(model, torch.randn(32, 3, 8, 8), PUBLISHED, method="sparsegpt", nm="2:4", wbits=4, progress=False)
    assert rep.config.wbits == 4 and rep.config.quant == "gptq" and set(rep.quantized) == set(rep.masks)
    params = dict(model.named_parameters())
    for name, q in rep.quantized.items():
        shape = (-1,) + (1,) * (params[name].ndim - 1)
        rebuilt = q["scale"].view(shape) * (q["codes"].float() - q["zero"].float().view(shape))
        torch.testing.assert_close(rebuilt, params[name].detach(), rtol=0, atol=1e-6)
        assert q["codes"].max() <= 15
        assert torch.equal(params[name][~rep.masks[name]], torch.zeros(int((~rep.masks[name]).sum())))


def test_refine_with_wbits_is_refused():
    from cnn_sparsegpt.utils import UserError
    with pytest.raises(UserError, match="off their quantization grids"):
        prune_model(nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8), nn.Linear(8, 2)), torch.randn(16, 8),
                    sparsity=0.5, wbits=4, refine="cg", progress=False)


def test_mse_clipping_rounds_with_less_error_and_keeps_zero_on_the_grid():
    torch.manual_seed(0)
    W = torch.randn(1, 32, 288)
    W[0, :, 0] *= 8  # one outlier per row: min/max grids waste their levels on it
    for bits in (4, 3):
        minmax, mse = fit_grid(W, bits, "minmax"), fit_grid(W, bits, "mse")
        e_minmax = (minmax.quantize(W) - W).square().sum(-1)
        e_mse = (mse.quantize(W) - W).square().sum(-1)
        assert bool((e_mse <= e_minmax).all()) and e_mse.sum() < 0.9 * e_minmax.sum()
        assert torch.equal(mse.quantize(torch.zeros(1, 32, 1)), torch.zeros(1, 32, 1))


def test_a_layer_that_nm_cannot_prune_is_still_quantized():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
                          nn.Flatten(), nn.Linear(8 * 64, 10))
    rep = prune_model(model, torch.randn(32, 3, 8, 8), PUBLISHED, method="sparsegpt", nm="2:4", wbits=4, prune_all=True,
                      progress=False)
    first = next(r for r in rep.layers if r.name == "0")
    assert first.skipped and "quantized to 4 bits" in first.reason and first.sparsity == 0
    assert "0.weight" in rep.quantized and "0.weight" not in rep.masks  # on its grid, not pruned
    q, w = rep.quantized["0.weight"], model[0].weight.detach()
    rebuilt = q["scale"].view(-1, 1, 1, 1) * (q["codes"].float() - q["zero"].float().view(-1, 1, 1, 1))
    torch.testing.assert_close(rebuilt, w, rtol=0, atol=1e-6)
    assert abs(rep.sparsity - 0.5) < 1e-6  # the totals count the pruned layers only
