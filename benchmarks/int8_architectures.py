"""Whether ONNX Runtime's INT8 model (`export --int8`, runtime `onnxruntime-int8`) is faster than the float one, per
ImageNet architecture at 224x224, on this CPU: random weights (speed does not depend on them), float and INT8 timed
side by side in one process (median call).

    python benchmarks/int8_architectures.py --json experiments/int8/architectures.json
"""
from __future__ import annotations

import argparse

import torch

from cnn_sparsegpt.deploy.runtimes import runtime, side_by_side
from cnn_sparsegpt.models import create_model
from cnn_sparsegpt.utils import atomic_write_json, run_metadata

MODELS = ("torchvision:resnet50", "torchvision:mobilenet_v3_large", "torchvision:efficientnet_b0",
          "torchvision:regnet_y_400mf", "torchvision:convnext_tiny")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", action="append", help=f"repeatable (default: {', '.join(MODELS)})")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    p.add_argument("--runs", type=int, default=10)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--json", required=True)
    args = p.parse_args()
    out = {"models": {}, "runs": args.runs, "rounds": args.rounds} | run_metadata(torch.device("cpu"))
    for name in args.model or MODELS:
        torch.manual_seed(0)
        model = create_model(name, num_classes=1000).eval()
        example = torch.randn(1, 3, 224, 224)
        fns = {r: runtime(r)(model, example, None) for r in ("onnxruntime", "onnxruntime-int8")}
        rows = []
        for b in args.batch_sizes:
            _, med = side_by_side(fns, torch.randn(b, 3, 224, 224), 3, args.runs, args.rounds)
            rows.append({"batch": b, "float_s": med["onnxruntime"], "int8_s": med["onnxruntime-int8"],
                         "int8_speedup": med["onnxruntime"] / med["onnxruntime-int8"]})
            print(f"{name} batch {b}: float {1000 * rows[-1]['float_s']:.1f} ms, INT8 {1000 * rows[-1]['int8_s']:.1f} "
                  f"ms, {rows[-1]['int8_speedup']:.2f}x", flush=True)
        out["models"][name] = rows
        atomic_write_json(out, args.json)


if __name__ == "__main__":
    main()
