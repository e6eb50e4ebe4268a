"""Resuming an interrupted prune (`prune_model(..., resume=PATH)`; the command line's OUT/resume.pt).

After a layer, at most every SAVE_EVERY seconds, the model's state, the finished layers' results and what the
executor has done (BatchNorms re-estimated) are written atomically. A prune started again with the same model,
calibration images and configuration (a fingerprint of all three) loads them, runs the finished layers as ordinary
modules and goes on from the next one, ending as the uninterrupted prune would; with anything else it starts
afresh. The file goes when the prune ends."""
from __future__ import annotations

import hashlib
import json
import time
import warnings
from pathlib import Path

import torch
from torch import nn

from .layer import LayerResult
from ..utils import atomic_save, load_tensors, tensor_digest

SAVE_EVERY = 30.0  # seconds between saves: a prune shorter than this never writes one, a longer loses at most this


def fingerprint(model: nn.Module, batches: list[torch.Tensor], config) -> str:
    """What a saved state must have been made from: the dense model's tensors, the calibration images and the
    resolved configuration."""
    h = hashlib.sha256(json.dumps(config.as_dict(), sort_keys=True, default=str).encode())
    state = model.state_dict()
    h.update(" ".join(state).encode())
    tensor_digest(h, state.values())
    tensor_digest(h, batches)
    return h.hexdigest()


class PruneCheckpoints:
    def __init__(self, path: str | Path, key: str):
        self.path, self.key = Path(path), key
        self.last = time.perf_counter()

    def load(self) -> dict | None:
        """The saved state of this very prune, or None (no file, or one of another prune: a warning)."""
        if not self.path.is_file():
            return None
        saved = load_tensors(self.path, "prune state")
        if not isinstance(saved, dict) or saved.get("key") != self.key:
            warnings.warn(f"{self.path} was written by a prune of another model, images or configuration: not "
                          "resumed, started afresh", RuntimeWarning)
            return None
        return saved

    def maybe_save(self, model: nn.Module, results: dict[str, LayerResult], done: set, timings: dict) -> None:
        if time.perf_counter() - self.last < SAVE_EVERY:
            return
        atomic_save({"key": self.key, "model": model.state_dict(), "results": [vars(r) for r in results.values()],
                     "done": sorted(done), "timings": timings}, self.path)
        self.last = time.perf_counter()

    def finish(self) -> None:
        self.path.unlink(missing_ok=True)


def restored_results(saved: dict) -> dict[str, LayerResult]:
    return {r["name"]: LayerResult(**r) for r in saved["results"]}
