"""The calibration forward of a prune against a plain forward, at 224²: a plain `model(x)` over the batches, the
node-by-node graph executor (pruning/graph.py) with barriers that only read their inputs, and optionally (--prune)
SparseGPT 2:4 as published, whose `forward` phase is that executor with the pruning in between. Random weights and
images (time does not depend on them); one process, the rows one after the other.

    python benchmarks/executor_forward.py --images 512 --batch 32 --prune --json experiments/executor_forward.json

`--repeat K` alternates the plain forward and the executor K times in the one process (this shared machine's speed
drifts by tens of percent within minutes at this size: only pairs run next to each other compare); the row then
holds every run and the medians.

Rows are appended to the JSON, each with the glibc malloc settings of the environment (MALLOC_*), so that e.g.
`MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=68719476736 python benchmarks/executor_forward.py ...` is told apart.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import time
from pathlib import Path

import torch
from torch import fx

from cnn_sparsegpt import PUBLISHED, create_model, prune_model
from cnn_sparsegpt.pruning.graph import GraphExecutor
from cnn_sparsegpt.utils import atomic_write_json, run_metadata


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", default="torchvision:resnet50")
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--images", type=int, default=256)
    p.add_argument("--batch", type=int, default=32, help="images per batch (the prune's batch_size with --prune)")
    p.add_argument("--prune", action="store_true", help="also time a published 2:4 prune at this batch size")
    p.add_argument("--repeat", type=int, default=1, help="alternate the plain forward and the executor this many times")
    p.add_argument("--json", required=True)
    args = p.parse_args()
    if args.repeat < 1:
        p.error("--repeat must be at least 1")
    torch.manual_seed(0)
    model = create_model(args.arch, num_classes=1000).eval()
    x = torch.randn(args.images, 3, args.image_size, args.image_size, generator=torch.Generator().manual_seed(0))
    batches = list(x.split(args.batch))
    row = {"arch": args.arch, "image_size": args.image_size, "images": args.images, "batch": args.batch,
           "malloc_env": {k: v for k, v in os.environ.items() if k.startswith("MALLOC_")}}
    with torch.no_grad():
        model(batches[0][:2])
        gm = fx.symbolic_trace(model)
        last = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)][-1]

        def read(inputs):
            for _ in inputs:
                pass
        plain, executor = [], []
        for _ in range(args.repeat):
            t0 = time.perf_counter()
            for b in batches:
                model(b)
            plain.append(time.perf_counter() - t0)
            ex = GraphExecutor(gm, batches, {last: read})
            t0 = time.perf_counter()
            ex.run()
            executor.append(time.perf_counter() - t0)
            del ex
        row["plain_s"], row["executor_s"] = statistics.median(plain), statistics.median(executor)
        if args.repeat > 1:
            row["plain_runs_s"], row["executor_runs_s"] = plain, executor
    if args.prune:
        t0 = time.perf_counter()
        rep = prune_model(model, x, PUBLISHED, method="sparsegpt", nm="2:4", progress=False, batch_size=args.batch)
        row["prune_s"] = time.perf_counter() - t0
        row["prune_timings"] = rep.timings
    row["max_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({k: round(v, 1) if isinstance(v, float) else v for k, v in row.items() if k != "prune_timings"}))
    path = Path(args.json)
    rows = json.loads(path.read_text())["rows"] if path.exists() else []
    atomic_write_json({"rows": rows + [row | run_metadata(torch.device("cpu"))]}, path)


if __name__ == "__main__":
    main()
