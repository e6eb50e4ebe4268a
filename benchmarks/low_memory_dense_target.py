"""The dense target in low-memory runs, side by side in one process: the dense copy's inputs served by its traced
graph under the low-memory policy (now) against forward passes cut short at every layer (before). Same model,
images and recipe (the default); random weights unless --weights. For scale, the same prune as published
(SparseGPT's solve, no dense target, no refinement) and the default recipe with SparseGPT's solver everywhere.

    python benchmarks/low_memory_dense_target.py --arch torchvision:resnet50 --image-size 224 --nsamples 256 \\
        --json experiments/low_memory_dense_target.json
"""
from __future__ import annotations

import argparse
import copy
import time

import torch

from cnn_sparsegpt import PUBLISHED, create_model, prune_model
from cnn_sparsegpt.pruning.dense_target import DenseInputs
from cnn_sparsegpt.checkpoints import load_state_dict
from cnn_sparsegpt.utils import atomic_write_json, run_metadata


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", default="resnet18_cifar")
    p.add_argument("--weights")
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--nsamples", type=int, default=256)
    p.add_argument("--nm", default="2:4")
    p.add_argument("--json", required=True)
    args = p.parse_args()
    torch.manual_seed(0)
    model = create_model(args.arch, num_classes=10 if "cifar" in args.arch else 1000).eval()
    if args.weights:
        model.load_state_dict(load_state_dict(args.weights))
    x = torch.randn(args.nsamples, 3, args.image_size, args.image_size, generator=torch.Generator().manual_seed(1))
    rows, masks = {}, {}
    follow = DenseInputs.follow_graph
    for way in ("truncated passes (before)", "graph in step (now)"):
        DenseInputs.follow_graph = follow if way.startswith("graph") else (lambda self, names, low_memory=False:
                                                                            False)
        m = copy.deepcopy(model)
        t0 = time.perf_counter()
        rep = prune_model(m, x, nm=args.nm, low_memory=True, progress=False)
        rows[way] = {"seconds": time.perf_counter() - t0, "timings": rep.timings, "forward_passes":
                     rep.forward_passes}
        masks[way] = rep.masks
        print(way, f"{rows[way]['seconds']:.1f} s, dense target {rep.timings.get('dense_target', 0):.1f} s",
              flush=True)
    DenseInputs.follow_graph = follow
    for way, config, extra in (("published", PUBLISHED, {}), ("default, solver sparsegpt", None,
                                                              {"solver": "sparsegpt"})):
        m = copy.deepcopy(model)
        t0 = time.perf_counter()
        rep = prune_model(m, x, config, nm=args.nm, low_memory=True, progress=False, **extra)
        rows[way] = {"seconds": time.perf_counter() - t0, "timings": rep.timings, "forward_passes":
                     rep.forward_passes}
        print(way, f"{rows[way]['seconds']:.1f} s", flush=True)
    a, b = masks.values()
    agree = sum(int((a[k] == b[k]).sum()) for k in a) / sum(a[k].numel() for k in a)
    out = {"arch": args.arch, "image_size": args.image_size, "nsamples": args.nsamples, "pattern": args.nm,
           "rows": rows, "mask_agreement": agree,
           "speedup": rows["truncated passes (before)"]["seconds"] / rows["graph in step (now)"]["seconds"]} | \
        run_metadata(torch.device("cpu"))
    atomic_write_json(out, args.json)
    print(f"{out['speedup']:.2f}x faster; masks agree on {agree:.4%} of the weights")


if __name__ == "__main__":
    main()
