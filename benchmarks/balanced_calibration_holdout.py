"""Issue 21, a study (not a feature): calibration images drawn class-balanced (1024 // classes of each class, the
remainder from random classes) instead of uniformly at random, so that no class's features are under-sampled in the
Hessians, the dense targets and the BatchNorm re-estimate. The default draw beside it; ResNet-20, 2:4 by default,
top-1 on 5,000 held-out training images (the test split is not read).

    python benchmarks/balanced_calibration_holdout.py --data-dir ../shared/data \\
        --json experiments/balanced_calibration_holdout.json
"""
from __future__ import annotations

import torch

from cnn_sparsegpt import calibration_set
from cnn_sparsegpt.utils import atomic_write_json, run_metadata
# this directory is sys.path[0] for a script
from holdout_study import held_out_resnet20, pattern_arguments, pruned_top1, study_parser


def balanced_indices(labels: torch.Tensor, n: int, seed: int) -> torch.Tensor:
    """n indices with n // classes of every class (seeded), the rest one each from randomly chosen classes."""
    g = torch.Generator().manual_seed(seed)
    classes = int(labels.max()) + 1
    extra = set(torch.randperm(classes, generator=g)[: n % classes].tolist())
    picks = []
    for c in range(classes):
        members = (labels == c).nonzero().squeeze(1)
        picks.append(members[torch.randperm(len(members), generator=g)[: n // classes + (c in extra)]])
    return torch.cat(picks)[torch.randperm(n, generator=g)]


def main() -> None:
    p = study_parser(__doc__, seeds="0,1,2,3,4,5,6,7,8,9")
    p.add_argument("--pattern", default="2:4")
    args = p.parse_args()
    dense, train, held_out = held_out_resnet20(args)
    key = pattern_arguments(args.pattern)
    rows = []
    for seed in map(int, args.seeds.split(",")):
        row = {"seed": seed, "pattern": args.pattern}
        row["default"] = pruned_top1(dense, calibration_set(train, 1024, seed), held_out, key)[0]
        balanced = calibration_set(train, 1024, indices=balanced_indices(train.labels, 1024, seed))
        row["balanced"] = pruned_top1(dense, balanced, held_out, key)[0]
        rows.append(row)
        print(row, flush=True)
        atomic_write_json({"rows": rows, **run_metadata(torch.device("cpu"))}, args.json)


if __name__ == "__main__":
    main()
