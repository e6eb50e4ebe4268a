"""Channel pruning against Torch-Pruning's one-shot importances, in one harness: the same checkpoint, the same
1024 calibration images (BatchNorm re-estimated on them for every method), the same multiply-add budget counted
by one function (Torch-Pruning's count_ops_and_params, on every pruned model), the same 5,000 held-out training
images to measure on (settings are chosen there; the test split is not read).

Torch-Pruning (pip install 'cnn-sparsegpt[baselines]') prunes with global ranking (any channel count) at the
channel ratio that meets the budget (bisection); its label-free importances are run: L1 and L2 magnitude,
BatchNorm scale and LAMP.
Ours: `prune_model(structure="channels", keep_macs=...)` with the recommended recipe.

    python benchmarks/channels_vs_torch_pruning.py --model resnet20_cifar \\
        --weights ../shared/checkpoints/resnet20_cifar10.pt --keep-macs 0.7 0.5 --out experiments/channels/resnet20.json
"""
from __future__ import annotations

import argparse
import copy
import time
from pathlib import Path

import torch

from cnn_sparsegpt import create_model, evaluate, load_state_dict, prune_model
from cnn_sparsegpt.data.datasets import calibration_set, holdout_split, load_splits
from cnn_sparsegpt.data.preprocess import resolve
from cnn_sparsegpt.models import model_entry
from cnn_sparsegpt.pruning.batchnorm import bn_modules, recalibrate
from cnn_sparsegpt.commands.pipeline import read_metadata
from cnn_sparsegpt.utils import atomic_write_json, run_metadata


def macs_of(model, example) -> float:
    import torch_pruning as tp

    return float(tp.utils.count_ops_and_params(model, example)[0])


def torch_pruning_at(model, example, importance, keep: float, dense_macs: float, round_to: int | None = None):
    """Torch-Pruning's pruner at the channel ratio whose result keeps `keep` of the multiply-adds (bisection; no
    round_to by default, so that it can meet the budget closely: its best case)."""
    import torch_pruning as tp

    classifier = [m for m in model.modules() if isinstance(m, torch.nn.Linear)][-1:]
    lo, hi, best = 0.0, 0.95, None
    for _ in range(12):
        ratio = (lo + hi) / 2
        m = copy.deepcopy(model)
        pruner = tp.pruner.MetaPruner(m, example, importance=importance, global_pruning=True, pruning_ratio=ratio,
                                      ignored_layers=[dict(m.named_modules())[n] for n, mm in model.named_modules()
                                                      if mm in classifier], round_to=round_to)
        pruner.step()
        kept = macs_of(m, example) / dense_macs
        if kept > keep:
            lo = ratio
        else:
            hi, best = ratio, (m, kept, ratio)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="resnet20_cifar")
    ap.add_argument("--weights", required=True)
    ap.add_argument("--data-dir", default="../shared/data")
    ap.add_argument("--keep-macs", type=float, nargs="+", default=[0.7, 0.5, 0.35])
    ap.add_argument("--nsamples", type=int, default=1024)
    ap.add_argument("--holdout", type=int, default=5000)
    ap.add_argument("--importances", nargs="+", default=["l1", "l2", "bn_scale", "lamp"])
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    import torch_pruning as tp

    importances = {"l1": lambda: tp.importance.MagnitudeImportance(p=1),
                   "l2": lambda: tp.importance.MagnitudeImportance(p=2),
                   "bn_scale": lambda: tp.importance.BNScaleImportance(),
                   "lamp": lambda: tp.importance.LAMPImportance(p=2)}
    entry = model_entry(args.model)
    state = load_state_dict(args.weights)
    pre = resolve("auto", args.model, entry.dataset, read_metadata(args.weights), model_dataset=entry.dataset)
    train, _ = load_splits(entry.dataset, args.data_dir, pre)
    train, held = holdout_split(train, args.holdout)
    calib = calibration_set(train, args.nsamples, 0)
    dense = create_model(args.model, num_classes=10)
    dense.load_state_dict(state)
    dense.eval()
    example = calib[:1]
    dense_macs = macs_of(dense, example)
    out = Path(args.out)
    rows = []
    result = {"model": args.model, "weights": args.weights, "nsamples": args.nsamples, "holdout": args.holdout,
              "dense_macs": dense_macs, "dense_holdout_acc": evaluate(dense, held, "cpu", 256, False),
              "rows": rows} | run_metadata(torch.device("cpu"))
    for keep in args.keep_macs:
        m = copy.deepcopy(dense)
        t0 = time.perf_counter()
        prune_model(m, calib, structure="channels", keep_macs=keep, progress=False)
        seconds = time.perf_counter() - t0
        rows.append({"method": "cnn-sparsegpt channels (recommended)", "keep_macs": keep,
                     "macs_kept": macs_of(m, example) / dense_macs, "seconds": seconds,
                     "holdout_acc": evaluate(m, held, "cpu", 256, False)})
        print(rows[-1], flush=True)
        atomic_write_json(result, out)
        for name in args.importances:
            t0 = time.perf_counter()
            m, kept, ratio = torch_pruning_at(dense, example, importances[name](), keep, dense_macs)
            recalibrate(bn_modules(m), m, calib.split(128))
            rows.append({"method": f"torch-pruning {name}", "keep_macs": keep, "macs_kept": kept,
                         "channel_ratio": ratio, "seconds": time.perf_counter() - t0,
                         "holdout_acc": evaluate(m, held, "cpu", 256, False)})
            print(rows[-1], flush=True)
            atomic_write_json(result, out)


if __name__ == "__main__":
    main()
