"""refit_dense_layers: the layers kept dense are re-fitted to the dense network's outputs, all weights kept."""
import copy

import pytest
import torch
from torch import nn

from cnn_sparsegpt import RECOMMENDED, PruneConfig, prune_model
from cnn_sparsegpt.pruning.config import recipe_label
from cnn_sparsegpt.pruning.layer_plan import refit_layers


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.conv2, self.bn2 = nn.Conv2d(8, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16)
        self.conv3, self.bn3 = nn.Conv2d(16, 16, 1, bias=False), nn.BatchNorm2d(16)
        self.fc = nn.Linear(16, 5)

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.bn2(self.conv2(x)))
        x = torch.relu(self.bn3(self.conv3(x)))
        return self.fc(x.mean((2, 3)))


def _net_and_images():
    torch.manual_seed(0)
    net = Net().eval()
    for bn in (net.bn1, net.bn2, net.bn3):  # statistics of their own, so that re-estimating them changes something
        bn.running_mean.uniform_(-0.2, 0.2)
        bn.running_var.uniform_(0.5, 2.0)
    return net, torch.randn(96, 3, 8, 8)


def _fc_inputs(model, images):
    xs = []
    hook = model.fc.register_forward_hook(lambda m, i, o: xs.append(i[0].double()))
    with torch.no_grad():
        model(images)
    hook.remove()
    return xs[0]


def test_refit_layers_after_the_first_pruned_one():
    plan = {"a": "first conv", "b": "", "c": "in the ignore list", "d": "", "e": "last linear"}
    assert refit_layers(plan, list(plan)) == ["c", "e"]
    assert refit_layers({"a": "first conv", "b": "last linear"}, ["a", "b"]) == []


def test_last_linear_fits_the_dense_logits_by_least_squares():
    """With no damping the re-fit classifier is the ordinary least-squares fit (weights and bias) of the dense
    logits on the pruned network's features, as float64 computes it; the first conv, before any pruned layer, is
    left exactly as it was, and the pruned layer's mask is as without the re-fit."""
    net, images = _net_and_images()
    dense, plain = copy.deepcopy(net), copy.deepcopy(net)
    cfg = PruneConfig(nm="2:4", percdamp=0.0, solver="sparsegpt", permute=False)  # channels in their order
    report = prune_model(net, images, cfg, progress=False, refit_dense_layers=True)
    reference = prune_model(plain, images, cfg, progress=False)
    layers = {r.name: r for r in report.layers}
    assert layers["fc"].refitted and layers["fc"].skipped and not layers["conv1"].refitted
    assert "last linear" in layers["fc"].reason
    assert set(report.masks) == {"conv2.weight", "conv3.weight"}  # the re-fit layer is not pruned
    assert torch.equal(report.masks["conv2.weight"], reference.masks["conv2.weight"])
    assert torch.equal(net.conv1.weight, dense.conv1.weight) and torch.equal(net.conv1.bias, dense.conv1.bias)
    assert torch.equal(plain.fc.weight, dense.fc.weight)  # off: as before
    xp, xd = _fc_inputs(net, images), _fc_inputs(dense, images)
    target = xd @ dense.fc.weight.double().T + dense.fc.bias.double()
    X = torch.cat([xp, torch.ones(len(xp), 1, dtype=xp.dtype)], 1)
    fit = torch.linalg.lstsq(X, target).solution.T
    torch.testing.assert_close(net.fc.weight.double(), fit[:, :-1], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(net.fc.bias.double(), fit[:, -1], rtol=1e-4, atol=1e-4)
    logits = lambda m: m(images).double()  # noqa: E731
    with torch.no_grad():
        assert (logits(net) - logits(dense)).square().mean() < (logits(plain) - logits(dense)).square().mean()


def test_an_ignored_layer_between_pruned_ones_is_refitted():
    net, images = _net_and_images()
    before = net.conv3.weight.clone()
    report = prune_model(net, images, RECOMMENDED, progress=False, sparsity=0.5, allocation="uniform",
                         ignore=("conv3",), refit_dense_layers=True, prune_all=True)
    layers = {r.name: r for r in report.layers}
    assert layers["conv3"].refitted and "ignore" in layers["conv3"].reason and layers["conv3"].sparsity == 0.0
    assert not torch.equal(net.conv3.weight, before) and bool((net.conv3.weight != 0).all())
    assert not layers["conv1"].refitted and not layers["conv1"].skipped  # prune_all: pruned


@pytest.mark.parametrize("overrides", [{"dense_target": False}, {"hessians": "dense"}])
def test_nothing_refitted_without_the_dense_target(overrides):
    net, images = _net_and_images()
    before = net.fc.weight.clone()
    with pytest.warns(RuntimeWarning, match="refit_dense_layers: no layer"):
        report = prune_model(net, images, RECOMMENDED, progress=False, nm="2:4", refit_dense_layers=True, **overrides)
    assert not any(r.refitted for r in report.layers) and torch.equal(net.fc.weight, before)


def test_an_untraceable_model_says_nothing_was_refitted():
    """The hook fallback re-estimates BatchNorms only at the end, so it re-fits nothing: said, not silent."""
    net, images = _net_and_images()
    before = net.fc.weight.clone()
    with pytest.warns(RuntimeWarning, match="refit_dense_layers: no layer"):
        report = prune_model(net, images, RECOMMENDED, progress=False, nm="2:4", refit_dense_layers=True,
                             use_fx=False)
    assert not any(r.refitted for r in report.layers) and torch.equal(net.fc.weight, before)


def test_recipe_label_names_it():
    assert "refit_dense_layers=True" in recipe_label(PruneConfig(nm="2:4", refit_dense_layers=True))


def test_too_few_samples_per_input_leave_the_layer_as_it_was():
    net, images = _net_and_images()
    before = (net.fc.weight.clone(), net.fc.bias.clone())
    with pytest.warns(RuntimeWarning, match="refit_dense_layers: no layer"):
        report = prune_model(net, images[:24], RECOMMENDED, progress=False, nm="2:4", refit_dense_layers=True)
    fc = next(r for r in report.layers if r.name == "fc")
    assert not fc.refitted and "per input" in fc.reason
    assert torch.equal(net.fc.weight, before[0]) and torch.equal(net.fc.bias, before[1])
