"""Speed benchmark: the per-layer solver against a naive column-by-column update, and a whole-model
prune (ResNet-18 on CIFAR, or ResNet-50 at 224) split into phases against the floor measured in the
same run.

    python benchmarks/speed.py --weights ../shared/checkpoints/resnet18_cifar10.pt --data-dir ../shared/data
    python benchmarks/speed.py --arch resnet50 --skip-solver --json experiments/speed_resnet50.json

Writes a JSON of the raw numbers (--json) and prints a markdown table.
"""
from __future__ import annotations

import argparse
import math
import multiprocessing
import os
import platform
import time
from concurrent.futures import ProcessPoolExecutor

import torch

from cnn_sparsegpt import (
    PUBLISHED,
    LayerPruner,
    Pattern,
    calibration_set,
    create_model,
    load_dataset,
    prune_model,
)
from cnn_sparsegpt.commands.bench import PeakRSS
from cnn_sparsegpt.kernels.linalg import accumulate_xxt_, inverse_cholesky
from cnn_sparsegpt.kernels.shifted_gram import flops as gram_flops
from cnn_sparsegpt.pruning.heap import reuse_freed_memory
from cnn_sparsegpt.pruning.prune import choose_layers, forward_order
from cnn_sparsegpt.kernels.solver import sparsegpt_solve
from cnn_sparsegpt.checkpoints import load_state_dict
from cnn_sparsegpt.utils import atomic_write_json, resolve_device, run_metadata


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device):
    sync(device)
    t0 = time.perf_counter()
    out = fn()
    sync(device)
    return time.perf_counter() - t0, out


def naive_sparsegpt(W, H, pattern, percdamp=0.01, stats=None):
    """The old approach: one column at a time, each column's error applied to all remaining columns at once."""
    W = W.clone()
    # It needs all of U = chol(H⁻¹): our factorization followed by a triangular inverse (the cheapest way)
    t, (Hinv, _) = timed(lambda: inverse_cholesky(H[None], percdamp), W.device)
    stats["cholesky"] = t
    Hinv = Hinv[0]
    d = W.shape[1]
    scores = W ** 2 / torch.diag(Hinv)[None] ** 2
    if pattern.is_nm:
        from cnn_sparsegpt.kernels.masks import nm_prune_mask
        mask = nm_prune_mask(scores, pattern.n, pattern.m)
    else:
        from cnn_sparsegpt.kernels.masks import topk_prune_mask
        mask = topk_prune_mask(scores, round(pattern.sparsity * scores.numel()))
    for i in range(d):
        w = W[:, i]
        err = w.masked_fill(~mask[:, i], 0) / Hinv[i, i]
        W[:, i:] -= err[:, None] * Hinv[i, i:][None, :]
        W[:, i][mask[:, i]] = 0
    return W


def solver_table(device, shapes=((512, 4608), (128, 12544)), column_loop="auto"):
    rows = []
    for r, d in shapes:
        g = torch.Generator(device="cpu").manual_seed(0)
        X = torch.randn(d, 2 * d, generator=g).to(device)
        H = 2 * X @ X.t() / X.shape[1]
        W = torch.randn(r, d, generator=g).to(device)
        del X
        for pattern in (Pattern(sparsity=0.5), Pattern(n=2, m=4)):
            stats, nstats = {}, {}
            ours, _ = timed(lambda: sparsegpt_solve(W, H, pattern, stats=stats, column_loop=column_loop), device)
            naive, _ = timed(lambda: naive_sparsegpt(W, H, pattern, stats=nstats), device)
            rows.append({"shape": f"{r}x{d}", "pattern": str(pattern), "ours_s": ours,
                         "ours_cholesky_s": stats["cholesky"], "naive_s": naive, "naive_cholesky_s": nstats["cholesky"],
                         "speedup": naive / ours,
                         "update_speedup": (naive - nstats["cholesky"]) / (ours - stats["cholesky"])})
    return rows


ARCHS = {  # what the whole-model rows prune
    "resnet18_cifar": "ResNet-18 (CIFAR, 32x32, shared checkpoint, JPEG CIFAR-10 calibration images)",
    "resnet50": "torchvision ResNet-50 at 224x224 (random weights and inputs: time and memory do not depend on them)",
}


def gemm_rate(device) -> float:
    """This machine's float32 GEMM rate (flop/s): the best of three 4096² matmuls."""
    a = torch.randn(4096, 4096, device=device)
    return 2 * 4096 ** 3 / min(timed(lambda: a @ a, device)[0] for _ in range(3))


