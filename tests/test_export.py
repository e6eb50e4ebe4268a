"""`cnn-sparsegpt export`: BatchNorm folded, 2:4 kept along input channels, ONNX equal to PyTorch."""
import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from cnn_sparsegpt import PUBLISHED, create_model, prune_model
from cnn_sparsegpt.commands.cli import main
from cnn_sparsegpt.commands.export import nm_ok
from cnn_sparsegpt.deploy import fold_batchnorm
from cnn_sparsegpt.utils import atomic_save, atomic_write_json


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A prune output folder: resnet20_cifar (21 BatchNorms) at 2:4 on random weights and inputs."""
    d = tmp_path_factory.mktemp("run")
    torch.manual_seed(0)
    model = create_model("resnet20_cifar", num_classes=10).eval()
    for bn in model.modules():  # BatchNorms that do something when folded
        if isinstance(bn, torch.nn.BatchNorm2d):
            bn.weight.data.uniform_(0.5, 2)
            bn.running_var.uniform_(0.5, 2)
    rep = prune_model(model, torch.randn(64, 3, 32, 32), PUBLISHED, method="sparsegpt", nm="2:4", progress=False)
    atomic_save(model.state_dict(), d / "model.pt")
    atomic_save(rep.masks, d / "masks.pt")
    atomic_write_json({"model": "resnet20_cifar", "dataset": "cifar10", "pattern": "2:4",
                       "input_shape": [3, 32, 32]}, d / "report.json")
    return d


def test_export_onnx_and_safetensors(run_dir, capsys):
    pytest.importorskip("onnxruntime")
    from safetensors.torch import load_file

    assert main(["export", str(run_dir), "--onnx", str(run_dir / "m.onnx"), "--safetensors",
                 str(run_dir / "m.safetensors")]) == 0
    assert "21 BatchNorms folded" in capsys.readouterr().out
    out = json.loads((run_dir / "m.export.json").read_text())
    assert out["opset"] == 17 and out["onnx_max_abs_diff"] <= 1e-4
    pruned = [r for r in out["layers"] if r["sparsity"] > 0]
    assert len(pruned) == len(torch.load(run_dir / "masks.pt")) == 20
    assert all(r["two_four"] and r["sparse_tensor_core_candidate"] for r in pruned)
    assert all(r["nonzero_macs"] * 2 == r["macs"] for r in pruned)
    state = load_file(str(run_dir / "m.safetensors"))
    assert not any("bn" in k and "running" in k for k in state)  # folded away
    for k, w in state.items():
        if k.endswith("weight") and w.ndim == 4 and w.shape[1] % 4 == 0 and k != "conv1.weight":
            assert nm_ok(w), k


def test_folding_keeps_outputs_and_zeros(run_dir):
    from cnn_sparsegpt.commands.export import load_run
    model, _, masks = load_run(run_dir)
    folded = fold_batchnorm(model)
    x = torch.randn(8, 3, 32, 32)
    torch.testing.assert_close(folded(x), model(x), rtol=1e-4, atol=1e-4)
    fw = dict(folded.named_parameters())
    for name, mask in masks.items():
        assert torch.equal(fw[name] == 0, ~mask), name  # a per-channel scale keeps every zero a zero


def test_export_errors(tmp_path, capsys):
    assert main(["export", str(tmp_path), "--onnx", str(tmp_path / "m.onnx")]) == 2
    assert "has no model.pt" in capsys.readouterr().err


def test_python_api_exports_and_times_a_model_in_memory(tmp_path):
    """What `export` and `latency` give, from Python: cs.export_model and cs.compare_latency on an nn.Module."""
    pytest.importorskip("onnxruntime")
    import cnn_sparsegpt as cs

    torch.manual_seed(0)
    dense = create_model("resnet20_cifar", num_classes=10).eval()
    model = create_model("resnet20_cifar", num_classes=10)
    model.load_state_dict(dense.state_dict())
    images = torch.randn(32, 3, 32, 32)
    rep = prune_model(model.eval(), images, PUBLISHED, nm="2:4", progress=False)
    model.train()  # the caller's mode is kept; the export runs the model in eval mode
    out = cs.export_model(model, (3, 32, 32), onnx=tmp_path / "m.onnx", compressed=tmp_path / "m.safetensors",
                          int8=tmp_path / "q.onnx", masks=rep.masks, calibration=images,
                          eval_data=(images, torch.zeros(32, dtype=torch.long)), progress=False)
    assert model.training and out["onnx_max_abs_diff"] <= 1e-4 and out["batchnorm_folded"] == 21
    assert sum(r["two_four"] and r["sparsity"] > 0 for r in out["layers"]) == 20
    assert out["sizes"]["compressed_bytes"] < out["sizes"]["folded_bytes"] and out["int8_zeros_kept"]
    assert out["int8_calibration_images"] == 32 and out["int8_eval_images"] == 32
    assert 0 <= out["int8_top1"] <= 1 and "run" not in out
    with pytest.raises(cs.UserError, match="needs calibration images"):
        cs.export_model(model, (3, 32, 32), int8=tmp_path / "q2.onnx")
    rows = cs.compare_latency(dense, model, (3, 32, 32), "onnxruntime", batch_sizes=(1,), warmup=0, runs=1,
                              rounds=1)
    assert rows[0]["batch"] == 1 and rows[0]["dense_s"] > 0 and rows[0]["pruned_s"] > 0


class _PadsItself(nn.Conv2d):
    """timm's Conv2dSame in small: pads its input itself, then a plain conv (scales with its weight: folds)."""

    def forward(self, x):
        return F.conv2d(F.pad(x, (0, 1, 0, 1)), self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


class _StandardizesWeight(nn.Conv2d):
    """timm's StdConv2d in small: the weight is standardized per output channel, so a scaled weight is not a
    scaled output: its BatchNorm must stay."""

    def forward(self, x):
        w = (self.weight - self.weight.mean((1, 2, 3), keepdim=True)) / self.weight.std((1, 2, 3), keepdim=True)
        return F.conv2d(x, w, self.bias, self.stride, self.padding, self.dilation, self.groups)


def test_folding_takes_library_layers_where_they_compute_what_the_fold_assumes():
    """timm's BatchNormAct2d folds and keeps its activation; a conv that pads itself folds, and so does a transposed
    conv; a weight-standardized conv, a grouped transposed conv and an addition keep their BatchNorms; the outputs
    stay."""
    from timm.layers import BatchNormAct2d

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.bn_a = _PadsItself(3, 8, 3, stride=2), BatchNormAct2d(8, act_layer=nn.SiLU)
            self.b, self.bn_b = _StandardizesWeight(8, 8, 3, padding=1), nn.BatchNorm2d(8)
            self.c, self.bn_c = nn.Conv2d(8, 8, 1, bias=False), nn.BatchNorm2d(8)
            self.bn_sum = nn.BatchNorm2d(8)
            self.up, self.bn_up = nn.ConvTranspose2d(8, 4, 2, stride=2), nn.BatchNorm2d(4)  # a UNet decoder's
            self.up_g, self.bn_up_g = nn.ConvTranspose2d(8, 4, 2, stride=2, groups=2), nn.BatchNorm2d(4)

        def forward(self, x):
            y = self.bn_a(self.a(x))
            y = self.bn_sum(self.bn_b(self.b(y)) + self.bn_c(self.c(y)))
            return self.bn_up(self.up(y)) + self.bn_up_g(self.up_g(y))

    torch.manual_seed(0)
    model = Net().eval()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.normal_(0, 0.5), m.running_var.uniform_(0.5, 2), m.weight.data.uniform_(0.5, 1.5)
    folded = fold_batchnorm(model)
    x = torch.randn(4, 3, 17, 17)
    torch.testing.assert_close(folded(x), model(x), rtol=1e-4, atol=1e-4)
    left = {n for n, m in folded.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)}
    assert left == {"bn_b", "bn_sum", "bn_up_g"}
    assert isinstance(folded.bn_a, nn.SiLU) and isinstance(folded.a, _PadsItself)
    assert not torch.equal(folded.a.weight, model.a.weight) and torch.equal(folded.b.weight, model.b.weight)


