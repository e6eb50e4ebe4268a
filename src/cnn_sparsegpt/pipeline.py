"""What `cnn-sparsegpt prune` does: load, calibrate, evaluate, prune, evaluate, write results."""
from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import torch
from torch import nn

from .config import PruneOptions
from .data import calibration_set, load_dataset
from .masks import Pattern
from .models import check_model_name, create_model, model_entry
from .prune import prune_model
from .solver import METHODS
from .train import evaluate
from .utils import (
    UserError,
    atomic_save,
    atomic_write_json,
    check_finite,
    ensure_writable,
    load_state_dict,
    resolve_device,
    run_metadata,
)


def load_weights(model: nn.Module, path: str | Path, model_name: str, state: dict | None = None) -> dict:
    """Load a checkpoint strictly; on mismatch say which keys or shapes differ. Returns its JSON metadata."""
    if state is None:
        state = load_state_dict(path)
        check_finite(state, f"checkpoint {path}")
    own = model.state_dict()
    missing = sorted(own.keys() - state.keys())
    unexpected = sorted(state.keys() - own.keys())
    shapes = [f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in own.keys() & state.keys()
              if own[k].shape != state[k].shape]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing keys ({', '.join(missing[:3])}{', ...' if len(missing) > 3 else ''})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected keys ({', '.join(unexpected[:3])}"
                         f"{', ...' if len(unexpected) > 3 else ''})")
        if shapes:
            parts.append(f"shapes differ (checkpoint vs model): {'; '.join(sorted(shapes)[:3])}")
        raise UserError(f"checkpoint {path} does not fit model '{model_name}': {'; '.join(parts)}. "
                        "Is it a checkpoint of another architecture or number of classes?")
    model.load_state_dict(state)
    meta_path = Path(f"{path}.json")
    if meta_path.is_file():
        try:
            return json.loads(meta_path.read_text())
        except (json.JSONDecodeError, OSError):
            return {}
    return {}


def _normalization(meta: dict) -> tuple | None:
    norm = meta.get("normalization", meta)
    if isinstance(norm, dict) and "mean" in norm and "std" in norm:
        return tuple(norm["mean"]), tuple(norm["std"])
    return None


def prepare(opts: PruneOptions, device: torch.device):
    """Model (with weights) and the train and test sets, normalized as the checkpoint expects."""
    check_model_name(opts.model)  # fail fast on an unknown model, before loading data
    entry = model_entry(opts.model)
    dataset = opts.dataset or (entry.dataset if entry else None)
    if dataset is None:
        raise UserError(f"--dataset is required for model '{opts.model}'")
    state = None
    if opts.weights:  # a bad checkpoint is reported before minutes of data loading
        state = load_state_dict(opts.weights)
        check_finite(state, f"checkpoint {opts.weights}")
    train, test = load_dataset(dataset, True, opts.data_dir), load_dataset(dataset, False, opts.data_dir)
    model = create_model(opts.model, num_classes=max(train.num_classes, 2))
    meta = {}
    if opts.weights:
        meta = load_weights(model, opts.weights, opts.model, state)
    else:
        import warnings

        warnings.warn("no --weights given: pruning a randomly initialized model", RuntimeWarning)
    norm = _normalization(meta)
    if norm:
        train = dataclasses.replace(train, mean=norm[0], std=norm[1])
        test = dataclasses.replace(test, mean=norm[0], std=norm[1])
    if opts.holdout:  # a fixed split of the training set, disjoint from the calibration images
        if not 0 < opts.holdout < len(train):
            raise UserError(f"--holdout must be between 1 and {len(train) - 1}, got {opts.holdout}")
        perm = torch.randperm(len(train), generator=torch.Generator().manual_seed(12345))
        held, rest = perm[-opts.holdout:], perm[:-opts.holdout]
        test = dataclasses.replace(train, images=train.images[held], labels=train.labels[held],
                                   source=f"{train.source}; {opts.holdout} held-out training images")
        train = dataclasses.replace(train, images=train.images[rest], labels=train.labels[rest])
    if opts.eval_samples:  # a fixed random subset: files are often sorted by class
        idx = torch.randperm(len(test), generator=torch.Generator().manual_seed(0))[:opts.eval_samples]
        test = dataclasses.replace(test, images=test.images[idx], labels=test.labels[idx])
    return model.to(device).eval(), train, test, dataset


