"""Issue 21, a study (not a feature): calibration images augmented as in training. OBC's published runs accumulate
their Hessians over ten rounds of the calibration images, each round freshly augmented (`--nrounds`, main_trueobs.py;
random crop and flip): the same 1,024 images, more positions. Here the 1,024 unaugmented images plus copies go
through the whole default recipe (Hessians, dense targets, BatchNorm re-estimation): `flip` adds each image's
mirror image (2,048), `roundsR` adds R−1 copies with CIFAR's training augmentation (4-pixel reflect-padded random
crop and flip). The default beside them on the same images; ResNet-20, 2:4 by default, top-1 on 5,000 held-out
training images (the test split is not read).

    python benchmarks/augmented_calibration_holdout.py --data-dir ../shared/data \\
        --json experiments/augmented_calibration_holdout.json
"""
from __future__ import annotations

import torch

from cnn_sparsegpt import calibration_set
from cnn_sparsegpt.data.datasets import calibration_indices
from cnn_sparsegpt.utils import atomic_write_json, git_commit, run_metadata
# this directory is sys.path[0] for a script
from holdout_study import held_out_resnet20, pattern_arguments, pruned_top1, study_parser


def calibration_images(train, indices: torch.Tensor, variant: str, seed: int) -> torch.Tensor:
    """The images a variant calibrates on: the unaugmented ones first, then its copies."""
    images = calibration_set(train, len(indices), indices=indices)
    if variant == "flip":
        return torch.cat([images, images.flip(-1)])
    if variant.startswith("rounds"):
        copies = [torch.cat([x for x, _ in train.batches(256, "cpu", indices=indices, augment=True,
                                                         seed=1000 * seed + r)])
                  for r in range(int(variant[len("rounds"):]) - 1)]
        return torch.cat([images, *copies])
    return images


def main() -> None:
    p = study_parser(__doc__, seeds="0,1,2,3,4,5,6,7,8,9")
    p.add_argument("--pattern", default="2:4")
    p.add_argument("--variants", default="default,flip,rounds2,rounds4")
    args = p.parse_args()
    git_commit()  # the code this process loaded, not HEAD when the last row is written
    dense, train, held_out = held_out_resnet20(args)
    key = pattern_arguments(args.pattern)
    rows = []
    for seed in map(int, args.seeds.split(",")):
        indices = calibration_indices(train, 1024, seed)
        row = {"seed": seed, "pattern": args.pattern}
        for variant in args.variants.split(","):
            row[variant], seconds = pruned_top1(dense, calibration_images(train, indices, variant, seed), held_out, key)
            row[f"{variant} seconds"] = round(seconds, 1)
        rows.append(row)
        print(row, flush=True)
        atomic_write_json({"rows": rows, **run_metadata(torch.device("cpu"))}, args.json)


if __name__ == "__main__":
    main()
