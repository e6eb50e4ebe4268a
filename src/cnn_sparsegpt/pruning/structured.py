"""One-shot structured (channel) pruning with OBS reconstruction: a physically smaller network.

1. Dependency groups (channels.py): the units (channels) that go together.
2. One pass of the calibration set through the dense network gives each consumer's Hessian H = XXᵀ/N.
3. Per group, units are removed greedily by their block-OBS cost summed over the group's consumers, each
   consumer's cost relative to its dense output energy tr(W H Wᵀ), in chunks of round_to with an exact joint H⁻¹
   downdate after each chunk (kernels/block_obs.py): a removal order and cost curve per group. With
   channel_costs='kl' (the default) the curve's costs are then measured as the network's output KL
   (channel_costs.py), so that groups compare.
4. The global target (multiply-adds or parameters kept) is met by a greedy over the groups' curves: each step
   removes `round_to` more units from the group whose next step costs least per multiply-add (or parameter) saved,
   so channel counts stay multiples of `round_to` and no group is removed entirely.
5. Each consumer's kept weights are re-fitted to its dense output (least squares on H without the removed columns);
   producers lose their rows, BatchNorms and depthwise convs their entries; the modules are sliced in place.
6. With dense_target (the recommended recipe), every layer from the first changed one on is re-fitted in forward
   order to its dense counterpart's output on the smaller network's inputs (refit_to_dense_outputs), and BatchNorm
   statistics are re-estimated on the smaller network.

The result loads without this project (model.pt's shapes are the new ones); `spec_of`/`apply_structure` rebuild
the shapes on a fresh model for the run-folder readers.
"""
from __future__ import annotations

import time
import warnings
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from ..kernels.block_obs import BlockOBS, OwnEnergy, damped_inverse
from ..kernels.linalg import accumulate_xxt_, damped_cholesky
from ..utils import UserError
from .allocation import dense_statistics
from .batchnorm import bn_modules, bn_statistics_, recalibrate
from .channel_budget import Counter, allocate, chosen_units, step_size
from .channel_costs import MAX_OBS_COLUMNS, consumer_weight, measured_curves, unit_blocks
from .channels import Group, channel_groups, main_reason
from .dense_target import DenseInputs
from .graph import GraphExecutor, call_order, layer_inputs, nonstandard_layers, partial_trace, stored_parts, trace
from .intercept import fold_offset_, offset_sinks
from .layer import MIN_SAMPLES_PER_INPUT, LayerPruner, few_samples
from .speedup import speedup_allocation
from .slicing import kept_indices, removal_plan, slice_channels_, spec_entry


@dataclass
class StructureReport:
    """What channel pruning did."""
    target: dict  # {"macs": fraction} or {"params": fraction}
    macs: tuple = (0, 0)  # per image: dense, kept
    params: tuple = (0, 0)  # weights of the Conv2d/Linear layers: dense, kept
    groups: list = field(default_factory=list)  # per group: producers, channels before/after, cost
    layers: list = field(default_factory=list)  # per Conv2d/Linear: name, shape before/after
    spec: dict = field(default_factory=dict)  # module -> its new shape attributes (apply_structure)
    timings: dict = field(default_factory=dict)
    latency: dict | None = None  # target_speedup: the layer table and the measured tries (speedup.py)
    not_refitted: dict = field(default_factory=dict)  # layer -> why it was left as sliced (too few samples)


