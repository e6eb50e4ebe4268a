"""An interrupted prune goes on from its last saved layer (prune_model(resume=...), pruning/resume.py) and ends as
the uninterrupted prune does."""
import warnings

import pytest
import torch

import cnn_sparsegpt.pruning.prune as prune_module
import cnn_sparsegpt.pruning.resume as resume_module
from cnn_sparsegpt import PUBLISHED, prune_model

from .test_prune_model import Block


class _Net(torch.nn.Module):  # ten pruned layers in three residual blocks (tests/test_prune_model.py's Block)
    def __init__(self):
        super().__init__()
        self.stem, self.bn = torch.nn.Conv2d(3, 8, 3, padding=1, bias=False), torch.nn.BatchNorm2d(8)
        self.blocks = torch.nn.Sequential(Block(8, 16, 1), Block(16, 16, 2), Block(16, 32, 2))
        self.fc1, self.fc = torch.nn.Linear(32, 16), torch.nn.Linear(16, 5)

    def forward(self, x):
        x = self.blocks(torch.relu(self.bn(self.stem(x))))
        return self.fc(torch.relu(self.fc1(torch.flatten(torch.nn.functional.adaptive_avg_pool2d(x, 1), 1))))


def _model():
    torch.manual_seed(0)
    model = _Net()
    for m in model.modules():  # statistics that are not the identity, as in a trained network
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.normal_(0, 0.1)
            m.running_var.uniform_(0.5, 2)
    return model.eval()


def stop_after(monkeypatch, finished: int):
    """Saves after every layer, and a KeyboardInterrupt when `finished` layers are done; returns the real
    prune_layer (to patch back, or to wrap)."""
    monkeypatch.setattr(resume_module, "SAVE_EVERY", 0.0)
    real = prune_module._Pruner.prune_layer

    def stop(self, name, inputs):
        if len(self.results) == finished:
            raise KeyboardInterrupt
        return real(self, name, inputs)
    monkeypatch.setattr(prune_module._Pruner, "prune_layer", stop)
    return real


@pytest.mark.parametrize("case", [
    {"nm": "2:4"},  # the default recipe at N:M: permutation, exact swaps, dense target, intercept
    {"sparsity": 0.7},  # the default recipe unstructured: the dp allocation's database, the exact solver
    {"config": PUBLISHED, "sparsity": 0.5, "use_fx": False},  # one truncated pass per layer
    {"nm": "2:4", "low_memory": True},  # activations recomputed instead of stored, the dense copy's too
])
def test_an_interrupted_prune_resumes_where_it_stopped(tmp_path, monkeypatch, case):
    case = dict(case)
    config, use_fx = case.pop("config", None), case.pop("use_fx", True)
    images = torch.randn(64, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    whole_model = _model()
    whole = prune_model(whole_model, images, config, progress=False, use_fx=use_fx, **case)

    real = stop_after(monkeypatch, 5)
    state = tmp_path / "resume.pt"
    with pytest.raises(KeyboardInterrupt):
        prune_model(_model(), images, config, progress=False, use_fx=use_fx, resume=state, **case)
    assert state.is_file()
    calls = []
    monkeypatch.setattr(prune_module._Pruner, "prune_layer", lambda self, name, inputs: (
        calls.append(name), real(self, name, inputs))[1])
    resumed_model = _model()
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*not resumed")
        resumed = prune_model(resumed_model, images, config, progress=False, use_fx=use_fx, resume=state, **case)
    assert not state.exists()
    assert len(calls) == sum(not r.skipped for r in whole.layers) - 5  # the first five were not pruned again
    assert (resumed.resumed_layers, whole.resumed_layers) == (5, 0)
    assert [r.name for r in resumed.layers] == [r.name for r in whole.layers]
    assert all(torch.equal(resumed.masks[k], m) for k, m in whole.masks.items()) and resumed.masks.keys() == \
        whole.masks.keys()
    for k, v in whole_model.state_dict().items():
        torch.testing.assert_close(resumed_model.state_dict()[k], v, rtol=1e-5, atol=1e-6, msg=k)


def test_a_saved_state_of_another_prune_is_not_resumed(tmp_path, monkeypatch):
    images = torch.randn(16, 3, 16, 16)
    state = tmp_path / "resume.pt"
    real = stop_after(monkeypatch, 3)
    with pytest.raises(KeyboardInterrupt):
        prune_model(_model(), images, PUBLISHED, sparsity=0.5, progress=False, resume=state)
    monkeypatch.setattr(prune_module._Pruner, "prune_layer", real)
    with pytest.warns(RuntimeWarning, match="not resumed, started afresh"):
        report = prune_model(_model(), images, PUBLISHED, sparsity=0.6, progress=False, resume=state)
    assert report.sparsity == pytest.approx(0.6, abs=0.01) and not state.exists()


@pytest.mark.parametrize("finished", [2, 4])  # stopped in the graph's pass, and among the part called whole
def test_a_partly_traced_prune_resumes(tmp_path, monkeypatch, finished):
    from .test_prune_model import _PartlyTraceable

    def model():
        torch.manual_seed(0)
        return _PartlyTraceable().eval()

    images = torch.randn(32, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    whole_model = model()
    whole = prune_model(whole_model, images, nm="2:4", progress=False)
    stop_after(monkeypatch, finished)
    state = tmp_path / "resume.pt"
    with pytest.raises(KeyboardInterrupt):
        prune_model(model(), images, nm="2:4", progress=False, resume=state)
    monkeypatch.undo()
    resumed_model = model()
    resumed = prune_model(resumed_model, images, nm="2:4", progress=False, resume=state)
    assert resumed.resumed_layers == finished and not state.exists()
    assert all(torch.equal(resumed.masks[k], m) for k, m in whole.masks.items())
    for k, v in whole_model.state_dict().items():
        torch.testing.assert_close(resumed_model.state_dict()[k], v, rtol=1e-5, atol=1e-6, msg=k)
