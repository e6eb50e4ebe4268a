"""An Ultralytics detector through the prune: YOLOv8n (built from its yaml, random weights: no download here),
pruned at 2:4 and by channels, each result's output error and its ONNX Runtime latency beside the dense model's.

torch.fx cannot trace the model whole (its Detect head), so this exercises the partial trace (docs/RELIABILITY.md):
the head is called whole, its inputs keep their channels, its layers are pruned and re-fitted from its stored inputs,
and C2f's chunk ties each half's j-th channels. Random weights and images say nothing about detection accuracy;
the BatchNorm statistics are taken from the calibration images first, so that signals reach the head (with the
initial statistics a random YOLOv8n's output is its head's biases). The output error is the prune's own measure
(relative squared error of every output tensor, outputs='values') on other random images.

    pip install ultralytics
    python benchmarks/ultralytics_yolo.py --json experiments/ultralytics_yolov8n.json
"""
from __future__ import annotations

import argparse
import copy
import sys
import time

import torch
from torch import nn

from cnn_sparsegpt import prune_model
from cnn_sparsegpt.commands.latency import compare_latency
from cnn_sparsegpt.pruning.output_kl import relative_squared_error, values
from cnn_sparsegpt.utils import atomic_write_json, run_metadata

RUNS = {  # name -> prune_model keywords (the CLI's defaults otherwise)
    "2:4": {"nm": "2:4"},
    "channels keep_macs 0.6": {"structure": "channels", "keep_macs": 0.6},
}


@torch.no_grad()
def yolo(variant: str, images: torch.Tensor) -> nn.Module:
    from ultralytics import YOLO
    model = YOLO(variant).model.float()
    for m in model.modules():  # these images' statistics (momentum None: their plain mean), see above
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.momentum = None
            m.reset_running_stats()
    model.train()
    model(images)
    return model.eval()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variant", default="yolov8n.yaml", help="an Ultralytics model yaml")
    p.add_argument("--image-size", type=int, default=320, help="pixels per side")
    p.add_argument("--nsamples", type=int, default=64, help="random calibration images")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    p.add_argument("--json", required=True)
    args = p.parse_args()
    try:
        import ultralytics
    except ImportError:
        sys.exit("this benchmark needs Ultralytics: pip install ultralytics")
    torch.manual_seed(0)
    shape = (3, args.image_size, args.image_size)
    calibration = torch.rand(args.nsamples, *shape, generator=torch.Generator().manual_seed(1))
    test = torch.rand(8, *shape, generator=torch.Generator().manual_seed(2))
    dense = yolo(args.variant, calibration)
    with torch.no_grad():
        reference = values(dense(test))
    out = {"model": args.variant, "ultralytics": ultralytics.__version__, "input_shape": list(shape),
           "nsamples": args.nsamples, "runs": {}} | run_metadata(torch.device("cpu"))
    for name, options in RUNS.items():
        model = copy.deepcopy(dense)
        t0 = time.perf_counter()
        rep = prune_model(model, calibration, outputs="values", progress=False, **options)
        seconds = time.perf_counter() - t0
        with torch.no_grad():
            error = float(relative_squared_error(reference, values(model(test))))
        rows = compare_latency(dense, model, shape, "onnxruntime", tuple(args.batch_sizes), warmup=3, runs=10)
        row = {"options": options, "prune_seconds": seconds, "forward_passes": rep.forward_passes,
               "timings": rep.timings, "output_error": error,
               "latency": [{k: v for k, v in r.items() if k != "calls"} for r in rows]}
        if rep.structure:
            row |= {"macs": rep.structure["macs"], "params": rep.structure["params"],
                    "fixed_groups": [g["fixed"] for g in rep.structure["groups"] if g["fixed"]]}
        else:
            row |= {"pruned_layers": sum(not r.skipped for r in rep.layers), "layers": len(rep.layers)}
        out["runs"][name] = row
        atomic_write_json(out, args.json)  # each run as it ends
        print(f"{args.variant} {name}: output error {error:.4f}, {seconds:.0f} s pruning; " +
              ", ".join(f"batch {r['batch']} {r['speedup']:.2f}x" for r in rows))


if __name__ == "__main__":
    main()
