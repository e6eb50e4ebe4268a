"""The intercept (pruning/intercept.py): each layer's solve on centred inputs, the mean output's change folded into
a bias or the following BatchNorm."""
import copy
from dataclasses import replace

import pytest
import torch
from torch import nn

from cnn_sparsegpt import PUBLISHED, RECOMMENDED, prune_model
from cnn_sparsegpt.pruning.config import recipe_label
from cnn_sparsegpt.pruning.intercept import offset_sinks
from cnn_sparsegpt.pruning.layer import LayerPruner

from .test_prune_model import TinyResNet


@pytest.mark.parametrize("layer", [
    nn.Conv2d(4, 6, 3, padding=1), nn.Conv2d(4, 6, 3, stride=2, padding=1), nn.Conv2d(4, 6, (3, 2), dilation=2),
    nn.Conv2d(4, 6, 3, padding="same", padding_mode="reflect"), nn.Conv2d(4, 8, 3, padding=1, groups=2),
    nn.Conv2d(4, 4, 3, padding=1, groups=4), nn.Linear(5, 3)])
def test_column_sums_equal_the_unfolded_columns_summed(layer):
    """The windowed sums (and sums of squares: diag(H) without a Hessian) equal the unfolded columns'."""
    p = LayerPruner(layer, hessian=False)
    x = torch.randn(3, 5) if isinstance(layer, nn.Linear) else torch.randn(3, 4, 9, 8)
    X = p.columns(x).double()
    sums, n = p.column_sums(x)
    torch.testing.assert_close(sums, X.sum(-1), rtol=1e-5, atol=1e-5)
    assert n == X.shape[-1]
    p.add_batch(x)
    full = LayerPruner(layer)
    full.add_batch(x)
    torch.testing.assert_close(p.hessian_diagonal(), full.hessian_diagonal(), rtol=1e-5, atol=1e-6)
    with_target = LayerPruner(layer, hessian=False, dense_target=True)  # a dense target's columns, no H
    with_target.add_batch(x, x + 0.1)
    torch.testing.assert_close(with_target.hessian_diagonal(), full.hessian_diagonal(), rtol=1e-5, atol=1e-6)


class ConvBN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 8, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 3)

    def forward(self, x):
        return self.fc(torch.relu(self.bn(self.conv(x))).mean((2, 3)))


def test_sinks_are_biases_and_batchnorms_that_alone_read_the_layer():
    model = TinyResNet()
    names = [n for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    sinks = offset_sinks(model, names)
    modules = dict(model.named_modules())
    assert sinks["fc"] is modules["fc"]  # a bias
    for name, sink in sinks.items():
        assert sink is modules[name] or isinstance(sink, nn.BatchNorm2d)
    assert any(isinstance(s, nn.BatchNorm2d) for s in sinks.values())


@pytest.mark.parametrize("pattern", [{"sparsity": 0.6}, {"nm": "2:4"}])
def test_a_constant_shift_of_the_inputs_changes_only_the_offset(pattern):
    """With an intercept the solve sees the inputs' covariances: adding a constant to every input column leaves
    the mask and the weights as they were (to rounding); the offset absorbs the rest. Without it they change."""
    torch.manual_seed(0)
    layer = nn.Linear(16, 6)
    x = torch.randn(512, 16) @ torch.randn(16, 16) * 0.5
    shift = 3 * torch.rand(16)
    outs = {}
    for intercept in (True, False):
        for name, inputs in (("plain", x), ("shifted", x + shift)):
            lin = copy.deepcopy(layer)
            p = LayerPruner(lin, track_mean=True)
            p.add_batch(inputs)
            res = p.prune(replace(PUBLISHED, **pattern), intercept=intercept)
            outs[intercept, name] = (lin.weight.detach().clone(), res.mask, res.offset)
    w0, m0, off0 = outs[True, "plain"]
    w1, m1, off1 = outs[True, "shifted"]
    assert torch.equal(m0, m1)
    torch.testing.assert_close(w0, w1, rtol=1e-3, atol=1e-4)
    torch.testing.assert_close(off1 - off0, ((layer.weight - w1) @ shift).double(), rtol=1e-3, atol=1e-4)
    assert not torch.allclose(outs[False, "plain"][0], outs[False, "shifted"][0], atol=1e-3)


def test_the_offset_keeps_the_mean_output_through_the_batchnorm():
    """The pruned layer's mean output, through its BatchNorm's folded running mean, is the dense one's."""
    torch.manual_seed(0)
    model = ConvBN().eval()
    x = torch.rand(64, 4, 8, 8) + 0.5  # positive inputs: a large mean
    dense = copy.deepcopy(model)
    prune_model(model, x, RECOMMENDED, sparsity=0.7, bn_recalibration=False, progress=False)
    pre = lambda m: (m.conv(x) - m.bn.running_mean[:, None, None]).mean((0, 2, 3))  # noqa: E731
    torch.testing.assert_close(pre(model), pre(dense), rtol=1e-3, atol=1e-4)
    model2 = copy.deepcopy(dense)
    prune_model(model2, x, RECOMMENDED, sparsity=0.7, bn_recalibration=False, intercept=False, progress=False)
    assert model2.bn.running_mean.equal(dense.bn.running_mean)  # no fold without the intercept


def test_the_intercept_is_a_recipe_setting():
    assert RECOMMENDED.intercept and not PUBLISHED.intercept
    assert "intercept=True" in recipe_label(RECOMMENDED) and "intercept" not in recipe_label(PUBLISHED)


def test_weight_masks_leave_biases_alone():
    """Without a BatchNorm after it, a layer's weight-mask solve has no intercept (its bias is not a sink there)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4))
    x = torch.rand(256, 16) + 1
    a, b = copy.deepcopy(model), copy.deepcopy(model)
    prune_model(a, x, RECOMMENDED, sparsity=0.5, prune_all=True, progress=False)
    prune_model(b, x, RECOMMENDED, sparsity=0.5, prune_all=True, intercept=False, progress=False)
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert torch.equal(pa, pb)
