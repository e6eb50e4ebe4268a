"""Issue 21, a study (not a feature): is the N:M channel permutation's greedy search (kernels/nm_permute.py) the
limit of `--permute`? For each group the default permutes on ResNet-20 at 2:4 (the same saliency matrices S,
captured from permute_for_nm_ on the dense network and the training images left after the 5,000 held out), the
saliency an N:M mask must prune is compared: in the training order, after the greedy swaps, and after an iterated
local search (from the best order so far, a random 1/8 of the channels shuffled among themselves, the greedy run
again, the better order kept; `--rounds` times). No accuracy is measured: where the search prunes little less than
the greedy, a deeper search has nothing to give the network either.

    python benchmarks/permutation_search_depth.py --data-dir ../shared/data \
        --json experiments/permutation_search_depth.json
"""
from __future__ import annotations

import copy
import time
from unittest import mock

import torch

from cnn_sparsegpt import calibration_set
from cnn_sparsegpt.kernels.masks import Pattern
from cnn_sparsegpt.kernels.nm_permute import kept_saliency, permutation_search
from cnn_sparsegpt.pruning import permute
from cnn_sparsegpt.utils import atomic_write_json, run_metadata
from holdout_study import held_out_resnet20, study_parser  # this directory is sys.path[0] for a script


def pruned(S: torch.Tensor, pattern: Pattern, order: torch.Tensor | None = None) -> float:
    """The saliency an N:M mask prunes from S under `order` (the identity where None)."""
    return float(S.sum()) - kept_saliency(S, pattern.n, pattern.m, order)


def searched(S: torch.Tensor, pattern: Pattern, rounds: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(the greedy's order, the iterated local search's best order) for S."""
    greedy, _ = permutation_search(S, pattern.n, pattern.m)
    best, best_value = greedy, pruned(S, pattern, greedy)
    g = torch.Generator().manual_seed(seed)
    C = S.shape[1]
    for _ in range(rounds):
        order = best.clone()
        picked = torch.randperm(C, generator=g)[:max(2, C // 8)]
        order[picked] = order[picked[torch.randperm(len(picked), generator=g)]]
        again, _ = permutation_search(S[:, order], pattern.n, pattern.m)
        candidate = order[again]
        value = pruned(S, pattern, candidate)
        if value < best_value - 1e-12:
            best, best_value = candidate, value
    return greedy, best


def main() -> None:
    p = study_parser(__doc__, "0")
    p.add_argument("--nm", default="2:4")
    p.add_argument("--rounds", type=int, default=30, help="perturb-and-search restarts per group")
    args = p.parse_args()
    pattern = Pattern.parse(nm=args.nm)
    dense, train, _ = held_out_resnet20(args)
    names = [n for n, m in dense.named_modules() if isinstance(m, torch.nn.Conv2d) and n != "conv1"]
    rows = []
    for seed in map(int, args.seeds.split(",")):
        batches = list(calibration_set(train, 1024, seed=seed).split(128))
        captured = []

        def capture(S, n, m, *a, **k):
            captured.append(S.clone())
            return permutation_search(S, n, m, *a, **k)

        with mock.patch.object(permute, "permutation_search", capture):
            permute.permute_for_nm_(copy.deepcopy(dense), batches, names, pattern)
        for gi, S in enumerate(captured):
            t0 = time.perf_counter()
            greedy, best = searched(S, pattern, args.rounds, seed=gi)
            rows.append({"seed": seed, "group": gi, "channels": S.shape[1], "rows": S.shape[0],
                         "pruned_identity": pruned(S, pattern), "pruned_greedy": pruned(S, pattern, greedy),
                         "pruned_search": pruned(S, pattern, best), "search_seconds": time.perf_counter() - t0})
            r = rows[-1]
            print(f"seed {seed} group {gi} ({r['channels']} channels): pruned saliency {r['pruned_identity']:.4f} "
                  f"-> greedy {r['pruned_greedy']:.4f} -> search {r['pruned_search']:.4f}")
    total = {k: sum(r[k] for r in rows) for k in ("pruned_identity", "pruned_greedy", "pruned_search")}
    summary = {"greedy_vs_identity": total["pruned_greedy"] / total["pruned_identity"] - 1,
               "search_vs_greedy": total["pruned_search"] / total["pruned_greedy"] - 1}
    print(f"pruned saliency, all groups: greedy {summary['greedy_vs_identity']:+.2%} against the training order, "
          f"the search {summary['search_vs_greedy']:+.2%} against the greedy")
    atomic_write_json({"nm": args.nm, "rounds": args.rounds, "rows": rows, "summary": summary,
                       **run_metadata(torch.device("cpu"))}, args.json)


if __name__ == "__main__":
    main()
