"""`target_speedup`: channel allocation by measured latency instead of multiply-adds (SPDY-style).

Each Conv2d/Linear a prune can shrink is timed alone at a few widths on the target runtime (deploy.layer_latency,
a cached table); the network's predicted time is the sum of its layers' interpolated times. The greedy allocation
(channel_budget.allocate) removes channels by OBS cost per predicted second saved. A layer table misses what
layers do to each other (caches, memory traffic, the additions, activations and pooling between them), so the
smaller network is built (sliced, weights aside) and timed against the dense one side by side, and the predicted
target is searched until the measured speed-up is within TOLERANCE of the target: measured and predicted are
related by a monotone but far from proportional map (ResNet-50 at 224: predicted 2.0x measured 3.1x), so the
search interpolates in log-log space between the tries that bracket the target (a secant before it has a
bracket), at most SEARCH_STEPS times, and keeps the closest try. A single dense timing is never trusted for a
constant: every try times dense and pruned side by side, so a slow moment of a shared machine slows both.
"""
from __future__ import annotations

import copy
import math
import warnings

import torch
from torch import nn

from ..deploy.layer_latency import LayerLatency, layer_latency_table
from ..deploy.runtimes import runtime as runtime_class, side_by_side
from ..utils import UserError
from .channel_budget import Counter, allocate, chosen_units, macs_of
from .conv_views import ConvView, without_views
from .slicing import removal_plan, slice_channels_

TOLERANCE = 0.03  # relative distance of the measured speed-up to the target that ends the search
MISSED = 0.10  # relative distance beyond which the closest try is reported as a miss (channel steps are coarse)
SEARCH_STEPS = 6  # tries (each: one allocation, one slicing and one side-by-side timing)
TIMING = {"warmup": 5, "runs": 20, "rounds": 3}  # per side-by-side measurement


class LatencyCounter(Counter):
    """Predicted seconds per call as a function of the units removed per group."""

    def __init__(self, model: nn.Module, groups, positions: dict, table: dict[str, LayerLatency]):
        super().__init__(model, groups, positions, "latency")
        self.table = table

    def cost(self, name: str, size: list[int]) -> float:
        t = self.table.get(name)
        return 0.0 if t is None else t.at(macs_of(size) / max(macs_of(self.sizes[name]), 1))


def next_goal(tries: list[tuple[float, float]], target: float) -> float:
    """The next predicted-latency fraction to try, from (goal, measured speed-up) pairs (the speed-up falls as the
    goal grows): log-log interpolation between the closest tries on either side of the target, else a secant
    through the last two (at most a factor 2 per step), else the measured ratio's correction."""
    fast = [t for t in tries if t[1] > target]  # goals too small
    slow = [t for t in tries if t[1] < target]
    if fast and slow:
        (g0, m0), (g1, m1) = max(fast, key=lambda t: t[0]), min(slow, key=lambda t: t[0])
        if m0 != m1:
            w = (math.log(m0) - math.log(target)) / (math.log(m0) - math.log(m1))
            return math.exp(math.log(g0) + w * (math.log(g1) - math.log(g0)))
        return (g0 * g1) ** 0.5
    g, m = tries[-1]
    step = m / target  # speed-up proportional to 1/goal
    if len(tries) >= 2 and tries[-2][0] != g and tries[-2][1] != m:
        g2, m2 = tries[-2]
        slope = (math.log(m) - math.log(m2)) / (math.log(g) - math.log(g2))  # d log m / d log goal, < 0
        if slope < 0:
            step = math.exp((math.log(target) - math.log(m)) / slope)
    return min(1.0, g * min(2.0, max(0.5, step)))


def _sliced(model: nn.Module, groups, curves, removed: dict[int, int]) -> nn.Module:
    small = copy.deepcopy(model)
    slice_channels_(small, *removal_plan(groups, chosen_units(curves, removed)))
    return small


@torch.no_grad()
def speedup_allocation(model: nn.Module, groups, curves: dict, positions: dict, config,
                       example: torch.Tensor, progress: bool = False) -> tuple[dict[int, int], dict]:
    """Units removed per group for config.target_speedup, and what the search measured (for the report)."""
    target, runtime, batch = config.target_speedup, config.speedup_runtime, config.speedup_batch
    make = runtime_class(runtime)
    viewed = copy.deepcopy(model).cpu().eval()  # the runtimes run on the CPU, whatever device the prune uses
    dense = without_views(viewed)  # what is timed is the user's layers, not the Conv2d views of the prune
    x = torch.randn(batch, *example.shape[1:], generator=torch.Generator().manual_seed(0))
    macs = Counter(model, groups, positions, "macs")
    original = {f"{n}.conv": n for n, m in model.named_modules() if isinstance(m, ConvView)}
    table = layer_latency_table(dense, x, {original.get(n, n): v for n, v in macs.varying().items()}, runtime,
                                batch, progress=progress)
    table = {f"{n}.conv" if f"{n}.conv" in original else n: t for n, t in table.items()}
    dense_fn = make(dense, x[:1], None)
    counter = LatencyCounter(model, groups, positions, table)
    goal, tries = 1 / target, []
    for _ in range(SEARCH_STEPS):
        try:
            removed = allocate(groups, curves, counter, goal, config.round_to)
        except UserError:
            if not tries:
                raise UserError(f"target_speedup {target:g} is out of reach on {runtime}: even with every group at "
                                f"its minimum ({config.round_to} channels) the predicted speed-up is lower") from None
            break
        small = make(without_views(_sliced(viewed, groups, curves, removed)), x[:1], None)
        _, med = side_by_side({"dense": dense_fn, "pruned": small}, x, **TIMING)
        measured = med["dense"] / med["pruned"]
        tries.append({"removed": removed, "goal": goal, "predicted_speedup": counter.total({}) /
                      counter.total(removed), "measured_speedup": measured, "dense_s": med["dense"],
                      "pruned_s": med["pruned"], "macs_kept": macs.total(removed) / macs.total({})})
        if abs(measured / target - 1) <= TOLERANCE:
            break
        goal = next_goal([(t["goal"], t["measured_speedup"]) for t in tries], target)
    best = min(tries, key=lambda t: abs(t["measured_speedup"] / target - 1))
    reached = abs(best["measured_speedup"] / target - 1) <= MISSED
    if not reached:  # the closest try is kept (the prune goes on), but never silently
        fastest = max(t["measured_speedup"] for t in tries)
        why = (f"; no try was faster than the dense model ({fastest:.2f}x at best): narrower layers are not faster on "
               "this runtime here, try another speedup_runtime or keep_macs") if fastest <= 1 else ""
        warnings.warn(f"target_speedup {target:g}x not reached on {runtime}: the closest of {len(tries)} tries "
                      f"measured {best['measured_speedup']:.2f}x, keeping {best['macs_kept']:.0%} of the "
                      f"multiply-adds{why}", RuntimeWarning)
    record = {"runtime": runtime, "batch": batch, "target_speedup": target, "measured_speedup":
              best["measured_speedup"], "reached": reached,
              "tries": [{k: v for k, v in t.items() if k != "removed"} for t in tries],
              "table": {n: vars(t) for n, t in table.items()}}
    return best["removed"], record
