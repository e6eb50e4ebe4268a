"""The one way a folded model becomes an ONNX file here (`export --onnx`, the ONNX Runtime timings, INT8 models):
input `images`, output `logits` (a model with several outputs: `logits`, `output1`, ... in output_tensors' order),
the batch dimension dynamic."""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ..utils import output_tensors

OPSET = 17


def write_onnx(folded: nn.Module, example: torch.Tensor, path: str | Path, opset: int = OPSET) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with torch.no_grad():
        outputs = ["logits"] + [f"output{i}" for i in range(1, len(output_tensors(folded(example))))]
    torch.onnx.export(folded, (example,), str(path), opset_version=opset, input_names=["images"],
                      output_names=outputs, dynamic_axes={name: {0: "batch"} for name in ["images", *outputs]},
                      dynamo=False)
    return path
