"""What removing a group's channels costs, as the allocation compares it across groups.

- `layer`: each group's block-OBS cost curve as it is (structured._cost_curve): the consumers' added output
  error, each relative to its dense output energy. Cheap, but a unit of relative error in an early 16-channel
  layer and in the classifier's input are not worth the same at the network's output.
- `kl`: the same removal order, with the cost measured where it matters: KL(dense ‖ network with only that group's
  first k units removed, its consumers re-fitted by OBS) on the first calibration images (256, fewer for networks
  above ResNet-18's multiply-adds), at up to LEVELS points of each curve; between measured points the layer curve's
  shape is followed (SPDY's and OBC's database idea, with the output error instead of a proxy). Per measured point
  the network runs from the group's first consumer on (the dense prefix once, output_kl.py).
"""
from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn
from tqdm.auto import tqdm

from ..kernels.block_obs import refit_without
from .channel_budget import step_size
from .output_kl import output_kls, output_measure

CHANNEL_COSTS = ("layer", "kl")
LEVELS = 8  # measured points per group; more buys little (the curve between them follows the layer costs)
IMAGES = 256  # calibration images the KL is measured on (the first ones), at most
POINT_MACS = 1.5e11  # multiply-adds of a whole pass per measured point: 256 images of ResNet-18 at 32x32 (its 93
# points ~85 s here, each run from its group's first consumer on); a bigger network is measured on fewer images
# (ResNet-50 at 224x224: 36), at least MIN_IMAGES
MIN_IMAGES = 32


def unit_blocks(pruner, unit_columns: list[list[int]]) -> torch.Tensor:
    """Each unit's columns in the consumer's solver order: a conv's input channel c owns c at every tap
    ((kh, kw, in) order); a Linear's columns are its own."""
    layer = pruner.layer
    if isinstance(layer, nn.Conv2d):
        kk = layer.kernel_size[0] * layer.kernel_size[1]
        cin = layer.weight.shape[1]  # a grouped conv: one group's inputs (each group's columns in its own H)
        return torch.tensor([[t * cin + c for t in range(kk) for c in cols] for cols in unit_columns])
    return torch.tensor(unit_columns)


# Consumers wider than this (inputs) are costed without OBS updates: a block's cost is its own output energy
# tr(W_B H_BB W_Bᵀ) (no d×d inverse, no rank-b updates), as for a flattened feature map read by a wide Linear
# (the MNIST CNN's 12544 inputs: a float64 inverse of 1.2 GB and 196-column updates per step). Their kept weights
# are still re-fitted exactly at the end.
MAX_OBS_COLUMNS = 4608


def consumer_weight(pruner, blocks: torch.Tensor, percdamp: float, refit: bool = True) -> torch.Tensor:
    """The consumer's weight, in its layer's shape, with the columns `blocks` (solver order) removed and the rest
    re-fitted to its dense output (least squares on its dense Hessian), or only zeroed (refit=False)."""
    Wg, perm = pruner.weight_matrix()  # (groups, rows, d): a grouped conv loses the same columns in each group
    W = Wg.double()
    if refit:
        b = blocks.to(W.device)
        W = torch.stack([refit_without(w, h, b, percdamp) for w, h in zip(W, pruner.H)])
    else:
        W = W.clone()
        W[:, :, blocks] = 0
    return W[:, :, torch.argsort(perm)].reshape(pruner.layer.weight.shape).to(pruner.layer.weight.dtype)


def _chunk_ends(n: int, total: int, round_to: int) -> list[int]:
    """Units removed after each allocation step (the steps structured._cost_curve and allocate take)."""
    ends, k = [], 0
    while k < total:
        k = min(k + step_size(n, k, round_to), total)
        ends.append(k)
    return ends


@torch.no_grad()
def measured_curves(model: nn.Module, groups: list, curves: dict, stats: dict, batches: list, percdamp: float,
                    round_to: int, batch_size: int, macs_per_image: float, progress: bool = False,
                    outputs: str = "scores") -> dict:
    """The curves with their costs replaced by the output KL (`kl` above), same removal orders; each point's run
    starts at the group's first consumer (output_kl.py). (Measuring each group with the others' first allocation in
    place, and allocating again, was worse on ResNet-20's held-out images: -2.86 against -2.34 points at keep_macs
    0.7.) outputs: what the model returns (output_kl.py: scores by KL, values by relative squared error)."""
    x = torch.cat(batches)[:max(MIN_IMAGES, min(IMAGES, int(POINT_MACS / max(macs_per_image, 1.0))))]
    outputs = output_measure(model, x, "channel_costs='kl'", "the groups are compared by their layer costs", outputs)
    if outputs is None:
        return curves
    points = {}  # (group, units removed) -> the consumers whose weights it changes
    for g, (order, _) in curves.items():
        ends = _chunk_ends(len(groups[g].units), len(order), groups[g].unit_step(round_to))
        m = min(LEVELS, len(ends))
        consumers = sorted({c for u in order for c in groups[g].units[u].columns})
        points |= {(g, ends[round(i * (len(ends) - 1) / max(1, m - 1))]): consumers for i in range(m)}

    @contextmanager
    def removed(point):  # the group's first k units removed: its consumers re-fitted without their columns
        g, k = point
        cols: dict[str, set] = {}
        for u in curves[g][0][:k]:
            for c, cc in groups[g].units[u].columns.items():
                cols.setdefault(c, set()).update(cc)
        saved = {}
        try:
            for c, cc in cols.items():
                p = stats[c]
                saved[c] = p.layer.weight.detach().clone()
                blocks = unit_blocks(p, [sorted(cc)]).flatten()
                p.layer.weight.data.copy_(consumer_weight(p, blocks, percdamp, refit=p.d <= MAX_OBS_COLUMNS))
            yield
        finally:
            for c, w in saved.items():
                stats[c].layer.weight.data.copy_(w)

    with tqdm(total=len(points), desc="channels: output costs", unit="point", disable=not progress,
              leave=False) as bar:
        kl = output_kls(model, x, points, removed, batch_size, bar, outputs)
    return {g: (order, _follow(layer_curve, {0: 0.0} | {k: float(v) for (h, k), v in kl.items() if h == g}))
            for g, (order, layer_curve) in curves.items()}


def _follow(layer_curve: list[float], measured: dict[int, float]) -> list[float]:
    """Per unit count 1..len(layer_curve): the measured cost, between measured points interpolated along the layer
    curve (linearly in units where it is flat), made non-decreasing (a noisy KL must not make removal free)."""
    points = sorted(measured.items())
    layer = [0.0] + list(layer_curve)
    out, best = [], 0.0
    for k in range(1, len(layer_curve) + 1):
        (a, ma), (b, mb) = next((p, q) for p, q in zip(points, points[1:]) if p[0] < k <= q[0])
        span = layer[b] - layer[a]
        t = (layer[k] - layer[a]) / span if span > 0 else (k - a) / (b - a)
        best = max(best, ma + (mb - ma) * t)
        out.append(best)
    return out