def run_prune(opts: PruneOptions, progress: bool = True, dense_acc: float | None = None,
              write: bool = True) -> dict:
    """Run one prune and (when `write`) save model.pt, masks.pt and report.json under opts.out."""
    if opts.method not in METHODS:
        raise UserError(f"unknown method '{opts.method}'; choose from {', '.join(METHODS)}")
    pattern = Pattern.parse(opts.sparsity, opts.nm)
    device = resolve_device(opts.device)
    for name, value, low in (("nsamples", opts.nsamples, 1), ("blocksize", opts.blocksize, 1),
                             ("batch_size", opts.batch_size, 1), ("eval_samples", opts.eval_samples, 0)):
        if value < low:
            raise UserError(f"--{name.replace('_', '-')} must be at least {low}, got {value}")
    if opts.percdamp < 0:
        raise UserError(f"--percdamp must be >= 0, got {opts.percdamp}")
    out = ensure_writable(opts.out) if write else None
    model, train, test, dataset = prepare(opts, device)
    calib = calibration_set(train, opts.nsamples, opts.seed)
    eval_seconds = 0.0
    if opts.evaluate and dense_acc is None:
        t0 = time.perf_counter()
        dense_acc = evaluate(model, test, device, opts.batch_size, progress, "dense accuracy")
        eval_seconds += time.perf_counter() - t0
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    report = prune_model(model, calib, opts.method, pattern, percdamp=opts.percdamp, blocksize=opts.blocksize,
                         ignore=opts.ignore, skip_first_last=not opts.prune_all,
                         recalibrate_bn=opts.bn_recalibration, batch_size=opts.batch_size, progress=progress,
                         low_memory=opts.low_memory)
    pruned_acc = None
    if opts.evaluate:
        t0 = time.perf_counter()
        pruned_acc = evaluate(model, test, device, opts.batch_size, progress, "pruned accuracy")
        eval_seconds += time.perf_counter() - t0
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    check_finite(state, "the pruned model")  # never write a checkpoint with NaN
    result = {
        "model": opts.model, "weights": opts.weights, "dataset": dataset, "data_source": train.source,
        "method": opts.method, "pattern": str(pattern), "target_sparsity": pattern.target,
        "dense_acc": dense_acc, "pruned_acc": pruned_acc, "eval_samples": len(test),
        "eval_seconds": eval_seconds, "eval_split": f"holdout {opts.holdout}" if opts.holdout else "test",
        "percdamp": opts.percdamp, "blocksize": opts.blocksize, "seed": opts.seed,
        "bn_recalibration": opts.bn_recalibration, "low_memory": opts.low_memory, "prune_all": opts.prune_all,
        "ignore": list(opts.ignore),
        "peak_gpu_memory": torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None,
    } | report.as_dict() | run_metadata(device)
    if write:
        atomic_save(state, out / "model.pt")
        atomic_save(report.masks, out / "masks.pt")
        atomic_write_json(result, out / "report.json")
    return result


def format_report(r: dict) -> str:
    """A short table: per-layer results, then the totals."""
    lines = [f"{'layer':<28} {'shape':<18} {'sparsity':>8} {'rel.err':>9} {'sec':>6}  note"]
    for layer in r["layers"]:
        shape = "x".join(map(str, layer["shape"]))
        err = f"{layer['error']:.2e}" if layer["error"] is not None else "-"
        note = f"skipped: {layer['reason']}" if layer["skipped"] else layer["reason"]
        lines.append(f"{layer['name']:<28} {shape:<18} {layer['sparsity']:>8.3f} {err:>9} "
                     f"{layer['seconds']:>6.2f}  {note}")
    acc = ""
    if r.get("dense_acc") is not None and r.get("pruned_acc") is not None:
        acc = (f"  top-1 dense {100 * r['dense_acc']:.2f}% -> pruned {100 * r['pruned_acc']:.2f}% "
               f"({100 * (r['pruned_acc'] - r['dense_acc']):+.2f}) on {r['eval_samples']} test images\n")
    passes = ""
    if r.get("peak_stored_mb") is not None:
        mode = " (--low-memory)" if r.get("low_memory") else ""
        passes = (f"  {r['forward_passes']:.3g} forward pass(es) over the calibration set, at most "
                  f"{r['peak_stored_mb']:.0f} MB of its activations held{mode}\n")
    lines.append(f"\n{r['model']} {r['method']} {r['pattern']}: sparsity {r['sparsity']:.3f} of the pruned layers, "
                 f"{r['total_sparsity']:.3f} of all weights; {r['seconds']:.1f} s pruning, "
                 f"{r['nsamples']} calibration images\n{acc}{passes}  data: {r['data_source']}")
    return "\n".join(lines)
