"""Each layer's Hessian time inside a whole prune (the time in LayerPruner.add_batch, by the path it takes), against
that layer's im2col flops at this machine's GEMM rate: where the Hessian phase spends its time.

    python benchmarks/hessian_by_layer.py --arch resnet50 --nsamples 256 --json experiments/hessian_by_layer.json

ResNet-50 at 224² on random weights and images, or ResNet-18 on the shared checkpoint and CIFAR training images;
SparseGPT 2:4 as published. The im2col limit counts the full d²·T product (2·d²·T flops), not its symmetric half.
"""
from __future__ import annotations

import argparse
import math
import time
from collections import defaultdict

import torch
from torch import nn

from cnn_sparsegpt import PUBLISHED, prune_model
from cnn_sparsegpt.kernels.shifted_gram import output_size
from cnn_sparsegpt.pruning import layer as layer_module
from cnn_sparsegpt.utils import atomic_write_json, run_metadata
from speed import gemm_rate, model_and_images  # this directory is sys.path[0] for a script


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", default="resnet50", choices=["resnet18_cifar", "resnet50"])
    p.add_argument("--weights", default="../shared/checkpoints/resnet18_cifar10.pt")
    p.add_argument("--data-dir", default="../shared/data")
    p.add_argument("--nsamples", type=int, default=256)
    p.add_argument("--json", required=True)
    args = p.parse_args()

    rate = gemm_rate(torch.device("cpu"))
    seconds, info = defaultdict(float), {}
    add_batch = layer_module.LayerPruner.add_batch

    def timed(self, inp, dense=None, end=True):
        path = "shifted" if self.shifted(inp) else "pointwise" if self.pointwise(inp) else "columns"
        t0 = time.perf_counter()
        add_batch(self, inp, dense, end)
        seconds[self.name] += time.perf_counter() - t0
        m = self.layer
        positions = len(inp)
        if isinstance(m, nn.Conv2d):
            positions *= math.prod(output_size(inp.shape[-2:], m.kernel_size, m.padding, m.stride))
        row = info.setdefault(self.name, {"layer": self.name, "path": path, "d": self.d, "flops_im2col": 0,
                                          "kernel": list(getattr(m, "kernel_size", [])),
                                          "stride": list(getattr(m, "stride", [])), "input": list(inp.shape[1:])})
        row["flops_im2col"] += 2 * self.d ** 2 * positions

    layer_module.LayerPruner.add_batch = timed
    try:
        model, x = model_and_images(args.arch, args.weights, args.data_dir, args.nsamples, torch.device("cpu"))
        report = prune_model(model, x, PUBLISHED, nm="2:4", progress=False)
    finally:
        layer_module.LayerPruner.add_batch = add_batch
    rows = [info[n] | {"seconds": seconds[n], "im2col_limit_seconds": info[n]["flops_im2col"] / rate} for n in info]
    by_path = defaultdict(lambda: [0.0, 0.0])
    for r in rows:
        key = f"{r['path']} {r['kernel']} stride {r['stride']}"
        by_path[key][0] += r["seconds"]
        by_path[key][1] += r["im2col_limit_seconds"]
        print(f"{r['layer']:26s} {r['path']:9s} d={r['d']:5d} {r['seconds']:6.2f} s  im2col limit "
              f"{r['im2col_limit_seconds']:6.2f} s")
    for key, (s, lim) in by_path.items():
        print(f"{key}: {s:.2f} s, im2col limit {lim:.2f} s")
    atomic_write_json({"arch": args.arch, "nsamples": args.nsamples, "gemm_gflops": rate / 1e9,
                       "timings": report.timings, "layers": rows,
                       "by_path": {k: {"seconds": v[0], "im2col_limit_seconds": v[1]} for k, v in by_path.items()}}
                      | run_metadata(torch.device("cpu")), args.json)


if __name__ == "__main__":
    main()
