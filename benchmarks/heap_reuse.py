"""Freed memory reused (pruning/heap.py) against glibc's defaults: the same prune in fresh processes, the two
alternating, time per phase and peak RSS (getrusage) of each.

    python benchmarks/heap_reuse.py --json experiments/heap_reuse_resnet18.json
    python benchmarks/heap_reuse.py --arch resnet50 --nsamples 256 --json experiments/heap_reuse_resnet50.json
    python benchmarks/heap_reuse.py --evaluate --json experiments/heap_reuse_evaluate.json

ResNet-18 on the shared checkpoint and CIFAR training images (with --data-dir), ResNet-50 at 224² on random weights
and images; SparseGPT 2:4 as published unless --recipe recommended. --evaluate: ResNet-18's evaluation on the CIFAR-10
test split instead of a prune (`evaluate`, which keeps freed memory the same way on a CPU).
"""
from __future__ import annotations

import argparse
import multiprocessing
import resource
import time
from concurrent.futures import ProcessPoolExecutor

import torch

from cnn_sparsegpt import PUBLISHED, RECOMMENDED, create_model, load_dataset, prune_model
from cnn_sparsegpt.commands import train as train_module
from cnn_sparsegpt.pruning import prune as prune_module
from cnn_sparsegpt.pruning.heap import reuse_freed_memory
from cnn_sparsegpt.checkpoints import load_state_dict
from cnn_sparsegpt.utils import atomic_write_json, run_metadata
from speed import model_and_images  # this directory is sys.path[0] for a script


def _glibc_defaults(reuse: bool) -> None:
    """Without reuse: the library's own switches (in prune_model and evaluate) turned off in this worker process."""
    if not reuse:
        off = lambda enabled=True: reuse_freed_memory(False)  # noqa: E731
        prune_module.reuse_freed_memory = train_module.reuse_freed_memory = off


def one_evaluation(weights: str, data_dir: str, reuse: bool) -> dict:
    _glibc_defaults(reuse)
    model = create_model("resnet18_cifar").eval()
    model.load_state_dict(load_state_dict(weights))
    test = load_dataset("cifar10", False, data_dir)
    t0 = time.perf_counter()
    acc = train_module.evaluate(model, test, progress=False)
    return {"reuse": reuse, "seconds": time.perf_counter() - t0, "accuracy": acc, "timings": {},
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def one_prune(arch: str, weights: str | None, data_dir: str | None, nsamples: int, recipe: str, reuse: bool) -> dict:
    _glibc_defaults(reuse)
    model, x = model_and_images(arch, weights, data_dir, nsamples, torch.device("cpu"))
    t0 = time.perf_counter()
    rep = prune_model(model, x, PUBLISHED if recipe == "published" else RECOMMENDED, nm="2:4", progress=False)
    return {"reuse": reuse, "seconds": time.perf_counter() - t0, "timings": rep.timings,
            "memory_policy": rep.memory_policy,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", default="resnet18_cifar", choices=["resnet18_cifar", "resnet50"])
    p.add_argument("--weights", default="../shared/checkpoints/resnet18_cifar10.pt")
    p.add_argument("--data-dir", default="../shared/data")
    p.add_argument("--nsamples", type=int, default=1024)
    p.add_argument("--recipe", default="published", choices=["published", "recommended"])
    p.add_argument("--repeat", type=int, default=2, help="pairs of prunes, each pair off then on")
    p.add_argument("--evaluate", action="store_true", help="time ResNet-18's evaluation on the test split instead")
    p.add_argument("--json", required=True)
    args = p.parse_args()
    runs = []
    ctx = multiprocessing.get_context("spawn")
    for _ in range(args.repeat):
        for reuse in (False, True):
            with ProcessPoolExecutor(1, mp_context=ctx) as pool:
                run = (pool.submit(one_evaluation, args.weights, args.data_dir, reuse) if args.evaluate else
                       pool.submit(one_prune, args.arch, args.weights, args.data_dir, args.nsamples, args.recipe,
                                   reuse)).result()
            runs.append(run)
            print("reuse" if reuse else "glibc", f"{run['seconds']:.1f} s", f"{run['peak_rss_mb']:.0f} MB",
                  {k: round(v, 1) for k, v in run["timings"].items() if v}, flush=True)
    row = {"arch": args.arch, "nsamples": args.nsamples, "recipe": args.recipe, "evaluate": args.evaluate,
           "runs": runs} | \
        run_metadata(torch.device("cpu"))
    atomic_write_json(row, args.json)


if __name__ == "__main__":
    main()
