"""The runtimes in the registry: each runs a folded model on a batch of any size after being built on one image, and
OpenVINO computes what PyTorch does (float32 to float rounding, bfloat16 to its 8-bit mantissa)."""
import warnings

import pytest
import torch

from cnn_sparsegpt import UserError
from cnn_sparsegpt.deploy import runtimes
from cnn_sparsegpt.deploy.runtimes import RUNTIMES, side_by_side

from .test_prune_model import TinyResNet, make


@pytest.mark.parametrize("name", [n for n in RUNTIMES if n != "tensorrt"])
def test_every_runtime_times_a_model_at_any_batch(name):
    try:
        make_runtime = runtimes.runtime(name)
    except UserError as e:  # a runtime whose package this machine lacks says so in one line
        pytest.skip(str(e))
    model = make(TinyResNet)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # openvino-bf16 on a CPU without bfloat16
        fn = make_runtime(model, torch.randn(1, 3, 16, 16), 1)
    calls, med = side_by_side({name: fn}, torch.randn(3, 3, 16, 16), warmup=1, runs=2, rounds=1)
    assert len(calls[name]) == 2 and med[name] > 0


@pytest.mark.parametrize("name, tol", [("openvino", 1e-4), ("openvino-bf16", 5e-2)])
def test_openvino_computes_the_folded_model(name, tol):
    pytest.importorskip("openvino")
    model = make(TinyResNet)
    x = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        fn = runtimes.runtime(name)(model, x[:1], None)
    got = torch.as_tensor(fn(x))
    with torch.no_grad():
        want = model.eval()(x)
    assert (got - want).norm() <= tol * want.norm()
    assert fn.conv_precisions() <= {"f32", "bf16"} and fn.conv_precisions()


def test_a_runtime_without_its_package_says_how_to_install_it(monkeypatch):
    monkeypatch.setattr(runtimes.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(UserError, match=r"openvino runtime needs openvino .*pip install 'cnn-sparsegpt\[openvino\]'"):
        runtimes.runtime("openvino")
    with pytest.raises(UserError, match=r"onnxruntime runtime needs onnxruntime .*cnn-sparsegpt\[export\]"):
        runtimes.runtime("onnxruntime")


def test_openvino_bf16_says_when_the_cpu_runs_float32(monkeypatch):
    pytest.importorskip("openvino")
    monkeypatch.setattr(runtimes.OpenVino, "conv_precisions", lambda self: {"f32"})
    with pytest.warns(RuntimeWarning, match="no bfloat16 kernels"):
        runtimes.runtime("openvino-bf16")(make(TinyResNet), torch.randn(1, 3, 16, 16), None)
