"""Static INT8 models for ONNX Runtime on the CPU (`export --int8`, and the `onnxruntime-int8` timing runtime).

A folded float ONNX model (what `export --onnx` writes) goes through ONNX Runtime's own tool: its pre-processing
(shape inference, graph optimizations), then `quantize_static` in the QDQ format. Weights: int8, symmetric, one scale
per output channel, because ORT's CPU integer conv runs per-channel weights only with all zero points 0 (a
run's `--wbits` grids are asymmetric, so they are not reused; at 8 bits the rounding is the same to half a step).
Activations: uint8, one scale and zero point per tensor, their ranges from calibration images. A zero weight stays
exactly zero on a symmetric grid, so 2:4 and unstructured masks survive (checked: `zeros_kept`). ORT fuses each
DequantizeLinear → Conv → QuantizeLinear into an integer conv (VNNI or AMX where the CPU has them).
"""
from __future__ import annotations

import importlib.util
import tempfile
from pathlib import Path

import torch
from ..utils import UserError
from .accuracy import top1

CALIBRATION = ("minmax", "percentile", "entropy")  # ORT's calibration methods for the activation ranges
# images per calibration call. minmax keeps each batch's per-tensor minimum and maximum only; percentile and entropy
# keep every batch's activations until the histograms are built (memory grows with the calibration images)
CALIBRATION_BATCH = 32


def check() -> None:
    if any(importlib.util.find_spec(p) is None for p in ("onnx", "onnxruntime")):
        raise UserError("INT8 models need onnxruntime and onnx: pip install 'cnn-sparsegpt[export]'")


def quantize_int8(float_path: str | Path, out_path: str | Path, calibration: torch.Tensor,
                  method: str = "minmax", input_name: str = "images") -> dict:
    """Write the INT8 QDQ model of the float ONNX model at `float_path` to `out_path`, activation ranges from the
    images `calibration` (N, C, H, W); returns what was done and whether every zero weight stayed zero."""
    check()
    if method not in CALIBRATION:
        raise UserError(f"unknown INT8 calibration '{method}'; choose from {', '.join(CALIBRATION)}")
    from onnxruntime.quantization import (CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType,
                                          quant_pre_process, quantize_static)

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.batches = iter(calibration.split(CALIBRATION_BATCH))

        def get_next(self):
            x = next(self.batches, None)
            return None if x is None else {input_name: x.contiguous().numpy()}

    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    methods = {"minmax": CalibrationMethod.MinMax, "percentile": CalibrationMethod.Percentile,
               "entropy": CalibrationMethod.Entropy}
    with tempfile.TemporaryDirectory() as tmp:
        prepared = Path(tmp) / "prepared.onnx"
        try:
            quant_pre_process(str(float_path), str(prepared))
        except Exception:  # symbolic shape inference gives up on some graphs (an Ultralytics YOLO head): ONNX's own
            quant_pre_process(str(float_path), str(prepared), skip_symbolic_shape=True)
        quantize_static(str(prepared), str(out_path), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                        calibrate_method=methods[method])
    kept, new = zeros_kept(float_path, out_path)
    return {"int8": str(out_path), "int8_calibration": method, "int8_calibration_images": len(calibration),
            "int8_zeros_kept": kept, "int8_new_zero_weights": new}


def zeros_kept(float_path: str | Path, int8_path: str | Path) -> tuple[bool, int]:
    """Whether every zero weight of the float model is a zero code in the INT8 one (ORT names a quantized initializer
    NAME_quantized), and how many non-zero weights rounded to zero."""
    import onnx
    from onnx import numpy_helper

    def initializers(path):
        return {t.name: numpy_helper.to_array(t) for t in onnx.load(str(path)).graph.initializer}

    floats, codes = initializers(float_path), initializers(int8_path)
    kept, new = True, 0
    for name, q in codes.items():
        w = floats.get(name.removesuffix("_quantized")) if name.endswith("_quantized") else None
        if w is None or w.shape != q.shape:
            continue
        kept &= bool(((w == 0) <= (q == 0)).all())
        new += int(((w != 0) & (q == 0)).sum())
    return kept, new


def onnx_top1(path: str | Path, data, batch_size: int = 256, progress: bool = True, desc: str = "INT8 accuracy",
              input_name: str = "images") -> float:
    """Top-1 accuracy (a fraction) of an ONNX model on ONNX Runtime's CPU provider over an ImageSet or FolderSet."""
    check()
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return top1(lambda x: session.run(None, {input_name: x.numpy()})[0], data, batch_size, progress, desc)

