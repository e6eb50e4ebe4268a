"""What the ResNet-20 held-out studies share (relu_gated_target.py, swap_restarts_holdout.py, ...): their common
arguments, and the shared checkpoint with 5,000 training images held out, as `prune --holdout 5000` splits them."""
from __future__ import annotations

import argparse
import copy
import time

import torch

from cnn_sparsegpt import evaluate, prune_model
from cnn_sparsegpt.commands.options import PruneOptions
from cnn_sparsegpt.commands.pipeline import prepare


def study_parser(doc: str, seeds: str) -> argparse.ArgumentParser:
    """A parser with --weights, --data-dir, --seeds (default `seeds`) and --json; the study adds its own."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--weights", default="../shared/checkpoints/resnet20_cifar10.pt")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--seeds", default=seeds, help="calibration seeds, comma-separated")
    p.add_argument("--json", required=True, help="results file")
    return p


def held_out_resnet20(args: argparse.Namespace) -> tuple:
    """(the dense model, the training images left for calibration, the 5,000 held-out ones), on the CPU."""
    opts = PruneOptions.build(model="resnet20_cifar", weights=args.weights, data_dir=args.data_dir, holdout=5000)
    dense, train, held_out = prepare(opts, torch.device("cpu"))[:3]
    return dense, train, held_out


def pattern_arguments(pattern: str) -> dict:
    """prune_model's keyword for a pattern given as text: '2:4' -> nm, '0.7' -> sparsity."""
    return {"nm": pattern} if ":" in pattern else {"sparsity": float(pattern)}


def pruned_top1(dense: torch.nn.Module, images: torch.Tensor, held_out, prune: dict) -> tuple[float, float]:
    """(held-out top-1, prune seconds) of a copy of `dense` pruned on `images` with the default recipe and the
    keywords `prune` (pattern_arguments); the dense model stays as it is."""
    model = copy.deepcopy(dense)
    t0 = time.perf_counter()
    prune_model(model, images, progress=False, **prune)
    seconds = time.perf_counter() - t0
    return evaluate(model, held_out, "cpu", 500, False), seconds
