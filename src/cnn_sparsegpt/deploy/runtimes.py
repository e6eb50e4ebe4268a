"""The runtimes a model is timed on (ONNX Runtime on the CPU in float32 or INT8, OpenVINO on the CPU in float32 or
bfloat16, PyTorch eager; TensorRT is not built yet; each, called on a batch, returns its logits) and the
side-by-side timing rule: models alternate in rounds (a noisy machine slows all alike), each round times `runs` calls
after `warmup` untimed ones, and the figure is the median call."""
from __future__ import annotations

import functools
import importlib.util
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import torch
from torch import nn

from ..utils import UserError, output_tensors
from .fold import fold_batchnorm
from .int8 import quantize_int8
from .onnx_file import write_onnx


class TorchEager:
    """PyTorch eager, inference mode, on the CPU."""
    name = "torch"

    @staticmethod
    def check() -> None:
        pass

    def __init__(self, model: nn.Module, example: torch.Tensor, threads: int | None,
                 calibration: torch.Tensor | None = None):
        self.model = fold_batchnorm(model, example=example).eval()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            out = self.model(x)
        return out if isinstance(out, torch.Tensor) else output_tensors(out)[0]  # (the ONNX model's first output)


class OnnxFile:
    """A runtime that runs the ONNX model `export` writes (opset 17, folded BatchNorm), loaded by `load`."""
    packages = ("onnx",)  # the exporter's
    extra = "export"

    @classmethod
    def check(cls) -> None:
        if any(importlib.util.find_spec(p) is None for p in cls.packages):
            raise UserError(f"the {cls.name} runtime needs {' and '.join(cls.packages[1:] or cls.packages)} "
                            f"(and onnx, onnxscript): pip install 'cnn-sparsegpt[{cls.extra}]'")

    def __init__(self, model: nn.Module, example: torch.Tensor, threads: int | None,
                 calibration: torch.Tensor | None = None):
        self.check()
        self.calibration = calibration  # images for a runtime that quantizes (INT8); the others ignore them
        folded = fold_batchnorm(model, example=example).eval()
        with tempfile.TemporaryDirectory() as tmp:
            self.load(self.onnx_file(folded, example, Path(tmp)), threads)

    def onnx_file(self, folded: nn.Module, example: torch.Tensor, tmp: Path) -> Path:
        """The model file this runtime runs, written under tmp."""
        return write_onnx(folded, example, tmp / "m.onnx")


class OnnxRuntime(OnnxFile):
    """ONNX Runtime's CPU execution provider."""
    name = "onnxruntime"
    packages = ("onnx", "onnxruntime")

    def load(self, path: Path, threads: int | None) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])

    def __call__(self, x: torch.Tensor):
        return self.session.run(None, {"images": x.numpy()})[0]


class OnnxRuntimeInt8(OnnxRuntime):
    """ONNX Runtime's CPU provider on the INT8 model `export --int8` writes (deploy/int8.py). Its activation ranges
    come from the `calibration` images given (`latency --top1`: the run's own), else from random images, which
    time the same graph and kernels as a calibrated model but say nothing of its accuracy."""
    name = "onnxruntime-int8"

    def onnx_file(self, folded: nn.Module, example: torch.Tensor, tmp: Path) -> Path:
        calibration = self.calibration
        if calibration is None:
            calibration = torch.randn(8, *example.shape[1:], generator=torch.Generator().manual_seed(0))
        return Path(quantize_int8(super().onnx_file(folded, example, tmp), tmp / "m_int8.onnx", calibration)["int8"])


@functools.cache
def openvino_core():
    """One OpenVINO Core for the process, never destroyed: with a Core made and dropped per model, a later
    subprocess crashed the interpreter (a segfault) once PyTorch's DataLoader workers had streamed a folder in the
    same process (its SIGCHLD handler stays installed); with one Core kept, it did not (standalone repro, 4 of 4)."""
    import openvino as ov

    return ov.Core()


class OpenVino(OnnxFile):
    """OpenVINO's CPU plugin, latency hint, float32 (as ONNX Runtime computes)."""
    name = "openvino"
    packages = ("onnx", "openvino")
    extra = "openvino"
    precision = "f32"  # OpenVINO's own default is bf16 wherever the CPU has bfloat16 kernels: openvino-bf16

    def load(self, path: Path, threads: int | None) -> None:
        core = openvino_core()
        config = {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_PRECISION_HINT": self.precision}
        if threads:
            config["INFERENCE_NUM_THREADS"] = threads
        self.compiled = core.compile_model(core.read_model(str(path)), "CPU", config)
        self.request = self.compiled.create_infer_request()

    def conv_precisions(self) -> set[str]:
        """The precisions OpenVINO chose for the convolutions (e.g. {'bf16'}), from the compiled graph."""
        info = [op.get_rt_info() for op in self.compiled.get_runtime_model().get_ordered_ops()]
        return {i["runtimePrecision"].astype(str) for i in info if "Convolution" in i["layerType"].astype(str)}

    def __call__(self, x: torch.Tensor):
        return self.request.infer({0: x.numpy()})[0]


class OpenVinoBf16(OpenVino):
    """OpenVINO's CPU plugin in bfloat16 (its default on CPUs with AMX or AVX-512 BF16): mostly 1.1-2.1x faster than
    float32 there (docs/PERFORMANCE.md), at bfloat16's 8-bit mantissa; elsewhere OpenVINO runs float32, said by a
    warning."""
    name = "openvino-bf16"
    precision = "bf16"

    def load(self, path: Path, threads: int | None) -> None:
        super().load(path, threads)
        if "bf16" not in self.conv_precisions():
            warnings.warn("openvino-bf16: this CPU has no bfloat16 kernels for OpenVINO; it runs float32",
                          RuntimeWarning)


class TensorRT:
    name = "tensorrt"

    @staticmethod
    def check() -> None:
        raise UserError("the tensorrt runtime is not built yet: it needs a CUDA GPU and the tensorrt package; use "
                        "onnxruntime or torch")

    def __init__(self, model, example, threads, calibration=None):
        self.check()


RUNTIMES = {r.name: r for r in (OnnxRuntime, OnnxRuntimeInt8, OpenVino, OpenVinoBf16, TorchEager,
                                 TensorRT)}


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