def model_and_images(arch, weights, data_dir, nsamples, device):
    """The benchmarks' prune: torchvision ResNet-50 on random 224² images (random weights), or ResNet-18 on the
    shared checkpoint and CIFAR training images as `prune` draws them."""
    if arch == "resnet50":
        model = create_model("torchvision:resnet50", num_classes=1000).to(device).eval()
        calib = torch.randn(nsamples, 3, 224, 224, generator=torch.Generator().manual_seed(0))
        return model, calib.to(device)
    model = create_model("resnet18_cifar")
    model.load_state_dict(load_state_dict(weights))
    model.to(device).eval()
    train = load_dataset("cifar10", True, data_dir)
    return model, calibration_set(train, nsamples, seed=0).to(device)


def measure_floor(arch, weights, data_dir, nsamples, device, batch_size=128):
    """The floor, as bare torch ops: one forward over the calibration set, the Hessian products of every
    pruned layer on its (dense) inputs, one Cholesky factorization per pruned layer. The Hessians are
    accumulated by hooks during one more forward pass, batch by batch, and only the products are timed."""
    model, calib = model_and_images(arch, weights, data_dir, nsamples, device)
    batches = calib.split(batch_size)
    # the allocator as the prune has it (pruning/heap.py): a plain forward gains from reused memory as much as it does
    with torch.no_grad(), reuse_freed_memory(device.type == "cpu") as reused:
        model(batches[0][:8])
        t_forward, _ = timed(lambda: [model(x) for x in batches], device)
        plan = choose_layers(model, forward_order(model, calib[:1]))
        mods = dict(model.named_modules())
        pruners = {name: LayerPruner(mods[name], name) for name, reason in plan.items() if not reason}
        t_hessian = 0.0

        flops = {"im2col": 0.0, "pruner": 0.0}  # Hessian flops of the im2col products and of the pruner's path
        path = {}  # the pruner's way to H per layer

        def accumulate(module, inp):  # the same blocked symmetric product on the same chunks as the pruner's
            nonlocal t_hessian
            p = pruners[names[module]]
            x = inp[0]
            im2col = p.d ** 2 * p.columns(x[:1]).shape[-1] * len(x)  # d²·T: the symmetric half
            flops["im2col"] += im2col
            if names[module] not in path:  # asked of a fresh pruner: p's H was read, which ends its accumulation
                fresh = LayerPruner(module, names[module])
                path[names[module]] = "shifted" if fresh.shifted(x) else "pointwise" if fresh.pointwise(x) else ""
            if path[names[module]] == "shifted":
                flops["pruner"] += gram_flops(module.kernel_size, module.padding, x.shape[2:], x.shape[1], len(x),
                                              stride=module.stride, cpu=x.device.type == "cpu")[0]
            elif path[names[module]] == "pointwise":  # per-image products, both halves
                flops["pruner"] += 2 * im2col
            else:
                flops["pruner"] += im2col
            for chunk in x.split(p.chunk_images(x)):
                t, _ = timed(lambda chunk=chunk: accumulate_xxt_(p.H, p.columns(chunk)), device)
                t_hessian += t

        names = {mods[name]: name for name in pruners}
        hooks = [mods[name].register_forward_pre_hook(accumulate) for name in pruners]
        for x in batches:
            model(x)
        for h in hooks:
            h.remove()
        t_chol = 0.0
        for p in pruners.values():
            H = p.H[0] + 0.01 * torch.diag(p.H[0]).mean() * torch.eye(p.d, device=device)
            p.free()
            t, _ = timed(lambda: torch.linalg.cholesky(H.flip(0, 1)), device)
            t_chol += t
    floor = {"forward": t_forward, "hessian": t_hessian, "cholesky": t_chol}
    floor["total"] = sum(floor.values())
    gemm = gemm_rate(device)
    # the limits of issue 22: forward + Hessian flops at the GEMM rate + Cholesky, per formulation
    floor |= {"gemm_gflops": gemm / 1e9, "hessian_tflop_im2col": flops["im2col"] / 1e12,
              "hessian_tflop_pruner": flops["pruner"] / 1e12,
              "limit_im2col": t_forward + flops["im2col"] / gemm + t_chol,
              "limit_pruner": t_forward + flops["pruner"] / gemm + t_chol, "heap_reuse": reused}
    return floor


