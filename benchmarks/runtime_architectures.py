"""How fast each CPU runtime runs each ImageNet architecture at 224x224 on this machine: ONNX Runtime float32 and INT8
(`export --int8`), OpenVINO float32 and bfloat16. Random weights (speed does not depend on them), every runtime timed
side by side in one process (median call); speed-ups are over ONNX Runtime's float32 model.

    python benchmarks/runtime_architectures.py --json experiments/runtimes/architectures.json
"""
from __future__ import annotations

import argparse

import torch

from cnn_sparsegpt.deploy.runtimes import runtime, side_by_side
from cnn_sparsegpt.models import create_model
from cnn_sparsegpt.utils import atomic_write_json, run_metadata

MODELS = ("torchvision:resnet50", "torchvision:mobilenet_v3_large", "torchvision:efficientnet_b0",
          "torchvision:regnet_y_400mf", "torchvision:convnext_tiny")
RUNTIMES = ("onnxruntime", "onnxruntime-int8", "openvino", "openvino-bf16")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", action="append", help=f"repeatable (default: {', '.join(MODELS)})")
    p.add_argument("--runtime", action="append", help=f"repeatable, the first is the reference (default: "
                                                      f"{', '.join(RUNTIMES)})")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    p.add_argument("--runs", type=int, default=10)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--json", required=True)
    args = p.parse_args()
    names = args.runtime or RUNTIMES
    out = {"models": {}, "runtimes": list(names), "runs": args.runs, "rounds": args.rounds} | \
        run_metadata(torch.device("cpu"))
    for name in args.model or MODELS:
        torch.manual_seed(0)
        model = create_model(name, num_classes=1000).eval()
        example = torch.randn(1, 3, 224, 224)
        fns = {r: runtime(r)(model, example, None) for r in names}
        rows = []
        for b in args.batch_sizes:
            _, med = side_by_side(fns, torch.randn(b, 3, 224, 224), 3, args.runs, args.rounds)
            rows.append({"batch": b, "seconds": med, "speedup": {r: med[names[0]] / s for r, s in med.items()}})
            print(f"{name} batch {b}: " + ", ".join(f"{r} {1000 * s:.1f} ms ({rows[-1]['speedup'][r]:.2f}x)"
                                                   for r, s in med.items()), flush=True)
        out["models"][name] = rows
        atomic_write_json(out, args.json)


if __name__ == "__main__":
    main()
