"""What a change to the network costs where it matters: KL(dense ‖ network with the change) at its output, on
calibration images, one change at a time. allocation='dp' with dp_measure='kl' measures each layer pruned alone
(allocation.py), channel_costs='kl' each group's first k channels removed (channel_costs.py).

The scores compared are the model's output tensor, or its first one where it returns several (a dict's first value,
as torchvision's segmentation models' 'out'; a tuple's or list's first item), softmax over dim 1 (the classes) at
each image and position: a classifier's (N, classes) logits, a segmentation model's (N, classes, H, W) per pixel.
A model whose outputs are values, not class scores (outputs='values': an image, a depth map, features), is compared
by the relative squared error of all its floating output tensors instead, ‖y − y_dense‖² / ‖y_dense‖²."""
from __future__ import annotations

import warnings

import torch
from torch import nn

from ..utils import output_tensors
from .graph import GraphStop, each_change, partial_trace, trace


@torch.no_grad()  # (the whole runs' too: a generator's body runs where it is read)
def output_kls(model: nn.Module, x: torch.Tensor, changes: dict, change, chunk: int | None = None,
               bar=None, outputs: str = "scores") -> dict:
    """{key: KL(dense ‖ model with change(key) applied)} on the images x, a float64 scalar per key (a mean over
    images and positions); outputs='values': the relative squared error instead (above). changes: {key: the names
    of the modules the change touches}; change(key): a context manager that applies it (once, for every chunk). On
    the traced graph a change runs from the first node that reads one of its modules, the unchanged prefix computed
    once; a model fx cannot trace in full, but for parts it calls whole, likewise; one it cannot trace runs whole for
    each change. chunk: images per forward pass (a CPU's forward slows down with batches of large activations, see
    prune.cpu_batches); the unchanged pass holds the values of every chunk at once, so a caller with many large
    images calls this chunk by chunk instead (the KL is a mean over images). bar: a progress bar, advanced once per
    change."""
    read, measure = OUTPUTS[outputs]
    xs = list(x.split(chunk)) if chunk and chunk < len(x) else [x]
    try:
        gm = trace(model)
    except Exception:  # traced but for the parts fx cannot trace (called whole), else the whole network each time
        gm = partial_trace(model, xs[0][:2])
    # the unchanged outputs first (one more pass), so that each change is measured as it comes and dropped: a
    # detector's or segmenter's outputs are megabytes per image, hundreds of changes' would not fit in memory
    dense = read([(model if gm is None else gm)(xi) for xi in xs])
    if gm is not None:
        try:
            return _measured(each_change(gm, xs, changes, change), dense, read, measure, bar)
        except GraphStop:  # a node the runner cannot call: start again with whole runs
            pass
    return _measured(_whole_runs(model, xs, changes, change), dense, read, measure, bar)


def _measured(runs, dense: torch.Tensor, read, measure, bar) -> dict:
    out = {}
    for key, ys in runs:
        if key is not None:  # (None: the unchanged outputs, measured before)
            out[key] = measure(dense, read(ys))
            if bar is not None:
                bar.update()
    return out


def scores(out, batch: int | None = None) -> torch.Tensor | None:
    """The output tensor whose scores are compared (see above), None if the output holds no floating tensor of at
    least two dimensions. batch: the images of the call, where known: only a tensor with as many rows counts (a
    torchvision detector's per-image boxes after NMS do not)."""
    return next(iter(_batched(out, batch)), None)


def values(out, batch: int | None = None) -> torch.Tensor | None:
    """Every floating output tensor, flattened per image and side by side (N, ·); None if there is none. batch: as
    in `scores`."""
    ts = [t.flatten(1) for t in _batched(out, batch)]
    return torch.cat(ts, 1) if ts else None


def _batched(out, batch: int | None) -> list[torch.Tensor]:
    return [t for t in output_tensors(out)
            if t.is_floating_point() and t.ndim >= 2 and (batch is None or t.shape[0] == batch)]


def output_measure(model: nn.Module, x: torch.Tensor, measure: str, instead: str,
                   outputs: str = "scores") -> str | None:
    """Which comparison `measure` (a recipe setting that reads the network's output) makes on this model: `outputs`
    as asked; values where asked for scores but they have one channel (a softmax over one class is always 1, so
    every KL would be 0: a grayscale image, a binary mask's single logit), with a warning; None, after a warning that
    `measure` uses `instead`, where the output holds nothing to compare."""
    x = x[:2]
    with torch.no_grad():
        out = model(x)
    s = scores(out, len(x)) if outputs == "scores" else None
    if s is not None and s.shape[1] == 1:
        warnings.warn(f"{measure}: the model's output scores have one channel, whose softmax is always 1: their "
                      "relative squared error is compared instead (outputs='values')", RuntimeWarning)
        return "values"
    if s is not None or (outputs == "values" and values(out, len(x)) is not None):
        return outputs
    warnings.warn(f"{measure} compares the model's output {outputs}, and this model's output holds no floating "
                  f"tensor of at least two dimensions with a row per image (a detector's boxes after NMS have "
                  f"none): {instead}", RuntimeWarning)
    return None


def _log_probs(ys: list) -> torch.Tensor:
    """One run's log-probabilities (images, positions, classes), the classes on dim 1 of the scores."""
    y = torch.cat([scores(part) for part in ys]).double()
    return torch.log_softmax(y.reshape(*y.shape[:2], -1).transpose(1, 2), -1)


def _values(ys: list) -> torch.Tensor:
    """One run's output values (images, ·) in float64."""
    return torch.cat([values(part) for part in ys]).double()


def _kl(dense: torch.Tensor, logp: torch.Tensor) -> torch.Tensor:
    return (dense.exp() * (dense - logp)).sum(-1).mean().clamp_min(0)


def relative_squared_error(reference: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """‖y − reference‖² / ‖reference‖²."""
    return (y - reference).square().sum() / reference.square().sum().clamp_min(torch.finfo(reference.dtype).tiny)


# what a model's outputs are -> (read a run's outputs, their distance from the dense run's)
OUTPUTS = {"scores": (_log_probs, _kl), "values": (_values, relative_squared_error)}


def _whole_runs(model: nn.Module, xs: list, changes: dict, change):
    for key in changes:
        with change(key):
            yield key, [model(x) for x in xs]