def test_onnx_check_scales_with_the_outputs(tmp_path):
    """Logits in the thousands differ between two correct float32 runtimes by more than 1e-4: the check is 1e-4 of
    the largest output there (it stopped a pruned EfficientNet-B0 whose logits reached 54 at 1.8e-4)."""
    pytest.importorskip("onnxruntime")
    import cnn_sparsegpt as cs

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 64, 3), nn.BatchNorm2d(64), nn.ReLU(), nn.Conv2d(64, 64, 3), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 10)).eval()
    with torch.no_grad():
        model[-1].weight.mul_(1e5)
    out = cs.export_model(model, (3, 16, 16), onnx=tmp_path / "m.onnx", progress=False)
    assert out["onnx_max_abs_diff"] <= 1e-4 * max(1.0, float(model(torch.randn(8, 3, 16, 16)).abs().max()))


class _Untraceable(nn.Module):
    """Python control flow on a tensor (torch.fx cannot trace it, as an Ultralytics YOLO's head), a conv whose output
    also feeds a skip connection (its BatchNorm must stay) and one whose output is concatenated too."""

    def __init__(self):
        super().__init__()
        self.a, self.bn_a = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.b, self.bn_b = nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.c, self.bn_c = nn.Conv2d(8, 8, 1), nn.BatchNorm2d(8)
        self.head = nn.Linear(16, 4)
        for bn in (self.bn_a, self.bn_b, self.bn_c):  # BatchNorms far from the identity: a wrong fold shows
            bn.weight.data.uniform_(0.5, 2)
            bn.bias.data.uniform_(-1, 1)
            bn.running_mean.uniform_(-1, 1)
            bn.running_var.uniform_(0.5, 2)

    def forward(self, x):
        y = torch.relu(self.bn_a(self.a(x)))
        if float(y.mean()) > -1e9:  # data-dependent: no trace
            b = self.b(y)
            y = torch.relu(self.bn_b(b)) + b  # b read twice: bn_b cannot fold
        c = self.c(y)
        z = torch.cat([self.bn_c(c), c], 1)  # c read twice
        return self.head(z.mean((2, 3))), {"features": y}


