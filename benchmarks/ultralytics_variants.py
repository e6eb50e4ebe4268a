"""Ultralytics model families through the channel walk and a quick channel prune: for each model yaml, how many
channels may go (`channel_plan`), then `keep_macs 0.6` with the layers' own costs (`channel_costs='layer'`, seconds
instead of minutes) and the output error on other random images. Random weights with BatchNorm statistics from the
images (ultralytics_yolo.py says why): this checks that each family prunes, re-fits and still runs, not its accuracy.

    pip install ultralytics
    python benchmarks/ultralytics_variants.py --json experiments/ultralytics_variants.json
"""
from __future__ import annotations

import argparse
import copy
import sys
import time

import torch

from cnn_sparsegpt import channel_plan, prune_model
from cnn_sparsegpt.pruning.output_kl import relative_squared_error, values
from cnn_sparsegpt.utils import atomic_write_json, run_metadata

from ultralytics_yolo import yolo  # this directory is sys.path[0] for a script

VARIANTS = ["yolov8n.yaml", "yolo11n.yaml", "yolov5nu.yaml", "yolov8n-seg.yaml", "yolov8n-pose.yaml",
            "yolov8n-obb.yaml", "yolov8n-cls.yaml"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variants", nargs="+", default=VARIANTS)
    p.add_argument("--image-size", type=int, default=320, help="pixels per side")
    p.add_argument("--nsamples", type=int, default=64, help="random calibration images (with too few for the deep "
                   "layers' width their re-fits are left out: docs/OPTIONS.md)")
    p.add_argument("--json", required=True)
    args = p.parse_args()
    try:
        import ultralytics
    except ImportError:
        sys.exit("this benchmark needs Ultralytics: pip install ultralytics")
    shape = (3, args.image_size, args.image_size)
    calibration = torch.rand(args.nsamples, *shape, generator=torch.Generator().manual_seed(1))
    test = torch.rand(4, *shape, generator=torch.Generator().manual_seed(2))
    out = {"ultralytics": ultralytics.__version__, "input_shape": list(shape), "nsamples": args.nsamples,
           "variants": {}} | run_metadata(torch.device("cpu"))
    for variant in args.variants:
        torch.manual_seed(0)
        dense = yolo(variant, calibration)
        plan = channel_plan(dense, calibration[:1])
        model = copy.deepcopy(dense)
        t0 = time.perf_counter()
        rep = prune_model(model, calibration, structure="channels", keep_macs=0.6, channel_costs="layer",
                          outputs="values", progress=False)
        seconds = time.perf_counter() - t0
        with torch.no_grad():
            error = float(relative_squared_error(values(dense(test)), values(model(test))))
        free = [g for g in plan if g["removable"]]
        row = {"channels": sum(g["channels"] for g in plan), "removable": sum(g["removable"] for g in free),
               "groups": len(plan), "free_groups": len(free),
               "fixed_because": sorted({g["reason"] for g in plan if g["reason"]}),
               "macs": rep.structure["macs"], "params": rep.structure["params"], "prune_seconds": seconds,
               "output_error": error}
        out["variants"][variant] = row
        atomic_write_json(out, args.json)  # each variant as it ends
        print(f"{variant}: {row['removable']} of {row['channels']} channels may go; keep_macs 0.6 kept "
              f"{row['macs'][1] / row['macs'][0]:.1%} of the multiply-adds, output error {error:.2g}, {seconds:.0f} s")


if __name__ == "__main__":
    main()
