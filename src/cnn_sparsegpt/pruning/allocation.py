"""Non-uniform layer sparsity: how much of each layer to prune under one overall budget.

- `uniform`: every layer at S (SparseGPT as published).
- `owl`: outlier-weighted layer sparsity (Yin et al., 2024). A layer whose Wanda scores |W|·‖X_j‖ hold
  many outliers (more than OWL_M times their mean) is pruned less, within S ± λ. One dense pass that
  only sums squares of the inputs.
- `dp`: a database of each layer's reconstruction error ‖(W − Ŵ)X‖²/‖WX‖² at a grid of sparsities, on
  the dense network's Hessians (one factorization per layer serves every level), then a knapsack
  dynamic programme that minimizes the summed error under the budget (OBC; SPDY).

The budget counts weights (`params`) or multiply-adds at the calibration input size (`flops`); the
chosen sparsities are shifted together at the end so that the budget is met exactly, and the overall
fraction of the pruned layers' weights removed is `S` for `params`.
"""
from __future__ import annotations

import math
import time
from contextlib import contextmanager

import torch
from torch import nn
from tqdm.auto import tqdm

from .graph import run_hooked
from .layer import LayerPruner
from .output_kl import output_kls, output_measure
from ..kernels.masks import Pattern
from ..kernels.exact_obs import exact_error_curve
from ..kernels.solver import choose_solver, prune_matrix, relative_error, sparsegpt_curve
from ..utils import UserError

ALLOCATIONS = ("uniform", "owl", "dp")  # the functions: ALLOCATORS, below
BUDGETS = ("params", "flops")
DP_MEASURES = ("layer", "kl")  # the database's error: layer reconstruction error, or it scaled to output KL
GRID = tuple(sorted({0.0} | {round(1 - 0.8 ** k, 4) for k in range(1, 40) if 1 - 0.8 ** k <= 0.98}))
OWL_M = 5.0  # a score is an outlier above OWL_M times its layer's mean score (the OWL paper's M)
MAX_SPARSITY = 0.99
UNITS = 2000  # resolution of the knapsack's budget axis


def match_budget(s: torch.Tensor, size: torch.Tensor, target: float, hi: float = MAX_SPARSITY) -> torch.Tensor:
    """Shift all sparsities by one δ (clipped to [0, hi]) so that Σ s·size = target·Σ size (bisection)."""
    s, size = s.double(), size.double()
    goal = target * size.sum()
    lo_d, hi_d = -1.0, 1.0
    for _ in range(60):
        mid = (lo_d + hi_d) / 2
        if ((s + mid).clamp(0, hi) * size).sum() < goal:
            lo_d = mid
        else:
            hi_d = mid
    return (s + hi_d).clamp(0, hi)


def knapsack(errors: torch.Tensor, costs: torch.Tensor, need: int) -> list[int]:
    """Choose one level per layer minimizing Σ errors[l, k] subject to Σ costs[l, k] >= need.

    errors, costs: (L, K); costs are non-negative integers. Returns the chosen level of each layer."""
    L, K = errors.shape
    inf = float("inf")
    best = torch.full((need + 1,), inf, dtype=torch.float64)
    best[0] = 0.0
    idx = torch.arange(need + 1)
    choices, sources = [], []
    for layer in range(L):
        cand = torch.full((K, need + 1), inf, dtype=torch.float64)
        src = torch.zeros((K, need + 1), dtype=torch.long)
        for k in range(K):
            c = int(costs[layer, k])
            tgt = (idx + c).clamp(max=need)  # "at least need": every overshoot lands on need
            vals = best + float(errors[layer, k])
            cand[k].scatter_reduce_(0, tgt, vals, reduce="amin")
            src[k] = (idx - c).clamp(min=0)
            lo = max(need - c, 0)  # the capped entry: its best source among all that reach it
            src[k, need] = lo + int(torch.argmin(best[lo:]))
        best, choice = cand.min(0)
        choices.append(choice)
        sources.append(src)
    if not torch.isfinite(best[need]):
        raise UserError("the sparsity budget cannot be met by the allocation grid")
    picked, b = [], need
    for layer in reversed(range(L)):
        k = int(choices[layer][b])
        picked.append(k)
        b = int(sources[layer][k, b])
    return picked[::-1]


def layer_sizes(model: nn.Module, names: list[str], positions: dict | None, budget: str) -> torch.Tensor:
    """What each layer of `names` counts in a budget (float64): its weights, or with budget 'flops' its weights
    times the positions it is applied at (positions: per layer, 1 where missing)."""
    modules = dict(model.named_modules())
    params = torch.tensor([modules[n].weight.numel() for n in names], dtype=torch.float64)
    if budget != "flops":
        return params
    return params * torch.tensor([float((positions or {}).get(n, 1)) for n in names], dtype=torch.float64)


@torch.no_grad()
def dense_statistics(model: nn.Module, batches: list, names: list[str], hessian: bool) -> dict[str, LayerPruner]:
    """One forward pass of the dense network: each named layer's input statistics (H, or column sums)."""
    modules = dict(model.named_modules())
    stats = {n: LayerPruner(modules[n], n, hessian=hessian) for n in names}
    by_module = {modules[n]: stats[n] for n in names}

    def hook(mod, inp):
        by_module[mod].add_batch(inp[0])

    run_hooked(model, batches, [modules[n].register_forward_pre_hook(hook) for n in names])
    return stats