def test_a_model_fx_cannot_trace_is_folded_from_one_forward_pass(tmp_path):
    from cnn_sparsegpt import UserError, export_model

    torch.manual_seed(0)
    model = _Untraceable().eval()
    x = torch.randn(2, 3, 8, 8)
    with pytest.raises(UserError, match="cannot fold BatchNorm: torch.fx cannot trace"):
        fold_batchnorm(model)  # (no input to run it on)
    folded = fold_batchnorm(model.double(), example=x.double())
    assert isinstance(folded.bn_a, nn.Identity) and isinstance(folded.bn_b, nn.BatchNorm2d)
    assert isinstance(folded.bn_c, nn.BatchNorm2d)
    assert set(folded.state_dict()) == {k for k in model.state_dict() if not k.startswith("bn_a.")}
    with torch.no_grad():
        (logits, features), (want_logits, want_features) = folded(x.double()), model(x.double())
    torch.testing.assert_close(logits, want_logits, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(features["features"], want_features["features"], rtol=1e-9, atol=1e-9)
    pytest.importorskip("onnxruntime")
    out = export_model(model.float(), (3, 8, 8), onnx=tmp_path / "m.onnx", progress=False)
    assert out["batchnorm_folded"] == 1 and out["batchnorm_left"] == 2


def test_a_compressed_file_of_an_untraceable_model_loads_into_it(tmp_path):
    """load_compressed(model=...) shapes the model from the file's keys where torch.fx cannot trace it."""
    pytest.importorskip("safetensors")
    from cnn_sparsegpt import export_model, load_compressed

    torch.manual_seed(0)
    model = _Untraceable().eval()
    export_model(model, (3, 8, 8), compressed=tmp_path / "m.safetensors", progress=False)
    loaded = load_compressed(tmp_path / "m.safetensors", model=_Untraceable())
    assert isinstance(loaded.bn_a, nn.Identity) and isinstance(loaded.bn_b, nn.BatchNorm2d)
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x)[0], model(x)[0], rtol=1e-4, atol=1e-5)
