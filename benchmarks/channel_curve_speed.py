"""The channel cost curves (structured._cost_curve, each group's block-OBS removal order) under two versions of the
library, side by side: a base commit in a temporary git worktree against the working tree, each in a fresh process,
the two alternating (commit_ab.py's pairs). Per group: its width, its consumers' widest input, seconds, and a digest
of the removal order (equal digests: the same order).

    python benchmarks/channel_curve_speed.py --base d47edf4~1 --json experiments/channel_curve_speed.json

The model is torchvision's AlexNet with random weights (seed 0) on 64 random 64×64 images: its classifier's
4096-wide Linears are the widest groups a torchvision CNN has (ConvNeXt-Base's MLPs are as wide), its convs are
3×3 and 5×5. Curves to 90% of each group, in chunks of 8 (--round-to's default).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from pathlib import Path

from commit_ab import base_tree, pairs, run_worker  # this directory is sys.path[0] for a script



def worker() -> None:
    """In a fresh process: every removable group's cost curve, timed; its row on stdout."""
    import torch
    import torchvision

    import cnn_sparsegpt
    from cnn_sparsegpt.pruning.allocation import dense_statistics
    from cnn_sparsegpt.pruning.channels import channel_groups
    from cnn_sparsegpt.pruning.structured import _cost_curve

    torch.manual_seed(0)
    model = torchvision.models.alexnet(num_classes=10).eval()
    x = torch.randn(64, 3, 64, 64)
    groups = [g for g in channel_groups(model, x[:1]) if g.removable]
    names = sorted({c for g in groups for u in g.units for c in u.columns})
    stats = dense_statistics(model, [x], names, hessian=True)
    rows = []
    for g in groups:
        t = time.perf_counter()
        order, _ = _cost_curve(g, stats, 0.01, int(0.9 * len(g.removable)), 8)
        widest = max(stats[c].d for u in g.units for c in u.columns)
        rows.append({"producers": g.producers, "units": len(g.units), "consumer_inputs": widest,
                     "seconds": time.perf_counter() - t,
                     "order": hashlib.sha256(json.dumps(order).encode()).hexdigest()[:16]})
    print("ROW " + json.dumps({"groups": rows, "package": str(Path(cnn_sparsegpt.__file__).resolve().parent)}),
          flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base", help="the commit to compare the working tree with")
    p.add_argument("--repeat", type=int, default=2, help="pairs, each base then working tree")
    p.add_argument("--json")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        return worker()
    if not args.base or not args.json:
        p.error("--base and --json are required")
    import torch
    from cnn_sparsegpt.utils import atomic_write_json, run_metadata

    runs = []
    with base_tree(args.base) as (base, base_src):
        for name, src in pairs(base_src, args.repeat):
            row = run_worker(src, [sys.executable, __file__, "--worker"]) | {"version": name}
            runs.append(row)
            print(name, [(g["units"], round(g["seconds"], 1), g["order"]) for g in row["groups"]], flush=True)
            atomic_write_json({"base_commit": base, "runs": runs} | run_metadata(torch.device("cpu")), args.json)


if __name__ == "__main__":
    main()
