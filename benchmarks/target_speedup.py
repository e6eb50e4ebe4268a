"""--target-speedup on a network's speed alone: random weights and random calibration images (the accuracy of a
random model means nothing), the prune's own search, then an independent side-by-side measurement of the result
at batch 1 and 32 on the same runtime. With --keep-macs F instead, a multiply-add budget (no search) measured the
same way.

    python benchmarks/target_speedup.py --model torchvision:resnet50 --image-size 224 --target 2.0 \\
        --json experiments/channels/resnet50_target_speedup.json
    python benchmarks/target_speedup.py --model torchvision:regnet_y_400mf --keep-macs 0.5 \\
        --json experiments/channels/regnet_y_400mf_keep_macs.json
"""
from __future__ import annotations

import argparse
import copy
import time

import torch

from cnn_sparsegpt import create_model, prune_model
from cnn_sparsegpt.commands.latency import compare_latency
from cnn_sparsegpt.utils import atomic_write_json, run_metadata


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="torchvision:resnet50")
    p.add_argument("--num-classes", type=int, default=1000)
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--nsamples", type=int, default=32, help="random calibration images")
    p.add_argument("--target", type=float, default=2.0)
    p.add_argument("--keep-macs", type=float, help="a multiply-add budget instead of --target")
    p.add_argument("--runtime", default="onnxruntime")
    p.add_argument("--json", required=True)
    args = p.parse_args()
    torch.manual_seed(0)
    model = create_model(args.model, num_classes=args.num_classes).eval()
    dense = copy.deepcopy(model)
    shape = (3, args.image_size, args.image_size)
    calibration = torch.randn(args.nsamples, *shape, generator=torch.Generator().manual_seed(1))
    t0 = time.perf_counter()
    budget = {"keep_macs": args.keep_macs} if args.keep_macs else {"target_speedup": args.target,
                                                                    "speedup_runtime": args.runtime}
    rep = prune_model(model, calibration, structure="channels", batch_size=16, **budget)
    seconds = time.perf_counter() - t0
    rows = compare_latency(dense, model, shape, args.runtime, (1, 32), warmup=3, runs=10, rounds=3)
    st = rep.structure
    search = {} if args.keep_macs else {
        "search": {k: v for k, v in st["latency"].items() if k != "table"}, "table": st["latency"]["table"]}
    out = {"model": args.model, "input_shape": list(shape), "runtime": args.runtime} | budget | search | {
        "macs": st["macs"], "params": st["params"], "prune_seconds": seconds, "timings": rep.timings,
        "groups": st["groups"], "layers": st["layers"],
        "measured_after": [{k: v for k, v in r.items() if k != "calls"} for r in rows]} | run_metadata(
            torch.device("cpu"))
    atomic_write_json(out, args.json)
    found = f"keep_macs {args.keep_macs:g}" if args.keep_macs else \
        f"search measured {st['latency']['measured_speedup']:.2f}x (target {args.target:g})"
    print(f"{args.model}: {found}; measured again: " + ", ".join(f"batch {r['batch']} {r['speedup']:.2f}x"
                                                                 for r in rows) +
          f"; {st['macs'][1] / st['macs'][0]:.1%} of the multiply-adds; {seconds:.0f} s pruning")


if __name__ == "__main__":
    main()
