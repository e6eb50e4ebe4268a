"""Channel pruning against Torch-Pruning's one-shot importances, in one harness: the same checkpoint, the same
1024 calibration images (BatchNorm re-estimated on them for every method), the same multiply-add budget counted
by one function (Torch-Pruning's count_ops_and_params, on every pruned model), the same 5,000 held-out training
images to measure on (settings are chosen there; the test split is not read).

Torch-Pruning (pip install 'cnn-sparsegpt[baselines]') prunes with global ranking (any channel count) at the
channel ratio that meets the budget (bisection); its importances: L1 and L2 magnitude, BatchNorm scale and LAMP
(label-free), Taylor (|w·g|, the gradient of the cross-entropy over the calibration images with their labels) and
Hessian (OBD: w²·E[g²], the per-image squared gradients averaged; computed here, because Torch-Pruning 1.6's
accumulate_grad keeps only the last image's).
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
from cnn_sparsegpt.data.datasets import calibration_indices, calibration_set, holdout_split, load_splits
from cnn_sparsegpt.data.preprocess import resolve
from cnn_sparsegpt.models import model_entry
from cnn_sparsegpt.pruning.batchnorm import bn_modules, recalibrate
from cnn_sparsegpt.commands.pipeline import read_metadata
from cnn_sparsegpt.utils import atomic_write_json, run_metadata


def macs_of(model, example) -> float:
    import torch_pruning as tp

    return float(tp.utils.count_ops_and_params(model, example)[0])


def gradients(model, images, labels, per_image: bool) -> dict:
    """Per parameter: the mean cross-entropy gradient over the images, or (per_image) the mean squared gradient of
    each image's loss (the diagonal Fisher, OBD's Hessian estimate)."""
    model = copy.deepcopy(model).eval()
    out = {n: torch.zeros_like(p) for n, p in model.named_parameters()}
    chunks = zip(images.split(1), labels.split(1)) if per_image else zip(images.split(128), labels.split(128))
    for x, y in chunks:
        model.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y, reduction="sum").backward()
        for n, p in model.named_parameters():
            out[n] += p.grad.square() if per_image else p.grad
    return {n: g / len(images) for n, g in out.items()}


def torch_pruning_at(model, example, importance, keep: float, dense_macs: float, round_to: int | None = None,
                     grads: dict | None = None):
    """Torch-Pruning's pruner at the channel ratio whose result keeps `keep` of the multiply-adds (bisection; no
    round_to by default, so that it can meet the budget closely: its best case). grads: what each parameter's
    .grad holds for the gradient importances."""
    import torch_pruning as tp

    classifier = [m for m in model.modules() if isinstance(m, torch.nn.Linear)][-1:]
    lo, hi, best = 0.0, 0.95, None
    for _ in range(12):
        ratio = (lo + hi) / 2
        m = copy.deepcopy(model)
        for n, p in m.named_parameters():
            p.grad = grads[n].clone() if grads else None
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
    ap.add_argument("--importances", nargs="+", default=["l1", "l2", "bn_scale", "lamp", "taylor", "hessian"])
    ap.add_argument("--skip-ours", action="store_true", help="only the Torch-Pruning rows")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    import torch_pruning as tp

    importances = {"l1": lambda: tp.importance.MagnitudeImportance(p=1),
                   "l2": lambda: tp.importance.MagnitudeImportance(p=2),
                   "bn_scale": lambda: tp.importance.BNScaleImportance(),
                   "lamp": lambda: tp.importance.LAMPImportance(p=2),
                   "taylor": lambda: tp.importance.TaylorImportance(),
                   "hessian": lambda: tp.importance.HessianImportance()}
    entry = model_entry(args.model)
    state = load_state_dict(args.weights)
    pre = resolve("auto", args.model, entry.dataset, read_metadata(args.weights), model_dataset=entry.dataset)
    train, _ = load_splits(entry.dataset, args.data_dir, pre)
    train, held = holdout_split(train, args.holdout)
    chosen = calibration_indices(train, args.nsamples, 0)
    calib = calibration_set(train, args.nsamples, indices=chosen)
    labels = train.labels[chosen]
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
    grads = {}
    if "taylor" in args.importances:
        grads["taylor"] = gradients(dense, calib, labels, per_image=False)
    if "hessian" in args.importances:
        grads["hessian"] = gradients(dense, calib, labels, per_image=True)
    for keep in args.keep_macs:
        if args.skip_ours:
            for name in args.importances:
                _torch_pruning_row(rows, name, dense, example, importances, keep, dense_macs, grads, calib, held)
                atomic_write_json(result, out)
            continue
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
            _torch_pruning_row(rows, name, dense, example, importances, keep, dense_macs, grads, calib, held)
            atomic_write_json(result, out)


def _torch_pruning_row(rows, name, dense, example, importances, keep, dense_macs, grads, calib, held):
    t0 = time.perf_counter()
    m, kept, ratio = torch_pruning_at(dense, example, importances[name](), keep, dense_macs, grads=grads.get(name))
    recalibrate(bn_modules(m), m, calib.split(128))
    rows.append({"method": f"torch-pruning {name}", "keep_macs": keep, "macs_kept": kept, "channel_ratio": ratio,
                 "seconds": time.perf_counter() - t0, "holdout_acc": evaluate(m, held, "cpu", 256, False)})
    print(rows[-1], flush=True)


if __name__ == "__main__":
    main()
