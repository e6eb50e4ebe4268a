"""Where ResNet-20's 2:4 loss comes from (issue 21's open goal), the default recipe, 1024 calibration images:

1. the dense network with its BatchNorm statistics re-estimated on the calibration images alone (what the prune's
   re-estimation costs by itself), on the held-out images and on the test split, per calibration seed;
2. after each seed's prune, BatchNorm variances put back towards the dense model's (kappa = 1: as re-estimated,
   0: the dense model's, 0.5: their geometric mean; the re-estimated means kept), on the held-out images;
3. one seed's sensitivity: the held-out drop with one pruned layer at a time, one stage (layer1/2/3) at a time,
   and all of them (the default prune).

    python benchmarks/nm_loss_diagnostics.py --data-dir ../shared/data \\
        --weights ../shared/checkpoints/resnet20_cifar10.pt --json experiments/nm_loss_diagnostics.json
"""
from __future__ import annotations

import argparse
import copy
import re

import torch

from cnn_sparsegpt import calibration_set, evaluate, prune_model
from cnn_sparsegpt.commands.pipeline import PruneOptions, prepare
from cnn_sparsegpt.data.datasets import holdout_split
from cnn_sparsegpt.pruning.batchnorm import bn_modules, recalibrate
from cnn_sparsegpt.utils import atomic_write_json, run_metadata


def load(weights, data_dir, holdout):
    """The model, the training images left for calibration, the held-out ones and the test split: the images
    decoded once, split as `prune --holdout` splits them."""
    opts = PruneOptions.build(dict(model="resnet20_cifar", weights=weights, data_dir=data_dir, nsamples=1024,
                                   sparsity=0.5))
    model, train, test = prepare(opts, torch.device("cpu"))[:3]
    return (model, *holdout_split(train, holdout), test)


def top1(model, data) -> float:
    return 100 * evaluate(model, data, "cpu", 500, progress=False)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--weights", default="../shared/checkpoints/resnet20_cifar10.pt")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--holdout", type=int, default=5000)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--json", default="experiments/nm_loss_diagnostics.json")
    args = p.parse_args()
    model, train, held, test = load(args.weights, args.data_dir, args.holdout)
    out = {"meta": run_metadata(torch.device("cpu")) | {"holdout": args.holdout, "pattern": "2:4"},
           "dense": {"holdout": top1(model, held), "test": top1(model, test)}, "seeds": {}}
    dense_modules = dict(model.named_modules())
    for seed in args.seeds:
        calib = calibration_set(train, 1024, seed)
        m = copy.deepcopy(model)
        recalibrate(bn_modules(m), m, calib.split(128))
        row = {"dense_bn_reestimated": {"holdout": top1(m, held), "test": top1(m, test)}}
        m = copy.deepcopy(model)
        prune_model(m, calib, nm="2:4", progress=False)
        kept = set(bn_modules(m))
        bns = {n: b for n, b in m.named_modules() if b in kept}
        var = {n: b.running_var.clone() for n, b in bns.items()}
        row["variance_kappa"] = {}
        for kappa in (1.0, 0.5, 0.0):
            for n, b in bns.items():
                b.running_var.copy_(dense_modules[n].running_var ** (1 - kappa) * var[n] ** kappa)
            row["variance_kappa"][str(kappa)] = top1(m, held)
        out["seeds"][str(seed)] = row
        print(seed, row, flush=True)
    calib = calibration_set(train, 1024, args.seeds[0])
    convs = [n for n, x in model.named_modules() if isinstance(x, torch.nn.Conv2d) and n != "conv1"]
    subsets = {n: [n] for n in convs} | {s: [n for n in convs if n.startswith(s + ".")]
                                         for s in ("layer1", "layer2", "layer3")} | {"all": convs}
    out["sensitivity_seed"], out["sensitivity_drop"] = args.seeds[0], {}
    for label, pruned in subsets.items():
        m = copy.deepcopy(model)
        ignore = tuple(re.escape(n) + "$" for n in convs if n not in pruned)
        prune_model(m, calib, nm="2:4", ignore=ignore, progress=False)
        out["sensitivity_drop"][label] = out["dense"]["holdout"] - top1(m, held)
        print(label, f"{out['sensitivity_drop'][label]:.2f}", flush=True)
    atomic_write_json(out, args.json)
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
