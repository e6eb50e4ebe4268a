"""How much a prune's result depends on the number of CPU threads (float32 kernels round by thread count).

Prunes the MNIST CNN (random weights, random inputs: the effect is the solver's, not the data's) twice in one
process, with 1 and with 2 threads, and writes each pruned layer's mask agreement and the relative difference
of its weights. README ("Several processes") quotes it.

    python benchmarks/thread_count_effect.py --out experiments/thread_count_effect.json
"""
from __future__ import annotations

import argparse

import torch

from cnn_sparsegpt import PUBLISHED, prune_model
from cnn_sparsegpt.models import create_model
from cnn_sparsegpt.utils import atomic_write_json, run_metadata


def prune_once(threads: int, nsamples: int, recipe: dict) -> dict:
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = create_model("mnist_cnn", num_classes=10).eval()
    x = torch.randn(nsamples, 1, 28, 28, generator=torch.Generator().manual_seed(0)).clamp(-0.5, 3)
    rep = prune_model(model, x, PUBLISHED, method="sparsegpt", nm="2:4", progress=False, **recipe)
    return {"state": model.state_dict(), "masks": rep.masks}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--nsamples", type=int, default=256)
    ap.add_argument("--out", default="experiments/thread_count_effect.json")
    args = ap.parse_args()
    rows = []
    for name, recipe in (("published", {"dense_target": False, "refine": "none"}),
                         ("recommended", {"dense_target": True, "refine": "cg"})):
        a, b = prune_once(1, args.nsamples, recipe), prune_once(2, args.nsamples, recipe)
        for key, mask in a["masks"].items():
            wa, wb = a["state"][key], b["state"][key]
            agreement = (mask == b["masks"][key]).float().mean().item()
            rows.append({"recipe": name, "layer": key, "mask_agreement": agreement,
                         "weight_rel_diff": ((wa - wb).norm() / wa.norm()).item()})
            print(rows[-1])
    meta = run_metadata(torch.device("cpu"))
    atomic_write_json({"nsamples": args.nsamples, "thread_counts": [1, 2], "rows": rows} | meta, args.out)


if __name__ == "__main__":
    main()
