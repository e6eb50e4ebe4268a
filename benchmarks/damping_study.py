"""Does the layer solve overfit the calibration set where T/d is small? Per layer of the shared ResNet-18
(dense network, inputs of 1024 calibration images and of 512 held-out training images), SparseGPT at 90%
with and without `--refine cg`, for several dampings: the relative layer error on the calibration inputs
and on the held-out inputs, and T/d (samples per weight of a row).

    python benchmarks/damping_study.py --data-dir ../shared/data --weights ../shared/checkpoints/resnet18_cifar10.pt
"""
from __future__ import annotations

import argparse
import json

import torch

from cnn_sparsegpt.commands.options import PruneOptions
from cnn_sparsegpt.data.datasets import calibration_set
from cnn_sparsegpt.pruning.layer import LayerPruner
from cnn_sparsegpt.kernels.masks import Pattern
from cnn_sparsegpt.commands.pipeline import prepare
from cnn_sparsegpt.kernels.refine import refine
from cnn_sparsegpt.kernels.solver import relative_error, sparsegpt_solve
from cnn_sparsegpt.utils import git_commit

LAYERS = ["layer1.0.conv2", "layer2.1.conv1", "layer3.0.conv2", "layer4.0.conv1", "layer4.1.conv2"]


def hessians(model, images, names):
    mods = dict(model.named_modules())
    ps = {n: LayerPruner(mods[n], n) for n in names}
    hooks = [mods[n].register_forward_pre_hook(lambda m, i, n=n: ps[n].add_batch(i[0])) for n in names]
    with torch.no_grad():
        for x in images.split(128):
            model(x)
    for h in hooks:
        h.remove()
    return {n: (ps[n].weight_matrix()[0], ps[n].H, ps[n].nsamples) for n in names}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-dir", default="../shared/data")
    p.add_argument("--weights", default="../shared/checkpoints/resnet18_cifar10.pt")
    p.add_argument("--json", default="experiments/damping_study.json")
    args = p.parse_args()
    opts = PruneOptions(model="resnet18_cifar", weights=args.weights, data_dir=args.data_dir, holdout=5000)
    model, train, held = prepare(opts, torch.device("cpu"))[:3]
    cal = hessians(model, calibration_set(train, 1024, 0), LAYERS)
    test = hessians(model, calibration_set(held, 512, 1), LAYERS)
    pattern, rows = Pattern(sparsity=0.9), []
    for n in LAYERS:
        W, H, T = cal[n]
        Hh = test[n][1]
        for percdamp in (0.01, 0.1, 1.0):
            Q, pruned, _ = sparsegpt_solve(W, H, pattern, percdamp)
            R, _ = refine("cg", W, Q, pruned, H, pattern, percdamp)
            row = {"layer": n, "T_over_d": T / W.shape[-1], "percdamp": percdamp}
            for tag, X in (("sparsegpt", Q), ("cg", R)):
                row[f"{tag}_calibration"] = float(relative_error(W, X, H))
                row[f"{tag}_heldout"] = float(relative_error(W, X, Hh))
            rows.append(row)
            print({k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()}, flush=True)
    with open(args.json, "w") as f:
        json.dump({"git_commit": git_commit(), "sparsity": 0.9, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