def _owl(stats: dict[str, LayerPruner], sparsity: float, lam: float) -> torch.Tensor:
    ratios = []
    for p in stats.values():
        Wg, _ = p.weight_matrix()
        scores = Wg.abs() * p.hessian_diagonal().clamp_min(0).sqrt()[:, None, :]
        ratios.append((scores > OWL_M * scores.mean()).double().mean())
    D = torch.stack(ratios)
    spread = (D.max() - D.min()).clamp_min(1e-12)
    return sparsity + lam * (1 - 2 * (D - D.min()) / spread)  # most outliers: S - λ; fewest: S + λ


def _row_scale(p: LayerPruner, row_scales: dict | None, n: str):
    scale = (row_scales or {}).get(n)
    return None if scale is None else scale.to(p.H).reshape(p.groups, -1)


def layer_error_curve(p: LayerPruner, method: str, grid, percdamp: float, row_scale=None,
                      solver: str = "sparsegpt") -> torch.Tensor:
    """‖(W − Ŵ)X‖²/‖WX‖² of the layer pruned by `method` at each sparsity of `grid` (dense H; one factor). With
    solver 'exact' (or 'auto' where the layer is affordable): from one exact greedy pass, OBC's database."""
    Wg, _ = p.weight_matrix()
    if method == "sparsegpt" and choose_solver(solver, Wg.shape[0] * Wg.shape[1], Wg.shape[-1], False) == "exact":
        return exact_error_curve(Wg, p.H, grid, percdamp, row_scale)
    if method == "sparsegpt":
        levels = [s for s in grid if s > 0]
        curve = sparsegpt_curve(Wg, p.H, levels, percdamp, row_scale).tolist()
        return torch.tensor([0.0 if s == 0 else curve[levels.index(s)] for s in grid], dtype=torch.float64)
    errors = []
    for s in grid:
        if s == 0:
            errors.append(torch.zeros((), dtype=torch.float64))
            continue
        Q, _, _ = prune_matrix(Wg, p.H, method, Pattern(sparsity=s), percdamp, row_scale=row_scale)
        errors.append(relative_error(Wg, Q, p.H).cpu())
    return torch.stack(errors)


@torch.no_grad()
def _kl_sensitivity(model: nn.Module, batches: list, names: list[str], stats: dict, method: str, pattern: Pattern,
                    percdamp: float, row_scales: dict, images: int = 256, progress: bool = False,
                    chunk: int | None = None, outputs: str | None = "scores") -> tuple:
    """KL(dense ‖ network with only layer l pruned to `pattern`) on the first `images` calibration images (of
    values: their relative squared error, output_kl.py; outputs None: none measured, all zero),
    for every layer (how much a layer's error costs at the network's output; output_kl.py: on the traced graph
    each layer's run starts at the layer, about half a forward pass per layer), and the layer's reconstruction
    error at that sparsity. chunk: images per forward pass (the KL is a mean over images: chunks' KLs add up)."""
    x = torch.cat(batches)[:images]
    modules = dict(model.named_modules())
    bar = tqdm(total=2 * len(names), desc="allocation: sensitivity", unit="step", disable=not progress, leave=False)
    rel, pruned_w = {}, {}
    for n in names:
        p = stats[n]
        Wg, perm = p.weight_matrix()
        Q, _, _ = prune_matrix(Wg, p.H, method, pattern, percdamp, row_scale=_row_scale(p, row_scales, n))
        pruned_w[n] = Q[:, :, torch.argsort(perm)].reshape(modules[n].weight.shape).to(modules[n].weight.dtype)
        rel[n] = relative_error(Wg, Q, p.H).cpu()
        bar.update()

    @contextmanager
    def pruned(n):
        w = modules[n].weight
        saved = w.detach().clone()
        w.data.copy_(pruned_w[n])
        try:
            yield
        finally:
            w.data.copy_(saved)

    xs = x.split(chunk) if chunk and chunk < len(x) else [x]
    kl = torch.zeros(len(names), dtype=torch.float64)
    for xc in xs if outputs else []:  # chunk by chunk: one chunk's activations alive at a time (256 images at 224²
        # would be GBs)
        part = output_kls(model, xc, {n: [n] for n in names}, pruned, outputs=outputs)
        kl += torch.stack([part[n].cpu() for n in names]) * len(xc) / len(x)
        bar.update(len(names) / len(xs))
    bar.close()
    return kl, torch.stack([rel[n] for n in names])