class _Read:
    """A consumer's BlockOBS (or OwnEnergy) over the units it reads, asked by the group's unit indices: a unit whose
    channels it does not read costs it nothing (timm's Inception-ResNet-v2: a group spans a concatenation's parts,
    and a consumer reads one part). local: each unit's index among those it reads, -1 where it reads none."""

    def __init__(self, obs, local: torch.Tensor):
        self.obs, self.local = obs, local

    def costs(self, units: torch.Tensor) -> torch.Tensor:
        ix = self.local[units]
        out = torch.zeros(len(units), dtype=torch.float64)
        if (ix >= 0).any():
            out[ix >= 0] = self.obs.costs(ix[ix >= 0]).cpu()
        return out

    def joint(self, base: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
        b, ix = self.local[base], self.local[candidates]
        b = b[b >= 0]
        out = torch.empty(len(candidates), dtype=torch.float64)
        if (ix >= 0).any():
            out[ix >= 0] = self.obs.joint(b, ix[ix >= 0]).cpu()
        if (ix < 0).any():  # the base set's cost alone
            out[ix < 0] = float(self.obs.joint(b[:-1], b[-1:])[0]) if len(b) else 0.0
        return out

    def remove(self, units: torch.Tensor) -> None:
        ix = self.local[units]
        if (ix >= 0).any():
            self.obs.remove(ix[ix >= 0])


def _cost_curve(group: Group, stats: dict, percdamp: float, max_remove: int,
                round_to: int) -> tuple[list[int], list[float]]:
    """Greedy removal order of the group's removable units and the cumulative relative cost after each. Units go
    in the chunks the allocation steps through (round_to at a time, the first chunk aligning the kept count to a
    multiple of round_to): the chunk's cheapest units by their OBS cost, removed together with one exact joint
    update (a rank-(chunk·taps) downdate of H⁻¹, 1/round_to of the updates one by one would cost). Within a chunk
    the curve is interpolated; the allocation only reads chunk ends."""
    units = group.removable
    consumers = sorted({c for i in units for c in group.units[i].columns})
    n = len(group.units)
    if not consumers:  # nothing reads these channels: free to remove
        return units[:max_remove], [0.0] * min(max_remove, len(units))
    state = []
    for c in consumers:
        p = stats[c]
        Wg, _ = p.weight_matrix()
        Ws = Wg.double()  # (groups, rows, d); LayerPruner's H is 2XXᵀ/N in float32, (groups, d, d)
        cols = [group.units[i].columns.get(c, []) for i in units]
        blocks = unit_blocks(p, [x for x in cols if x]).to(Ws.device)
        reads = torch.tensor([bool(x) for x in cols])  # (a group can span a concatenation's parts: not all read)
        local = torch.where(reads, reads.cumsum(0) - 1, -1)
        if p.d > MAX_OBS_COLUMNS:  # no updates: each block's own output energy, fixed; H read in row chunks
            norm = float(sum(_output_energy(W, H) for W, H in zip(Ws, p.H))) or 1.0
            state += [(_Read(OwnEnergy(W, H, blocks), local), norm) for W, H in zip(Ws, p.H)]
            continue
        Hs = p.H.double() / 2
        norm = float((torch.bmm(Ws, Hs) * Ws).sum()) or 1.0  # the consumer's output energy, all its conv groups
        # a grouped conv loses the same columns in each group, each with its own H
        state += [(_Read(BlockOBS(W, damped_inverse(H, percdamp), blocks), local), norm) for W, H in zip(Ws, Hs)]
    alive = torch.ones(len(units), dtype=torch.bool)
    order, curve, total = [], [], 0.0
    while len(order) < min(max_remove, len(units)):
        step = min(step_size(n, len(order), round_to), min(max_remove, len(units)) - len(order))
        idx = alive.nonzero().flatten()
        costs = torch.zeros(len(units), dtype=torch.float64)
        for obs, norm in state:
            costs[idx] += obs.costs(idx).cpu() / norm
        # the chunk: a greedy on the joint cost of the set so far plus each candidate, over the cheapest units
        pool = idx[torch.argsort(costs[idx])[:2 * step]]
        chosen = pool[:0]
        joint = 0.0
        for _ in range(step):
            cand = pool[~torch.isin(pool, chosen)]
            grow = torch.zeros(len(cand), dtype=torch.float64)
            for obs, norm in state:
                grow += obs.joint(chosen, cand).cpu() / norm
            k = int(torch.argmin(grow))
            chosen = torch.cat([chosen, cand[k:k + 1]])
            joint = float(grow[k])
        for obs, _ in state:
            obs.remove(chosen)
        for j, i in enumerate(chosen.tolist(), 1):
            order.append(units[i])
            curve.append(total + joint * j / len(chosen))
        total += joint
        alive[chosen] = False
    return order, curve


def _output_energy(W: torch.Tensor, H: torch.Tensor, rows: int = 1024) -> torch.Tensor:
    """tr(W (H/2) Wᵀ) in float64 with H (d, d) in any precision, `rows` of H at a time (no d×d float64 copy)."""
    return sum(((W @ H[i:i + rows].double().t() / 2) * W[:, i:i + rows]).sum() for i in range(0, H.shape[0], rows))


@torch.no_grad()
def refit_to_dense_outputs(model: nn.Module, targets: DenseInputs, batches: list[torch.Tensor], names: list[str],
                           kept_rows: dict[str, torch.Tensor], percdamp: float, bn_recalibration: bool,
                           intercept: bool = True, low_memory: bool = False) -> dict[str, str]:
    """Sequential re-fit (the dense target, for layers whose inputs lost channels), in one pass of the traced graph:
    when the pass reaches layer `name`, its weights are solved for min ‖Y_dense − Ŵ·X_pruned‖², Y_dense its dense
    counterpart's output (kept rows, bias excluded; the dense copy's graph runs in step) and X_pruned its inputs in
    the smaller network, whose BatchNorm statistics are re-estimated as the pass reaches them, so later layers see
    the network as it will run. Ŵ = C (H + λI)⁻¹ with H = ΣX_pX_pᵀ, C = ΣY_dX_pᵀ over the calibration images.
    With intercept, where an output offset is free (intercept.py: a bias, or a BatchNorm) the fit has an intercept:
    H and C are centred (covariances), so no weight is spent on the mean, and the offset goes into the bias or the
    BatchNorm's running mean (held-out images: ResNet-20 keep_macs 0.35 +0.3 points, docs/CHANNELS.md).
    targets: the dense model's frozen copy (made before the model was sliced). low_memory: both graphs recompute
    activations instead of storing them, and the layers of a part fx cannot trace get one forward each. Returns the layers left as sliced,
    without a re-fit, and why: fewer than MIN_SAMPLES_PER_INPUT calibration samples per input."""
    modules = dict(model.named_modules())
    targets.follow_graph(names, low_memory)
    dense_modules = targets.modules
    try:
        traced = trace(model)
    except Exception:  # traced but for the parts fx cannot trace (channel_groups traced it so): their layers below
        traced = partial_trace(model, batches[0][:2])
    offsets = offset_sinks(model, names, traced) if intercept else {}
    done, unfitted = set(), {}

    def refit(name):
        def barrier(inputs):
            if name in done:  # a module called twice is re-fitted at its first call
                return
            done.add(name)
            layer, dlayer = modules[name], dense_modules[name]
            sink = offsets.get(name)
            p = LayerPruner(layer, name, hessian=sink is None)
            rows = kept_rows.get(name)
            fn = p.function(dlayer.weight if rows is None else dlayer.weight[rows.to(dlayer.weight.device)])
            dev, d, G = layer.weight.device, p.d, p.groups  # a grouped conv: one fit per conv group
            per = layer.weight.shape[0] // G
            C = torch.zeros(G, per, d, dtype=torch.float64, device=dev)
            sy = torch.zeros(G, per, dtype=torch.float64, device=dev)  # ΣY_d
            if sink is not None:  # Σ of the columns minus a reference (the first batch's mean), in float64
                S, sx, n, ref, chunk = torch.zeros(G, d, d, dtype=torch.float64, device=dev), 0.0, 0, None, None
            for xp, xd in zip(inputs, targets.stream(name)):
                Y = fn(xd.to(layer.weight.dtype))  # (B, rows, ...) without bias
                if isinstance(layer, nn.Linear):  # (..., rows): a Linear over channels-last inputs too
                    Y = Y.reshape(-1, Y.shape[-1])
                elif Y.ndim > 2:
                    Y = Y.movedim(1, -1).reshape(-1, Y.shape[1])
                Y = Y.t().reshape(G, per, -1).double()  # (groups, rows, T)
                X = p.columns(xp)  # (groups, d, T), T in the (image, position) order of Y's columns
                if sink is None:
                    p.add_batch(xp)
                else:  # products of shifted columns: an input's spread survives however large its mean
                    ref = X.mean(2, keepdim=True) if ref is None else ref
                    X = X - ref
                    chunk = accumulate_xxt_(torch.empty(G, d, d, device=dev) if chunk is None else chunk, X, beta=0)
                    S += chunk
                    sx, n = sx + X.sum(2).double(), n + X.shape[2]
                C += torch.bmm(Y, X.transpose(1, 2).double())
                sy += Y.sum(2)
            if sink is None:
                S, n = p.sums(), p.nsamples  # ΣXXᵀ over n columns, float64 (p.H would round it to float32)
            else:  # centred: Σ(X − x̄)(X − x̄)ᵀ and Σ(Y − ȳ)(X − x̄)ᵀ; S in place, rows at a time (no d×d temporary)
                chunk = None  # the float32 buffer, before the solve's copies (a 24k-input Linear: 2.4 GB)
                for i in range(0, d, 1024):
                    S[:, i:i + 1024] -= sx[:, i:i + 1024, None] * sx[:, None, :] / n
                C = C - sy[:, :, None] * sx[:, None, :] / n
            if n < MIN_SAMPLES_PER_INPUT * d:  # (as the weight prune's re-fits: it would fit these images only)
                unfitted[name] = few_samples(n, d)
                p.free()
                return
            W = torch.cholesky_solve(C.transpose(1, 2), damped_cholesky(S, percdamp)).transpose(1, 2)  # C (S + λI)⁻¹
            _, perm = p.weight_matrix()
            layer.weight.data.copy_(W[:, :, torch.argsort(perm)].reshape(layer.weight.shape).to(layer.weight.dtype))
            if sink is not None:
                x_sum = (sx + n * ref[:, :, 0].double())[:, :, None]
                offset = ((sy - torch.bmm(W, x_sum)[:, :, 0]) / n).flatten().to(layer.weight.dtype)  # ȳ − Ŵx̄
                fold_offset_(layer, sink, offset)
            p.free()
        return barrier

    def statistics(name):
        def barrier(inputs):
            if name not in done:
                done.add(name)
                bn_statistics_(modules[name], inputs)
        return barrier

    barriers = {n: refit(n) for n in names}
    if bn_recalibration:
        bns = set(bn_modules(model))
        barriers |= {n: statistics(n) for n, m in modules.items() if m in bns}
    GraphExecutor(traced, batches, barriers, low_memory).run()
    left = call_order(model, [n for n in barriers if n not in done], batches[0][:1])  # inside the parts called whole
    if left:
        parts = [] if low_memory else stored_parts(model, traced.opaque_modules, batches[0][:1],
                                                   sum(len(x) for x in batches), batches[0].device, copies=2)[0]
        targets.parts = parts
        for name, inputs, _ in layer_inputs(model, left, batches, parts):
            barriers[name](inputs)
    targets.free()
    return unfitted


@torch.no_grad()
def prune_channels(model: nn.Module, batches: list[torch.Tensor], config, positions: dict,
                   progress: bool = False, low_memory: bool = False, kept: dict[str, str] | None = None
                   ) -> StructureReport:
    """Prune whole channels of `model` in place to config.keep_macs (or keep_params) of its multiply-adds
    (parameters), as the module docstring describes. The first conv's input and the classifier's output stay.
    low_memory: the re-fit's pass recomputes activations instead of storing them (graph.memory_policy). kept:
    layers left as they are (the ignore list), with why: their input and output channels stay, their weights too."""
    t0 = time.perf_counter()
    what, target = next((k, v) for k, v in (("macs", config.keep_macs), ("params", config.keep_params),
                                             ("speedup", config.target_speedup)) if v is not None)
    # (their channels stay in place; they are not re-fitted)
    nonstandard = nonstandard_layers(model, batches[0][:1]) | (kept or {})
    groups = channel_groups(model, batches[0][:1], nonstandard=nonstandard)
    prunable = [g for g, group in enumerate(groups) if group.removable]
    if not prunable:
        raise UserError("no channel of this model can be removed: " + (main_reason(groups) or
                                                                        "it has no Conv2d/Linear producers"))
    consumers = sorted({c for g in prunable for i in groups[g].removable for c in groups[g].units[i].columns})
    t1 = time.perf_counter()
    stats = dense_statistics(model, batches, consumers, hessian=True)
    timings = {"groups": t1 - t0, "hessians": time.perf_counter() - t1}
    t1 = time.perf_counter()
    curves = {}
    for g in tqdm(prunable, desc="channels: OBS cost curves", unit="group", disable=not progress, leave=False):
        n, r = len(groups[g].units), groups[g].unit_step(config.round_to)
        max_remove = min(len(groups[g].removable), max(0, n - r))
        if max_remove > 0:
            curves[g] = _cost_curve(groups[g], stats, config.percdamp, max_remove, r)
    timings["cost_curves"] = time.perf_counter() - t1
    counters = {kind: Counter(model, groups, positions, kind) for kind in ("macs", "params")}
    if config.channel_costs == "kl":
        t1 = time.perf_counter()
        curves = measured_curves(model, groups, curves, stats, batches, config.percdamp, config.round_to,
                                 config.batch_size, counters["macs"].total({}), progress, config.outputs)
        timings["output_costs"] = time.perf_counter() - t1
    latency = None
    if what == "speedup":
        t1 = time.perf_counter()
        removed, latency = speedup_allocation(model, groups, curves, positions, config, batches[0][:1], progress)
        timings["latency_search"] = time.perf_counter() - t1
    else:
        removed = allocate(groups, curves, counters[what], target, config.round_to)
    t1 = time.perf_counter()
    modules = dict(model.named_modules())
    drop_cols, drop_rows, drop_entries = removal_plan(groups, chosen_units(curves, removed))
    before = {n: list(m.weight.shape) for n, m in modules.items() if isinstance(m, (nn.Conv2d, nn.Linear))}
    dense = DenseInputs(model, batches) if config.dense_target else None  # a frozen copy of the dense model
    order = [n for n in positions if n not in nonstandard and (isinstance(modules[n], nn.Linear) or  # forward order
             (isinstance(modules[n], nn.Conv2d) and (modules[n].groups == 1 or before[n][1] > 1)))]  # not depthwise
    first = next((i for i, n in enumerate(order) if n in drop_cols), len(order))
    refit_later = set(order[first:]) if dense is not None else set()  # the dense target's pass solves them anew
    unfitted = {}  # layers left as sliced: too few calibration samples per input for a re-fit
    for c, cols in drop_cols.items():  # re-fit each consumer's kept weights to its dense output
        if c not in refit_later:
            p = stats[c]
            blocks = unit_blocks(p, [sorted(set(cols))]).flatten()
            enough = p.nsamples >= MIN_SAMPLES_PER_INPUT * p.d
            if not enough:
                unfitted[c] = few_samples(p.nsamples, p.d)
            p.layer.weight.data.copy_(consumer_weight(p, blocks, config.percdamp, refit=enough))
    for s in stats.values():
        s.free()
    slice_channels_(model, drop_cols, drop_rows, drop_entries)
    timings["refit_and_slice"] = time.perf_counter() - t1
    if dense is not None:  # the consumers' one-pass re-fit assumed dense inputs: fit the network as it now runs
        t1 = time.perf_counter()
        kept_rows = {n: kept_indices(before[n][0], r) for n, r in drop_rows.items()}
        unfitted |= refit_to_dense_outputs(model, dense, batches, order[first:], kept_rows, config.percdamp,
                                           config.bn_recalibration, config.intercept, low_memory)
        timings["dense_refit"] = time.perf_counter() - t1
    if unfitted:
        warnings.warn(f"{len(unfitted)} layer{'s' * (len(unfitted) > 1)} ({', '.join(list(unfitted)[:3])}"
                      f"{', ...' * (len(unfitted) > 3)}) left as sliced, without a re-fit: "
                      f"{next(iter(unfitted.values()))}, a re-fit would fit these calibration images and not others; "
                      "give more calibration images (report.structure['not_refitted'] lists them)", RuntimeWarning)
    t1 = time.perf_counter()
    bns = bn_modules(model)
    if config.bn_recalibration and bns and dense is None:  # the re-fit's pass re-estimated them already
        recalibrate(bns, model, batches)
    timings["bn_recalibration"] = time.perf_counter() - t1
    changed = set(drop_cols) | set(drop_rows) | set(drop_entries)
    after = {n: list(m.weight.shape) for n, m in modules.items() if isinstance(m, (nn.Conv2d, nn.Linear))}
    return StructureReport(
        target={what: target},
        macs=(counters["macs"].total({}), counters["macs"].total(removed)),
        params=(counters["params"].total({}), counters["params"].total(removed)),
        groups=[{"producers": groups[g].producers, "channels": len(groups[g].units) * groups[g].width,
                 "kept": (len(groups[g].units) - removed.get(g, 0)) * groups[g].width, "per_unit": groups[g].width,
                 "cost": curves[g][1][removed[g] - 1] if removed.get(g) else 0.0,
                 "fixed": groups[g].reason} for g in range(len(groups))],
        layers=[{"name": n, "shape_before": before[n], "shape_after": after[n]} for n in before],
        spec={n: spec_entry(model, n) for n in sorted(changed, key=lambda n: list(modules).index(
            n if n in modules else n.rpartition(".")[0]))},  # (a per-channel attribute: at its module)
        timings=timings, latency=latency, not_refitted=unfitted)
