"""The one way a folded model becomes an ONNX file here (`export --onnx`, the ONNX Runtime timings, INT8 models):
input `images`, output `logits`, the batch dimension dynamic."""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

OPSET = 17


def write_onnx(folded: nn.Module, example: torch.Tensor, path: str | Path, opset: int = OPSET) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.onnx.export(folded, (example,), str(path), opset_version=opset, input_names=["images"],
                      output_names=["logits"], dynamic_axes={"images": {0: "batch"}, "logits": {0: "batch"}},
                      dynamo=False)
    return path
