"""Channel costs measured at the network's output (channel_costs='kl'): the interpolation between measured points,
the measured points against a direct computation, and a prune that uses them."""
import copy

import pytest
import torch

from cnn_sparsegpt import prune_model
from cnn_sparsegpt.pruning.allocation import dense_statistics
from cnn_sparsegpt.pruning.channel_costs import _follow, consumer_weight, measured_curves, unit_blocks
from cnn_sparsegpt.pruning.channels import channel_groups
from cnn_sparsegpt.pruning.structured import _cost_curve

from .test_prune_model import TinyResNet, calib, make


def test_follow_hits_measured_points_and_never_decreases():
    layer = [1.0, 2.0, 2.0, 4.0, 8.0, 9.0]
    out = _follow(layer, {0: 0.0, 2: 10.0, 6: 5.0})
    assert out[1] == 10.0 and out[0] == 5.0  # halfway along the layer curve to the first measured point
    assert all(b >= a for a, b in zip(out, out[1:])) and out[-1] == 10.0  # a lower later KL does not count
    flat = _follow([0.0, 0.0, 0.0, 0.0], {0: 0.0, 4: 8.0})  # flat layer curve: linear in units
    assert flat == [2.0, 4.0, 6.0, 8.0]


@torch.no_grad()
def test_measured_points_are_the_output_kl_of_that_removal_alone():
    model, x = make(TinyResNet), calib(64)
    groups = channel_groups(model, x[:1])
    prunable = [g for g, group in enumerate(groups) if len(group.removable) > 4]
    consumers = sorted({c for g in prunable for i in groups[g].removable for c in groups[g].units[i].columns})
    stats = dense_statistics(model, [x], consumers, hessian=True)
    curves = {g: _cost_curve(groups[g], stats, 0.01, len(groups[g].units) - 4, 4) for g in prunable}
    before = {n: p.clone() for n, p in model.state_dict().items()}
    measured = measured_curves(model, groups, curves, stats, [x], 0.01, 4, 32, 1e6)
    assert all(torch.equal(p, before[n]) for n, p in model.state_dict().items())  # weights restored
    g = prunable[0]
    order, costs = measured[g]
    assert order == curves[g][0] and all(b >= a for a, b in zip(costs, costs[1:]))
    k = len(order)  # the last point is always measured
    ref = copy.deepcopy(model)
    mods = dict(ref.named_modules())
    for c in sorted({c for u in order for c in groups[g].units[u].columns}):
        cols = sorted({col for u in order[:k] for col in groups[g].units[u].columns.get(c, [])})
        mods[c].weight.copy_(consumer_weight(stats[c], unit_blocks(stats[c], [cols]).flatten(), 0.01))
    dense, pruned = torch.log_softmax(model(x).double(), -1), torch.log_softmax(ref(x).double(), -1)
    kl = float((dense.exp() * (dense - pruned)).sum(-1).mean())
    assert kl > 0 and costs[-1] == pytest.approx(max([kl] + costs[:-1]), rel=1e-6)  # non-decreasing: max so far


def test_kl_costs_prune_to_the_target():
    model, x = make(TinyResNet), calib(64)
    classes = model(x).shape[1]
    rep = prune_model(model, x, structure="channels", keep_macs=0.6, round_to=4, channel_costs="kl", progress=False)
    macs_dense, macs_kept = rep.structure["macs"]
    assert macs_kept <= 0.6 * macs_dense and "output_costs" in rep.structure["timings"]
    assert model(x).shape == (64, classes)


def test_layer_costs_still_prune_to_the_target():
    model, x = make(TinyResNet), calib(64)
    rep = prune_model(model, x, structure="channels", keep_macs=0.6, round_to=4, channel_costs="layer",
                      progress=False)
    assert rep.structure["macs"][1] <= 0.6 * rep.structure["macs"][0]
    assert "output_costs" not in rep.structure["timings"]


class DictOut(torch.nn.Module):
    def __init__(self, scores: bool = True):
        super().__init__()
        self.net, self.scores = make(TinyResNet), scores

    def forward(self, x):  # scores in a dict (measured), or only a flat vector of them (nothing to compare)
        return {"logits": self.net(x)} if self.scores else {"flat": self.net(x).flatten()}


@pytest.mark.parametrize("scores", [True, False])
def test_a_dict_output_is_measured_and_one_without_scores_falls_back_to_layer_costs(scores):
    model, x = DictOut(scores).eval(), calib(16)
    groups = channel_groups(model, x[:1])
    prunable = [g for g, group in enumerate(groups) if len(group.removable) > 4]
    consumers = sorted({c for g in prunable for i in groups[g].removable for c in groups[g].units[i].columns})
    stats = dense_statistics(model, [x], consumers, hessian=True)
    curves = {g: _cost_curve(groups[g], stats, 0.01, len(groups[g].units) - 4, 4) for g in prunable}
    if scores:
        out = measured_curves(model, groups, curves, stats, [x], 0.01, 4, 32, 1e6)
        assert out is not curves and out.keys() == curves.keys()
        return
    with pytest.warns(RuntimeWarning, match="layer costs"):
        out = measured_curves(model, groups, curves, stats, [x], 0.01, 4, 32, 1e6)
    assert out is curves


def test_labels_name_the_channel_costs_only_for_channel_runs():
    from cnn_sparsegpt.pruning.config import PUBLISHED, RECOMMENDED, recipe_label

    assert PUBLISHED.channel_costs == "layer" and RECOMMENDED.channel_costs == "kl"
    assert "channel_costs=kl" in recipe_label(RECOMMENDED.__class__(structure="channels", keep_macs=0.5))
    assert "channel_costs" not in recipe_label(RECOMMENDED.__class__(structure="channels", keep_macs=0.5,
                                                                     channel_costs="layer"))
    assert "channel_costs" not in recipe_label(RECOMMENDED.__class__(sparsity=0.5))


@pytest.mark.parametrize("traced", [True, False])
def test_output_measures_hold_one_changes_outputs_at_a_time(monkeypatch, traced):
    """Each change is measured as it comes, against the unchanged outputs computed first: a detector's outputs are
    megabytes per image, and a channel prune measures hundreds of changes."""
    import contextlib
    import weakref
    from cnn_sparsegpt.pruning import output_kl
    model, x = make(TinyResNet), calib(16)
    if not traced:
        monkeypatch.setattr(output_kl, "trace", lambda m: (_ for _ in ()).throw(RuntimeError("untraceable")))
        monkeypatch.setattr(output_kl, "partial_trace", lambda *a: None)
    read, measure = output_kl.OUTPUTS["values"]
    alive = []

    def tracked(ys):
        out = read(ys)
        live = [r for r in alive if r() is not None]
        assert len(live) <= 1, "a change's outputs were kept after it was measured"  # (the unchanged outputs)
        alive.append(weakref.ref(out))
        return out

    monkeypatch.setitem(output_kl.OUTPUTS, "values", (tracked, measure))
    modules = dict(model.named_modules())

    @contextlib.contextmanager
    def halved(name):
        modules[name].weight.data *= 0.5
        yield
        modules[name].weight.data *= 2

    names = ["stem", "block.conv1", "block.conv2", "fc1"]
    got = output_kl.output_kls(model, x, {n: [n] for n in names}, halved, outputs="values")
    assert set(got) == set(names) and all(v > 0 for v in got.values()) and len(alive) == len(names) + 1
