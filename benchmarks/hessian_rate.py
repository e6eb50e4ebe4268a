"""Where the Hessian accumulation's time goes on one conv layer (issue 22, items 1 and 2): the unfold into
solver-order columns, the X·Xᵀ product, and the whole LayerPruner.add_batch (its own path: shifted correlations
where cheaper, and im2col forced), against this machine's fp32 GEMM rate (a 4096² matmul), all in one process.

    python benchmarks/hessian_rate.py --json experiments/hessian_rate.json
"""
from __future__ import annotations

import argparse
import time

import torch
from torch import nn

from cnn_sparsegpt.kernels.shifted_gram import flops as gram_flops, takes_cells
from cnn_sparsegpt.pruning.layer import LayerPruner
from cnn_sparsegpt.utils import atomic_write_json, run_metadata


def best_of(fn, repeats: int = 3) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", required=True)
    p.add_argument("--images", type=int, default=512)
    args = p.parse_args()
    a = torch.randn(4096, 4096)
    gemm = 2 * 4096 ** 3 / best_of(lambda: a @ a)
    rows = []
    for cin, size in ((64, 32), (128, 16), (256, 8), (512, 4)):  # ResNet-18 (CIFAR) stages' 3x3 convs
        conv = nn.Conv2d(cin, cin, 3, padding=1, bias=False)
        x = torch.randn(args.images, cin, size, size)
        batches = list(x.split(128))
        p_ = LayerPruner(conv, "conv")
        d, T = p_.d, args.images * size * size
        flops = d * d * T  # the symmetric product: half of 2·d²·T

        def whole(path=None):  # path None: the pruner's choice; "im2col": forced
            q = LayerPruner(conv, "conv")
            if path == "im2col":
                q.shifted = lambda inp: False
            for b in batches:
                q.add_batch(b)

        def unfold_only():
            for b in batches:
                for chunk in b.split(p_.chunk_images(b)):
                    p_.columns(chunk)

        cols = [p_.columns(c) for b in batches for c in b.split(p_.chunk_images(b))]

        def product_only():
            for X in cols:
                torch.matmul(X[0], X[0].t())

        shifted = LayerPruner(conv, "conv").shifted(batches[0])
        r = {"in_channels": cin, "size": size, "d": d, "columns": T, "whole_s": best_of(whole),
             "im2col_whole_s": best_of(lambda: whole("im2col")),
             "path": ("cells" if takes_cells((3, 3), (1, 1), (size, size), channels=cin) else "shifted")
             if shifted else "im2col",
             "shifted_flops": gram_flops((3, 3), (1, 1), (size, size), cin, args.images)[0],
             "unfold_s": best_of(unfold_only), "product_full_s": best_of(product_only),
             "chunk_images": p_.chunk_images(batches[0])}
        r["whole_gflops"] = flops / r["whole_s"] / 1e9
        r["limit_s"] = flops / gemm  # im2col's symmetric product at the GEMM rate
        r["shifted_limit_s"] = r["shifted_flops"] / gemm  # the shifted products (border corrections left out)
        r["whole_over_limit"] = r["whole_s"] / r["limit_s"]
        rows.append(r)
        print({k: (round(v, 3) if isinstance(v, float) else v) for k, v in r.items()}, flush=True)
    atomic_write_json({"gemm_gflops": gemm / 1e9, "images": args.images, "rows": rows} |
                      run_metadata(torch.device("cpu")), args.json)
    print(f"GEMM {gemm / 1e9:.0f} GFLOP/s")


if __name__ == "__main__":
    main()
