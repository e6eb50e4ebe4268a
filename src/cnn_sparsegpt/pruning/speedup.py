"""`target_speedup`: channel allocation by measured latency instead of multiply-adds (SPDY-style).

Each Conv2d/Linear a prune can shrink is timed alone at a few widths on the target runtime (deploy.layer_latency,
a cached table); the network's predicted time is the sum of its layers' interpolated times plus what the rest of
the network (additions, activations, pooling) took in the dense model, held fixed. The greedy allocation
(channel_budget.allocate) then removes channels by OBS cost per predicted second saved. A layer table misses
what layers do to each other (caches, memory traffic, the fixed part shrinking too), so the smaller network is
built (sliced, weights aside) and timed against the dense one side by side; the predicted target is corrected by
the measured ratio until the measured speed-up is within TOLERANCE of the target, at most SEARCH_STEPS times,
and the closest try is kept.
"""
from __future__ import annotations

import copy

import torch
from torch import nn

from ..deploy.layer_latency import LayerLatency, layer_latency_table
from ..deploy.runtimes import runtime as runtime_class, side_by_side
from ..utils import UserError
from .channel_budget import Counter, allocate, macs_of
from .slicing import removal_plan, slice_channels_

TOLERANCE = 0.03  # relative distance of the measured speed-up to the target that ends the search
SEARCH_STEPS = 4  # tries (each: one allocation, one slicing and one side-by-side timing)
TIMING = {"warmup": 5, "runs": 20, "rounds": 3}  # per side-by-side measurement


class LatencyCounter(Counter):
    """Predicted seconds per call as a function of the units removed per group."""

    def __init__(self, model: nn.Module, groups, positions: dict, table: dict[str, LayerLatency], fixed: float):
        super().__init__(model, groups, positions, "latency")
        self.table, self.fixed = table, fixed

    def cost(self, name: str, size: list[int]) -> float:
        t = self.table.get(name)
        return 0.0 if t is None else t.at(macs_of(size) / max(macs_of(self.sizes[name]), 1))

    def total(self, removed: dict[int, int]) -> float:
        return self.fixed + super().total(removed)


def _sliced(model: nn.Module, groups, curves, removed: dict[int, int]) -> nn.Module:
    small = copy.deepcopy(model)
    gone = {g: set(curves[g][0][:k]) for g, k in removed.items() if k}
    slice_channels_(small, *removal_plan(groups, gone))
    return small


@torch.no_grad()
def speedup_allocation(model: nn.Module, groups, curves: dict, positions: dict, config,
                       example: torch.Tensor, progress: bool = False) -> tuple[dict[int, int], dict]:
    """Units removed per group for config.target_speedup, and what the search measured (for the report)."""
    target, runtime, batch = config.target_speedup, config.speedup_runtime, config.speedup_batch
    make = runtime_class(runtime)
    dense = copy.deepcopy(model).cpu().eval()  # the runtimes run on the CPU, whatever device the prune uses
    x = torch.randn(batch, *example.shape[1:], generator=torch.Generator().manual_seed(0))
    macs = Counter(model, groups, positions, "macs")
    table = layer_latency_table(dense, x, macs.varying(), runtime, batch, progress=progress)
    dense_fn = make(dense, x[:1], None)
    _, med = side_by_side({"dense": dense_fn}, x, **TIMING)
    counter = LatencyCounter(model, groups, positions, table, 0.0)
    counter.fixed = max(0.0, med["dense"] - counter.total({}))
    goal, tries = 1 / target, []
    for _ in range(SEARCH_STEPS):
        try:
            removed = allocate(groups, curves, counter, goal, config.round_to)
        except UserError:
            if not tries:
                raise UserError(f"target_speedup {target:g} is out of reach on {runtime}: even with every group at "
                                f"its minimum ({config.round_to} channels) the predicted speed-up is lower") from None
            break
        small = make(_sliced(dense, groups, curves, removed), x[:1], None)
        _, med = side_by_side({"dense": dense_fn, "pruned": small}, x, **TIMING)
        measured = med["dense"] / med["pruned"]
        tries.append({"removed": removed, "predicted_speedup": counter.total({}) / counter.total(removed),
                      "measured_speedup": measured, "dense_s": med["dense"], "pruned_s": med["pruned"],
                      "macs_kept": macs.total(removed) / macs.total({})})
        if abs(measured / target - 1) <= TOLERANCE:
            break
        goal = min(1.0, goal * measured / target)  # too fast: prune less (a larger goal), too slow: more
    best = min(tries, key=lambda t: abs(t["measured_speedup"] / target - 1))
    record = {"runtime": runtime, "batch": batch, "target_speedup": target, "measured_speedup":
              best["measured_speedup"], "tries": [{k: v for k, v in t.items() if k != "removed"} for t in tries],
              "fixed_s": counter.fixed, "table": {n: vars(t) for n, t in table.items()}}
    return best["removed"], record
