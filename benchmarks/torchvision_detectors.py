"""A torchvision detector made faster by removing channels of its backbone: the backbone is what fx traces (the
detector's own forward is not: it loops over its images and boxes), and most of the multiply-adds at these sizes.
Each detector is built with random weights (no download here); its BatchNorm statistics are taken from the
calibration images first (with the initial ones a random SSDlite's activations shrink to 1e-22 by its head). The
backbone is pruned on the images as the detector's own transform gives them (normalized, resized), compared by its
feature maps (outputs='values'), and put back; then, on other images, the relative squared error of the features
and of the head's raw outputs (class logits and box regressions, before any threshold), and the latency of backbone
and head (eager PyTorch; RawOutputs) and of the backbone alone (ONNX Runtime) beside the dense ones'. Random weights
say nothing about detection accuracy, and these random networks are chaotic (SSDlite's features move by 4.5% when
1% of its weights are zeroed by magnitude): a COCO subset and trained weights would turn the errors into mAP.

    python benchmarks/torchvision_detectors.py --json experiments/torchvision_detectors.json

`--with-head` prunes backbone and head as one module (RawOutputs; the README's recipe for a detector whose head
alone reads the backbone's maps: RetinaNet, SSD), so that the head's inner channels go too and the maps between them
may lose channels (the feature error is then not measured: the maps' shapes differ):

    python benchmarks/torchvision_detectors.py --detectors retinanet_resnet50_fpn --with-head \
        --json experiments/torchvision_detectors_with_head.json
"""
from __future__ import annotations

import argparse
import copy
import time

import torch
import torchvision
from torch import nn

from cnn_sparsegpt import prune_model
from cnn_sparsegpt.commands.latency import compare_latency
from cnn_sparsegpt.pruning.output_kl import relative_squared_error, values
from cnn_sparsegpt.utils import atomic_write_json, run_metadata

# name -> the constructor's keywords (320 pixels on a side for all three, as the two mobile ones are built)
DETECTORS = {
    "ssdlite320_mobilenet_v3_large": {},
    "fasterrcnn_mobilenet_v3_large_320_fpn": {},
    "retinanet_resnet50_fpn": {"min_size": 320, "max_size": 320},
}


@torch.no_grad()
def detector(name: str, images: torch.Tensor) -> nn.Module:
    """The detector with random weights and its BatchNorms' statistics from `images` (their plain mean)."""
    det = untrained(name).eval()
    bns = [m for m in det.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    for m in bns:
        m.momentum = None
        m.reset_running_stats()
        m.train()
    det(list(images))  # (the rest in eval mode: no targets needed)
    for m in bns:
        m.eval()
    return det


def untrained(name: str) -> nn.Module:
    """The detector's modules, untrained and uncalibrated (to ask what it is made of)."""
    return getattr(torchvision.models.detection, name)(weights=None, weights_backbone=None, **DETECTORS[name])


@torch.no_grad()
def backbone_inputs(det: nn.Module, images: torch.Tensor) -> torch.Tensor:
    return det.transform(list(images))[0].tensors


class RawOutputs(nn.Module):
    """The detector up to its head's raw outputs (Faster R-CNN: its region proposal head), no post-processing: what
    is timed and compared. With random weights the boxes NMS keeps, and the proposals Faster R-CNN's second stage
    takes, are random in number, and so is the time they take."""

    def __init__(self, det: nn.Module):
        super().__init__()
        self.backbone = det.backbone
        self.head = det.rpn.head if hasattr(det, "rpn") else det.head

    def forward(self, x: torch.Tensor):
        return self.head(list(self.backbone(x).values()))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--detectors", nargs="+", default=list(DETECTORS), choices=list(DETECTORS))
    p.add_argument("--keep-macs", type=float, default=0.6, help="of the backbone's multiply-adds (with --with-head: "
                   "of backbone and head)")
    p.add_argument("--with-head", action="store_true", help="prune backbone and head as one module (not for Faster "
                   "R-CNN: its second stage reads the maps too)")
    p.add_argument("--image-size", type=int, default=320, help="pixels per side")
    p.add_argument("--nsamples", type=int, default=64, help="random calibration images")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    p.add_argument("--json", required=True)
    args = p.parse_args()
    shape = (3, args.image_size, args.image_size)
    calibration = torch.rand(args.nsamples, *shape, generator=torch.Generator().manual_seed(1))
    test = torch.rand(8, *shape, generator=torch.Generator().manual_seed(2))
    if args.with_head and any(hasattr(untrained(n), "rpn") for n in args.detectors):
        p.error("--with-head: a Faster R-CNN's second stage reads the backbone's maps too; prune its backbone alone")
    out = {"keep_macs": args.keep_macs, "with_head": args.with_head, "input_shape": list(shape),
           "nsamples": args.nsamples,
           "torchvision": torchvision.__version__, "detectors": {}} | run_metadata(torch.device("cpu"))
    for name in args.detectors:
        torch.manual_seed(0)
        dense = detector(name, calibration)
        x, xt = backbone_inputs(dense, calibration), backbone_inputs(dense, test)
        pruned = copy.deepcopy(dense)
        raw_dense, raw_pruned = RawOutputs(dense), RawOutputs(pruned)
        backbone = pruned.backbone
        t0 = time.perf_counter()
        rep = prune_model(raw_pruned if args.with_head else backbone, x, structure="channels",
                          keep_macs=args.keep_macs, outputs="values", progress=False)  # in place, inside `pruned`
        seconds = time.perf_counter() - t0
        with torch.no_grad():
            feature_error = None if args.with_head else \
                float(relative_squared_error(values(dense.backbone(xt)), values(backbone(xt))))
            head_error = float(relative_squared_error(values(raw_dense(xt)), values(raw_pruned(xt))))
        shape_in = tuple(xt.shape[1:])
        raw = compare_latency(raw_dense, raw_pruned, shape_in, "torch", tuple(args.batch_sizes), warmup=2, runs=10)
        alone = compare_latency(dense.backbone, backbone, shape_in, "onnxruntime", tuple(args.batch_sizes),
                                warmup=3, runs=10)
        row = {"prune_seconds": seconds, "timings": rep.timings, "macs": rep.structure["macs"],
               "params": rep.structure["params"], "feature_error": feature_error, "head_error": head_error,
               "raw_outputs_latency_torch": [{k: v for k, v in r.items() if k != "calls"} for r in raw],
               "backbone_latency_onnxruntime": [{k: v for k, v in r.items() if k != "calls"} for r in alone]}
        out["detectors"][name] = row
        atomic_write_json(out, args.json)  # each detector as it ends
        macs = rep.structure["macs"]
        print(f"{name}: {'backbone and head' if args.with_head else 'backbone'} multiply-adds kept "
              f"{macs[1] / macs[0]:.1%}, feature error {'-' if feature_error is None else f'{feature_error:.4f}'}, "
              f"head error {head_error:.4f}, {seconds:.0f} s pruning; backbone and head (torch) " +
              ", ".join(f"batch {r['batch']} {r['speedup']:.2f}x" for r in raw) + "; backbone alone (onnxruntime) "
              + ", ".join(f"batch {r['batch']} {r['speedup']:.2f}x" for r in alone), flush=True)

if __name__ == "__main__":
    main()