def measure_prune(arch, weights, data_dir, nsamples, device, low_memory, column_loop="auto"):
    """One whole-model prune, run in a fresh process so that its peak RSS is its own (measure_prune_twice)."""
    model, calib = model_and_images(arch, weights, data_dir, nsamples, device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    input_bytes = {}
    forward_order(model, calib[:1], input_bytes)
    with PeakRSS() as mem:
        before = mem.peak
        t_total, rep = timed(lambda: prune_model(model, calib, PUBLISHED, method="sparsegpt", nm="2:4", progress=False,
                                                 low_memory=low_memory, column_loop=column_loop), device)
    t = rep.timings
    phases = {"total": t_total, "calibration forwards": t["forward"], "hessian": t["hessian"],
              "cholesky": t["cholesky"], "updates": t["solve"] - t["cholesky"],
              "bn_recalibration": t["bn_recalibration"]}
    d = max(math.prod(x.shape[1:]) for x in rep.layers if not x.skipped)  # the widest pruned layer
    model_bytes = sum(v.numel() * v.element_size() for v in model.state_dict().values())
    act_bytes = nsamples * max(input_bytes.values())  # the largest layer input over the calibration set
    memory = {"rss_before_mb": before / 2**20, "rss_peak_mb": mem.peak / 2**20,
              "rss_increase_mb": (mem.peak - before) / 2**20, "model_mb": model_bytes / 2**20,
              "calibration_mb": calib.numel() * calib.element_size() / 2**20,
              "largest_layer_inputs_mb": act_bytes / 2**20, "two_largest_hessians_mb": 2 * d * d * 4 / 2**20,
              "peak_stored_mb": rep.peak_stored_mb,
              "peak_gpu_mb": torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None}
    return {"low_memory": low_memory, "memory_policy": rep.memory_policy, "phases": phases,
            "forward_passes": rep.forward_passes, "memory": memory, "sparsity": rep.sparsity}


def in_fresh_process(fn, *args, mmap_threshold: int | None = None):
    """Run fn in a new process. mmap_threshold: glibc's M_MMAP_THRESHOLD there, in bytes (None: glibc's dynamic
    default, as a user runs). The memory runs fix it at 1 MiB, so that freed tensors leave the RSS at once instead
    of staying in a heap that only grows, and the RSS follows the memory actually in use (the dynamic default can
    add ~100 MB). Timed runs keep the default: under the fixed threshold every tensor of 1 MiB or more is mapped
    and faulted in afresh, which made the ResNet-18 prune 20-27% slower (34.1 / 34.0 s against 28.5 / 26.8 s,
    alternating, commit acf85dd). Prunes under the default memory policy disable glibc's mmap for their duration
    (pruning/heap.py), so the threshold no longer applies there: their RSS then includes the free memory the heap
    keeps, as a user's would."""
    env = os.environ.get("MALLOC_MMAP_THRESHOLD_")
    if mmap_threshold is None:
        os.environ.pop("MALLOC_MMAP_THRESHOLD_", None)
    else:
        os.environ["MALLOC_MMAP_THRESHOLD_"] = str(mmap_threshold)
    try:
        with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
            return pool.submit(fn, *args).result()
    finally:
        if env is None:
            os.environ.pop("MALLOC_MMAP_THRESHOLD_", None)
        else:
            os.environ["MALLOC_MMAP_THRESHOLD_"] = env


def measure_prune_twice(*args) -> dict:
    """The prune's phases from a run with glibc's defaults (the time a user sees), its memory from a second run
    with the mmap threshold at 1 MiB (see in_fresh_process; that run's phases kept as phases_mmap_1mib)."""
    run = in_fresh_process(measure_prune, *args)
    memory_run = in_fresh_process(measure_prune, *args, mmap_threshold=2**20)
    return run | {"memory": memory_run["memory"], "phases_mmap_1mib": memory_run["phases"]}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--weights", default="../shared/checkpoints/resnet18_cifar10.pt")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--nsamples", type=int, default=1024)
    p.add_argument("--arch", choices=sorted(ARCHS), default="resnet18_cifar", help="the whole-model rows' network")
    p.add_argument("--device", default="auto")
    p.add_argument("--skip-model", action="store_true", help="only the per-layer solver table")
    p.add_argument("--skip-solver", action="store_true", help="only the whole-model prune")
    p.add_argument("--default-only", action="store_true", help="whole model: no --low-memory run")
    p.add_argument("--solver-shapes", default="512x4608,128x12544", help="rows x columns, comma separated")
    p.add_argument("--column-loop", default="auto", help="SparseGPT's column loop (prune --help), for every row")
    p.add_argument("--json", default="experiments/speed.json")
    args = p.parse_args()
    device = resolve_device(args.device)
    shapes = [tuple(int(v) for v in s.split("x")) for s in args.solver_shapes.split(",")]
    result = {"meta": run_metadata(device) | {"cpu": platform.processor(), "nsamples": args.nsamples,
                                              "column_loop": args.column_loop}}
    result["solver"] = [] if args.skip_solver else solver_table(device, shapes, args.column_loop)
    print("| layer | pattern | ours (s) | of which Cholesky (s) | naive (s) | of which Cholesky (s) | speed-up | "
          "speed-up of the updates |\n|---|---|---|---|---|---|---|---|")
    for r in result["solver"]:
        print(f"| {r['shape']} | {r['pattern']} | {r['ours_s']:.2f} | {r['ours_cholesky_s']:.2f} | "
              f"{r['naive_s']:.2f} | {r['naive_cholesky_s']:.2f} | {r['speedup']:.1f}x | {r['update_speedup']:.0f}x |")
    if not args.skip_model:
        runs = [measure_prune_twice(args.arch, args.weights, args.data_dir, args.nsamples, device, low,
                                    args.column_loop)
                for low in ((None,) if args.default_only else (None, True))]
        fl = in_fresh_process(measure_floor, args.arch, args.weights, args.data_dir, args.nsamples, device)
        result["model"] = {"arch": args.arch, "description": ARCHS[args.arch], "floor": fl, "runs": runs}
        print(f"\n{ARCHS[args.arch]}: {args.nsamples} calibration images, SparseGPT 2:4, BN recalibration on")
        print("| phase (seconds) | default (memory policy by free memory) | --low-memory |\n|---|---|---|"
              if len(runs) == 2 else "| phase (seconds) | default (memory policy by free memory) |\n|---|---|")
        for k in runs[0]["phases"]:
            print(f"| {k} | " + " | ".join(f"{r['phases'][k]:.1f}" for r in runs) + " |")
        print(f"| floor: forward {fl['forward']:.1f} + Hessian products {fl['hessian']:.1f} + "
              f"Cholesky {fl['cholesky']:.1f} | {fl['total']:.1f} | |")

        def row(label, cells):
            print(f"| {label} | " + " | ".join(cells) + " |")

        row("total / floor", [f"{r['phases']['total'] / fl['total']:.2f}x" for r in runs])
        print(f"| limit, im2col: forward + {fl['hessian_tflop_im2col']:.2f} Tflop at {fl['gemm_gflops']:.0f} GFLOP/s + "
              f"Cholesky | {fl['limit_im2col']:.1f} | |")
        print(f"| limit, the pruner's Hessian path: {fl['hessian_tflop_pruner']:.2f} Tflop | "
              f"{fl['limit_pruner']:.1f} | |")
        row("total / im2col limit", [f"{r['phases']['total'] / fl['limit_im2col']:.2f}x" for r in runs])
        row("total / own limit", [f"{r['phases']['total'] / fl['limit_pruner']:.2f}x" for r in runs])
        row("memory policy", [r["memory_policy"].split(" (")[0] for r in runs])
        row("forward passes", [f"{r['forward_passes']:.2f}" for r in runs])
        row("peak RSS (MB)", [f"{r['memory']['rss_peak_mb']:.0f}" for r in runs])
        row("peak RSS above start (MB)", [f"{r['memory']['rss_increase_mb']:.0f}" for r in runs])
        row("activations held at peak (MB)", [f"{r['memory']['peak_stored_mb']:.0f}" for r in runs])
        if device.type == "cuda":
            row("peak GPU memory (MB)", [f"{r['memory']['peak_gpu_mb']:.0f}" for r in runs])
        mem = runs[0]["memory"]
        print(f"\nRSS at start {mem['rss_before_mb']:.0f} MB (torch, data, model); model {mem['model_mb']:.0f} MB, "
              f"calibration images {mem['calibration_mb']:.0f} MB, largest layer's calibration inputs "
              f"{mem['largest_layer_inputs_mb']:.0f} MB, two largest Hessians {mem['two_largest_hessians_mb']:.0f} MB")
    atomic_write_json(result, args.json)
    print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
