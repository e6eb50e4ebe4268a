"""What the recommended recipe costs over the published prune (issue 22, item 3), side by side in one process:
the same model, calibration images and pattern pruned as published (SparseGPT's solve), with the default recipe
(exact solver where affordable, dense target, cg re-solve; at an unstructured sparsity also the dp allocation),
with the default recipe on SparseGPT's solver everywhere, and (unstructured) with the default recipe's uniform
allocation; each phase's seconds from the reports. Random weights unless --weights; random images unless
--data-dir (then the model's training images, as `prune` draws them).

    python benchmarks/recipe_overhead.py --weights ../shared/checkpoints/resnet18_cifar10.pt \\
        --data-dir ../shared/data --json experiments/recipe_overhead.json
    python benchmarks/recipe_overhead.py ... --pattern 0.9 --json experiments/recipe_overhead_sparsity0.9.json
    python benchmarks/recipe_overhead.py --arch torchvision:resnet50 --image-size 224 --nsamples 256 --pattern 0.5 \
        --row default --row "default, allocation uniform" --json experiments/recipe_overhead_resnet50.json
"""
from __future__ import annotations

import argparse
import copy
import time

import torch

from cnn_sparsegpt import PUBLISHED, RECOMMENDED, calibration_set, create_model, load_dataset, prune_model
from cnn_sparsegpt.checkpoints import load_state_dict
from cnn_sparsegpt.utils import atomic_write_json, run_metadata


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", default="resnet18_cifar")
    p.add_argument("--weights")
    p.add_argument("--data-dir")
    p.add_argument("--nsamples", type=int, default=1024)
    p.add_argument("--pattern", default="2:4", help="N:M, or an unstructured sparsity such as 0.9")
    p.add_argument("--low-memory", action="store_true")
    p.add_argument("--image-size", type=int, default=32, help="random images of this size (without --data-dir)")
    p.add_argument("--row", action="append", help="a prune to run, by its name (repeat; default: all)")
    p.add_argument("--json", required=True)
    args = p.parse_args()
    torch.manual_seed(0)
    model = create_model(args.arch, num_classes=10).eval()
    if args.weights:
        model.load_state_dict(load_state_dict(args.weights))
    if args.data_dir:
        x = calibration_set(load_dataset("cifar10", train=True, data_dir=args.data_dir), args.nsamples)
    else:
        x = torch.randn(args.nsamples, 3, args.image_size, args.image_size, generator=torch.Generator().manual_seed(1))
    rows = {}
    target = {"nm": args.pattern} if ":" in args.pattern else {"sparsity": float(args.pattern)}
    runs = [("published", PUBLISHED, {}), ("default", RECOMMENDED, {}),
            ("default, solver sparsegpt", RECOMMENDED, {"solver": "sparsegpt"})]
    if "nm" in target:  # the N:M default before permute + swap (docs/RESULTS.md, "The default at N:M")
        runs.append(("default, no permute, cg", RECOMMENDED, {"permute": False, "refine": "cg"}))
    if "sparsity" in target:
        runs.append(("default, allocation uniform", RECOMMENDED, {"allocation": "uniform"}))
    # the recipe's parts added one at a time to the published prune (what each costs); only when asked by --row
    steps = [("published, dense target", PUBLISHED, {"dense_target": True}),
             ("published, dense target, intercept", PUBLISHED, {"dense_target": True, "intercept": True}),
             ("published, dense target, intercept, cg", PUBLISHED, {"dense_target": True, "intercept": True,
                                                                     "refine": "cg"})]
    if args.row:
        unknown = set(args.row) - {r[0] for r in runs + steps}
        if unknown:
            p.error(f"unknown --row {', '.join(sorted(unknown))}")
        runs = [r for r in runs + steps if r[0] in args.row]
    for name, config, extra in runs:
        m = copy.deepcopy(model)
        t0 = time.perf_counter()
        rep = prune_model(m, x, config, low_memory=args.low_memory, progress=False, **target, **extra)
        rows[name] = {"seconds": time.perf_counter() - t0, "timings": rep.timings}
        print(name, f"{rows[name]['seconds']:.1f} s", {k: round(v, 1) for k, v in rep.timings.items()}, flush=True)
    base = rows.get("published", next(iter(rows.values())))["seconds"]
    out = {"arch": args.arch, "nsamples": args.nsamples, "pattern": args.pattern, "low_memory": args.low_memory,
           "rows": rows, "ratios": {k: r["seconds"] / base for k, r in rows.items()}} | \
        run_metadata(torch.device("cpu"))
    atomic_write_json(out, args.json)
    print({k: f"{v:.2f}x" for k, v in out["ratios"].items()})


if __name__ == "__main__":
    main()