@torch.no_grad()
def allocate(config, model: nn.Module, batches: list, names: list[str], positions: dict | None = None,
             row_scales: dict | None = None, progress: bool = False, chunk: int | None = None) -> dict:
    """Per-layer sparsities {name: s} for the pruned layers `names` (in forward order) under `config.allocation`
    and its budget, and the allocation's details for the report. config: a PruneConfig (checked). chunk: images
    per forward pass of the network's output-level measures (None: as they come)."""
    sparsity = config.pattern.target
    if config.allocation == "uniform" or not names:
        return {"sparsity": {n: sparsity for n in names}}
    size = layer_sizes(model, names, positions, config.budget)
    t0 = time.perf_counter()
    stats = dense_statistics(model, batches, names, hessian=config.allocation == "dp")
    info = {"kind": config.allocation, "budget": config.budget, "seconds": {"dense_pass": time.perf_counter() - t0}}
    s = ALLOCATORS[config.allocation](config, model, batches, names, stats, size, row_scales, info, progress, chunk)
    s = match_budget(s, size, sparsity)
    info["sparsity"] = {n: float(v) for n, v in zip(names, s)}
    return info


def _owl_allocation(config, model, batches, names, stats, size, row_scales, info, progress, chunk) -> torch.Tensor:
    info["owl_lambda"] = config.owl_lambda
    return _owl(stats, config.pattern.target, config.owl_lambda)


def _dp_allocation(config, model, batches, names, stats, size, row_scales, info, progress, chunk) -> torch.Tensor:
    sparsity, method, percdamp = config.pattern.target, config.method, config.percdamp
    grid = torch.tensor(GRID, dtype=torch.float64)
    t0 = time.perf_counter()
    curves = [layer_error_curve(stats[n], method, GRID, percdamp, _row_scale(stats[n], row_scales, n), config.solver)
              for n in tqdm(names, desc="allocation: error database", unit="layer", disable=not progress,
                            leave=False)]
    errors = torch.stack(curves)
    info["seconds"]["error_database"] = time.perf_counter() - t0
    measure, outputs = config.dp_measure, None
    if measure == "kl":
        outputs = output_measure(model, batches[0], "allocation='dp' with dp_measure='kl'",
                                 "each layer's own relative error is used (dp_measure='layer')", config.outputs)
        measure = "kl" if outputs else "layer"
    if measure == "kl":  # each layer's curve scaled to its output KL at S: error at the network's output
        kl, rel = _kl_sensitivity(model, batches, names, stats, method, Pattern(sparsity=sparsity), percdamp,
                                  row_scales, progress=progress, chunk=chunk, outputs=outputs)
        errors = errors * (kl / rel.clamp_min(1e-12))[:, None]
        info["kl_at_sparsity"] = {n: float(v) for n, v in zip(names, kl)}
        info["seconds"]["kl_measure"] = time.perf_counter() - t0 - info["seconds"]["error_database"]
    info["dp_measure"] = measure
    for n in names:
        stats[n].free()
    costs = torch.round(grid[None, :] * size[:, None] / size.sum() * UNITS).long()
    picked = knapsack(errors, costs, int(round(sparsity * UNITS)))
    info |= {"grid": list(GRID), "errors": {n: curves[i].tolist() for i, n in enumerate(names)}}
    return grid[picked]


# Each allocation's function (config, model, batches, names, dense statistics, layer sizes, row scales, report
# info, progress, images per forward) -> per-layer sparsities before the budget is matched exactly; uniform needs none.
ALLOCATORS = {"owl": _owl_allocation, "dp": _dp_allocation}


@torch.no_grad()
def nm_dense_layers(config, model: nn.Module, batches: list, names: list[str], positions: dict | None = None,
                    progress: bool = False, chunk: int | None = None) -> dict:
    """config.nm_share: which of the layers `names` stay dense so that the N:M pattern covers at least that share of
    their weights (of their multiply-adds with budget 'flops') at the least summed cost at the network's output:
    each layer N:M-pruned alone on the dense network's Hessians (one dense pass), the network's output KL on 256
    calibration images (one partial forward pass per layer; each layer's own relative error where the output holds
    no scores or values to compare), then the knapsack over {dense, N:M} per layer. Returns the report's entry:
    the layers kept dense, the share covered, each layer's cost."""
    size = layer_sizes(model, names, positions, config.budget)
    t0 = time.perf_counter()
    stats = dense_statistics(model, batches, names, hessian=True)
    outputs = output_measure(model, batches[0], "nm_share", "each layer's own relative error is compared",
                             config.outputs)
    kl, rel = _kl_sensitivity(model, batches, names, stats, config.method, config.pattern, config.percdamp, {},
                              progress=progress, chunk=chunk, outputs=outputs)
    for n in names:
        stats[n].free()
    cost = kl if outputs else rel
    units = torch.round(size / size.sum() * UNITS).long()
    picked = knapsack(torch.stack([torch.zeros_like(cost), cost], 1), torch.stack([torch.zeros_like(units), units], 1),
                      min(int(math.ceil(config.nm_share * UNITS - 1e-9)), int(units.sum())))
    dense = [n for n, k in zip(names, picked) if k == 0]
    covered = float(sum(size[i] for i, k in enumerate(picked) if k == 1) / size.sum())
    return {"nm_share": config.nm_share, "budget": config.budget, "covered": covered, "dense": dense,
            "measure": outputs or "layer", "cost": {n: float(c) for n, c in zip(names, cost)},
            "seconds": time.perf_counter() - t0}
