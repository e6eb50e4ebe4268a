"""The runtimes a model is timed on (ONNX Runtime on the CPU in float32 or INT8, PyTorch eager; TensorRT is not built
yet) and the side-by-side timing rule: models alternate in rounds (a noisy machine slows all alike), each round times
`runs` calls after `warmup` untimed ones, and the figure is the median call."""
from __future__ import annotations

import importlib.util
import statistics
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

from ..utils import UserError
from .fold import fold_batchnorm
from .int8 import quantize_int8
from .onnx_file import write_onnx


class TorchEager:
    """PyTorch eager, inference mode, on the CPU."""
    name = "torch"

    @staticmethod
    def check() -> None:
        pass

    def __init__(self, model: nn.Module, example: torch.Tensor, threads: int | None):
        self.model = fold_batchnorm(model).eval()

    def __call__(self, x: torch.Tensor) -> None:
        with torch.inference_mode():
            self.model(x)


class OnnxRuntime:
    """ONNX Runtime's CPU execution provider, on the model `export` writes (opset 17, folded BatchNorm)."""
    name = "onnxruntime"

    @staticmethod
    def check() -> None:
        if any(importlib.util.find_spec(p) is None for p in ("onnx", "onnxruntime")):  # the exporter needs onnx
            raise UserError("the onnxruntime runtime needs onnxruntime (and onnx, onnxscript): "
                            "pip install 'cnn-sparsegpt[export]'")

    def __init__(self, model: nn.Module, example: torch.Tensor, threads: int | None):
        self.check()
        import onnxruntime as ort

        folded = fold_batchnorm(model).eval()
        with tempfile.TemporaryDirectory() as tmp:
            path = self.onnx_file(folded, example, Path(tmp))
            options = ort.SessionOptions()
            if threads:
                options.intra_op_num_threads = threads
            self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])

    def onnx_file(self, folded: nn.Module, example: torch.Tensor, tmp: Path) -> Path:
        """The model file this runtime runs, written under tmp."""
        return write_onnx(folded, example, tmp / "m.onnx")

    def __call__(self, x: torch.Tensor) -> None:
        self.session.run(None, {"images": x.numpy()})


class OnnxRuntimeInt8(OnnxRuntime):
    """ONNX Runtime's CPU provider on the INT8 model `export --int8` writes (deploy/int8.py), for timing: its
    activation ranges come from random images (the graph and its kernels are those of a calibrated model)."""
    name = "onnxruntime-int8"

    def onnx_file(self, folded: nn.Module, example: torch.Tensor, tmp: Path) -> Path:
        calibration = torch.randn(8, *example.shape[1:], generator=torch.Generator().manual_seed(0))
        return Path(quantize_int8(super().onnx_file(folded, example, tmp), tmp / "m_int8.onnx", calibration)["int8"])


class TensorRT:
    name = "tensorrt"

    @staticmethod
    def check() -> None:
        raise UserError("the tensorrt runtime is not built yet: it needs a CUDA GPU and the tensorrt package; use "
                        "onnxruntime or torch")

    def __init__(self, model, example, threads):
        self.check()


RUNTIMES = {r.name: r for r in (OnnxRuntime, OnnxRuntimeInt8, TorchEager, TensorRT)}


def runtime(name: str):
    """The runtime class of that name, checked to be usable here (its package installed) before any work."""
    if name not in RUNTIMES:
        raise UserError(f"unknown runtime '{name}'; choose from {', '.join(RUNTIMES)}")
    RUNTIMES[name].check()
    return RUNTIMES[name]


def time_calls(fn, x: torch.Tensor, warmup: int, runs: int) -> list[float]:
    """Seconds of each of `runs` calls fn(x), after `warmup` untimed ones."""
    for _ in range(warmup):
        fn(x)
    out = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn(x)
        out.append(time.perf_counter() - t0)
    return out


def side_by_side(models: dict, x: torch.Tensor, warmup: int, runs: int, rounds: int) -> tuple[dict, dict]:
    """Per model (name → callable): every call's seconds and the median, the models alternating in rounds."""
    calls = {k: [] for k in models}
    for _ in range(rounds):
        for k, fn in models.items():
            calls[k] += time_calls(fn, x, warmup, runs)
    return calls, {k: statistics.median(v) for k, v in calls.items()}
