"""SparseGPT's column loop three ways, side by side in one run (issue 22, item 4): the torch loop, that loop as a
CUDA graph, and the fused Triton kernel (kernels/fused_block.py). Per-layer solves at ResNet-18's shapes, then the
whole ResNet-18 prune as published (2:4 and 50%), each loop after one warm-up call (Triton compiles, the graph is
captured). Masks are compared with the torch loop's.

    python benchmarks/column_loop_speed.py --device cuda --data-dir ../shared/data \\
        --weights ../shared/checkpoints/resnet18_cifar10.pt --json experiments/gpu/column_loop_speed.json
"""
from __future__ import annotations

import argparse
import copy

import torch

from cnn_sparsegpt import PUBLISHED, Pattern, calibration_set, create_model, load_dataset, load_state_dict, prune_model
from cnn_sparsegpt.kernels import fused_block
from cnn_sparsegpt.kernels.fused_block import unavailable
from cnn_sparsegpt.kernels.solver import sparsegpt_solve
from cnn_sparsegpt.utils import atomic_write_json, resolve_device, run_metadata

from speed import timed


def loops_here(device) -> list[str]:
    loops = ["loop"] + (["cuda_graph"] if device.type == "cuda" else [])
    return loops + (["triton"] if unavailable(device) is None else [])


# the fused kernel's launch shape: (rows per program, warps); the first is the library's (fused_block.ROWS, NUM_WARPS)
TILES = ((fused_block.ROWS, fused_block.NUM_WARPS), (8, 1), (16, 1), (16, 2), (32, 4))


def per_layer(device, shapes, loops) -> list[dict]:
    """Each loop on each shape (the fused one at every TILES launch shape), after a warm-up call."""
    rows = []
    runs = [(loop, None) for loop in loops if loop != "triton"] + [("triton", t) for t in TILES if "triton" in loops]
    default = (fused_block.ROWS, fused_block.NUM_WARPS)
    for r, d in shapes:
        g = torch.Generator().manual_seed(0)
        X = torch.randn(d, 2 * d, generator=g).to(device)
        H = 2 * X @ X.t() / X.shape[1]
        W = torch.randn(r, d, generator=g).to(device)
        for pattern in (Pattern(sparsity=0.5), Pattern(n=2, m=4)):
            ref = None
            for loop, tile in runs:
                fused_block.ROWS, fused_block.NUM_WARPS = tile or default
                graphs = {}
                try:
                    sparsegpt_solve(W, H, pattern, column_loop=loop, graphs=graphs)  # warm-up (compiles, captures)
                    t, (Q, mask, _) = timed(lambda: sparsegpt_solve(W, H, pattern, column_loop=loop, graphs=graphs),
                                            device)
                except Exception as e:  # a launch shape that does not compile here: recorded, not fatal
                    rows.append({"shape": f"{r}x{d}", "pattern": str(pattern), "column_loop": loop, "tile": tile,
                                 "error": str(e).splitlines()[0][:200]})
                    continue
                finally:
                    fused_block.ROWS, fused_block.NUM_WARPS = default
                ref = ref if ref is not None else mask
                rows.append({"shape": f"{r}x{d}", "pattern": str(pattern), "column_loop": loop, "tile": tile,
                             "seconds": t, "mask_agreement": (mask == ref).float().mean().item()})
    return rows


def whole_model(device, weights, data_dir, nsamples, loops) -> list[dict]:
    model = create_model("resnet18_cifar")
    model.load_state_dict(load_state_dict(weights))
    model.to(device).eval()
    calib = calibration_set(load_dataset("cifar10", True, data_dir), nsamples, seed=0).to(device)
    rows = []
    for kw in (dict(nm="2:4"), dict(sparsity=0.5)):
        ref = None
        for loop in loops:
            prune_model(copy.deepcopy(model), calib[:256], PUBLISHED, column_loop=loop, progress=False, **kw)  # warm-up
            t, rep = timed(lambda: prune_model(copy.deepcopy(model), calib, PUBLISHED, column_loop=loop,
                                               progress=False, **kw), device)
            ref = ref if ref is not None else rep.masks
            agree = sum((rep.masks[k] == ref[k]).sum().item() for k in ref) / sum(v.numel() for v in ref.values())
            rows.append({"pattern": str(rep.pattern), "column_loop": loop, "total_s": t,
                         "updates_s": rep.timings["solve"] - rep.timings["cholesky"],
                         "hessian_s": rep.timings["hessian"], "forward_s": rep.timings["forward"],
                         "mask_agreement": agree})
    return rows


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="auto")
    p.add_argument("--weights", default="../shared/checkpoints/resnet18_cifar10.pt")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--nsamples", type=int, default=1024)
    p.add_argument("--shapes", default="512x4608,256x2304,64x576", help="rows x columns, comma separated")
    p.add_argument("--skip-model", action="store_true", help="only the per-layer solves")
    p.add_argument("--json", default="experiments/column_loop_speed.json")
    args = p.parse_args()
    device = resolve_device(args.device)
    loops = loops_here(device)
    shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
    result = {"meta": run_metadata(device) | {"nsamples": args.nsamples, "column_loops": loops},
              "per_layer": per_layer(device, shapes, loops)}
    print("| layer | pattern | column loop | rows per program, warps | seconds | masks as the loop's |\n"
          "|---|---|---|---|---|---|")
    for r in result["per_layer"]:
        cells = (f"{r['seconds']:.4f} | {100 * r['mask_agreement']:.2f}%" if "seconds" in r
                 else f"failed: {r['error']} | ")
        print(f"| {r['shape']} | {r['pattern']} | {r['column_loop']} | {r['tile'] or ''} | {cells} |")
    if not args.skip_model:
        result["model"] = whole_model(device, args.weights, args.data_dir, args.nsamples, loops)
        print("\n| ResNet-18 prune as published | column loop | total (s) | updates (s) | masks as the loop's |"
              "\n|---|---|---|---|---|")
        for r in result["model"]:
            print(f"| {r['pattern']} | {r['column_loop']} | {r['total_s']:.2f} | {r['updates_s']:.2f} | "
                  f"{100 * r['mask_agreement']:.3f}% |")
    atomic_write_json(result, args.json)
    print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
