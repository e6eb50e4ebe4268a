"""Channel permutations before an N:M prune (config.permute): each dependency group's channels are reordered so
that its consumers' N:M groups hold channels whose weights an N:M mask can keep more of (kernels/nm_permute.py).

The order is chosen on the dense network, before anything is pruned: a group's channels feed several consumers
(a ResNet stage's residual stream feeds every block), and a consumer pruned already could not follow a later
reordering. Each weight's saliency is w²·mean(x²) over the dense calibration inputs (one dense pass, column sums
only), relative to the layer's output energy so that consumers of one group compare: chosen over the OBS cost
w²/[H⁻¹]ₖₖ and the magnitude on held-out images (docs/RESULTS.md). The permuted network computes the
same function; model.pt holds it in the new order (same shapes), and the report lists what moved.

By default (config.permute None: auto) only the groups whose pruned consumers all take the swap refinement are
reordered: that pair is what held-out images chose, and a wide group's search (~channels²) costs most where neither
was measured to gain (ResNet-18's 512-channel groups).
"""
from __future__ import annotations

import time

import torch
from torch import nn
from tqdm.auto import tqdm

from ..kernels.masks import Pattern
from ..kernels.nm_permute import kept_saliency, permutation_search
from ..kernels.refine import swaps as swap_takes
from ..utils import UserError
from .allocation import dense_statistics
from .channels import Group, channel_groups
from .slicing import permute_channels_


def _saliencies(model: nn.Module, batches: list[torch.Tensor], consumers: list[str]) -> dict[str, torch.Tensor]:
    """Per consumer, (rows·taps, in_channels): each weight's w²·mean(x²) on the dense calibration inputs (its output
    error alone, without OBS updates: Wanda's and OBD's diagonal measure) over the layer's output energy
    mean(‖Wx‖²), so that the consumers of one group compare. One dense pass, column sums and outputs only."""
    modules = dict(model.named_modules())
    energy = {c: torch.zeros((), dtype=torch.float64) for c in consumers}

    def output_energy(c):
        def hook(m, inp, out):
            if m.bias is not None:  # a Linear's outputs end with its channels (channels-last too), a conv's at dim 1
                out = out - (m.bias if isinstance(m, nn.Linear) else m.bias.reshape(-1, *[1] * (out.dim() - 2)))
            # float64 accumulation without a float64 copy of the activation (3× faster than out.double())
            energy[c] += torch.linalg.vector_norm(out, dtype=torch.float64).square().cpu()
        return hook

    handles = [modules[c].register_forward_hook(output_energy(c)) for c in consumers]
    try:  # the same pass as the allocation's column sums, with the outputs' energy beside them
        stats = dense_statistics(model, batches, consumers, hessian=False)
    finally:
        for h in handles:
            h.remove()
    out = {}
    for c, p in stats.items():
        Wg, _ = p.weight_matrix()  # (1, rows, taps·cin), columns tap-major: N:M groups along input channels
        cost = Wg[0].double() ** 2 * p.hessian_diagonal()[0].double()  # H's diagonal: 2·mean(x²)
        total = float(2 * energy[c] / max(p.nsamples, 1)) or 1.0
        out[c] = (cost / total).reshape(-1, p.layer.weight.shape[1]).float()  # (rows, taps, cin) -> rows·taps, cin
    return out


def _consumer_columns(group: Group, consumer: str, m: int) -> torch.Tensor | None:
    """The group's columns in `consumer` by position j, if each unit owns one column and they are consecutive from
    a multiple of M over a multiple of M (so the consumer's N:M groups are the group's positions in fours); else
    None (e.g. Res2Net's 26-channel splits, which share an N:M group of the concatenation with the next split)."""
    cols = [u.columns.get(consumer, []) for u in group.units]
    if len(cols) % m or any(len(c) != 1 for c in cols):
        return None
    first = cols[0][0]
    return torch.tensor([c[0] for c in cols]) if first % m == 0 and \
        all(c[0] == first + j for j, c in enumerate(cols)) else None


def _swapped(module: nn.Module) -> bool:
    """Whether the swap refinement takes this layer (its weight as the solver sees it: rows, in·kh·kw)."""
    return swap_takes(module.weight.shape[0], module.weight[0].numel())


def permute_for_nm_(model: nn.Module, batches: list[torch.Tensor], names: list[str], pattern: Pattern,
                    progress: bool = False, every_group: bool = True, nonstandard: dict | None = None) -> dict:
    """Reorder the channels of every group some pruned layer reads (names) so that the N:M masks of those layers
    keep more saliency (every_group False: only groups whose pruned consumers all take the swap refinement);
    returns what was done (per group: its producers, swaps, kept saliency before and after)."""
    t0 = time.perf_counter()
    modules = dict(model.named_modules())
    if not every_group and not any(_swapped(modules[n]) for n in names):
        return {"groups": [], "seconds": 0.0, "every_group": False, "left_wide": [], "note": "no layer within the "
                "swap's budget"}
    try:
        groups = [g for g in channel_groups(model, batches[0][:1], "permute (channel order for N:M)", nonstandard)
                  if len(g.units) > pattern.m and not g.reason and len(g.removable) == len(g.units)
                  and all(u.rows.keys() == g.units[0].rows.keys() and u.columns.keys() == g.units[0].columns.keys()
                          and u.entries.keys() == g.units[0].entries.keys() for u in g.units)]  # (not across a
        # concatenation's parts: a unit cannot take the place of one with other producers, readers or entries)
    except UserError as e:
        if every_group:
            raise
        return {"groups": [], "seconds": time.perf_counter() - t0, "every_group": False, "left_wide": [],
                "note": f"not permuted: {e}"}  # auto: an untraceable model is pruned in its own order
    pruned = set(names)
    reads = {}  # group index -> [(consumer, its columns by position)]
    for gi, g in enumerate(groups):
        for c in g.units[0].columns:
            m = modules[c]
            if c in pruned and getattr(m, "groups", 1) == 1 and m.weight.shape[1] % pattern.m == 0:
                cols = _consumer_columns(g, c, pattern.m)
                if cols is not None:
                    reads.setdefault(gi, []).append((c, cols))
    wide = {gi for gi, r in reads.items() if not every_group and not all(_swapped(modules[c]) for c, _ in r)}
    reads = {gi: r for gi, r in reads.items() if gi not in wide}
    consumers = sorted({c for r in reads.values() for c, _ in r})
    saliency = _saliencies(model, batches, consumers) if consumers else {}
    done = []
    for gi in tqdm(sorted(reads), desc="N:M permutations", disable=not progress, leave=False):
        g = groups[gi]
        S = torch.cat([saliency[c][:, cols] for c, cols in reads[gi]])
        order, swaps = permutation_search(S, pattern.n, pattern.m)
        before, after = kept_saliency(S, pattern.n, pattern.m), kept_saliency(S, pattern.n, pattern.m, order)
        if swaps:
            permute_channels_(model, g, order.tolist())
        done.append({"producers": g.producers, "channels": len(g.units), "consumers": [c for c, _ in reads[gi]],
                     "swaps": swaps, "kept_before": before, "kept_after": after,
                     "pruned_before": float(S.sum()) - before, "pruned_after": float(S.sum()) - after})
    return {"groups": done, "seconds": time.perf_counter() - t0, "every_group": every_group,
            "left_wide": [groups[gi].producers for gi in sorted(wide)]}
