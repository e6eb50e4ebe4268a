"""Issue 21, a study (not a feature): calibration images weighted by how much the dense network's prediction on each
can move. A logit error δ on an image costs about ½ δᵀ(diag p − ppᵀ)δ in KL, whose trace 1 − Σp² is near 0 where
the network is sure; the test split has more unsure images than the (fitted) training images, so weighting the
unsure ones up might carry a prune's gains to the test split. The weights go in as repeats of the same 1024 images
(systematic resampling, weight ∝ 1 − Σ softmax(z/T)², T a temperature), so every layer's Hessian, dense target and
BatchNorm re-estimate see them; the default recipe beside it on the same images. ResNet-20, 2:4 by default, top-1 on
5,000 held-out training images (the test split is not read).

    python benchmarks/weighted_calibration_holdout.py --data-dir ../shared/data \\
        --json experiments/weighted_calibration_holdout.json
"""
from __future__ import annotations

import torch

from cnn_sparsegpt import calibration_set
from cnn_sparsegpt.utils import atomic_write_json, run_metadata
# this directory is sys.path[0] for a script
from holdout_study import held_out_resnet20, pattern_arguments, pruned_top1, study_parser


@torch.no_grad()
def repeats(model: torch.nn.Module, images: torch.Tensor, temperature: float) -> torch.Tensor:
    """How often each image appears among len(images) draws: systematic resampling by 1 − Σ softmax(z/T)²."""
    p = torch.cat([model(x) for x in images.split(256)]).div(temperature).softmax(1)
    w = 1 - p.square().sum(1)
    ends = torch.floor(torch.cumsum(w / w.sum() * len(images), 0) + 0.5).long()
    return torch.diff(ends, prepend=torch.zeros(1, dtype=torch.long))


def main() -> None:
    p = study_parser(__doc__, seeds="0,1,2,3,4,5,6,7,8,9")
    p.add_argument("--pattern", default="2:4")
    p.add_argument("--temperatures", default="2,3")
    args = p.parse_args()
    dense, train, held_out = held_out_resnet20(args)
    key = pattern_arguments(args.pattern)
    rows = []
    for seed in map(int, args.seeds.split(",")):
        calib = calibration_set(train, 1024, seed)
        row = {"seed": seed, "pattern": args.pattern}
        for t in ["default", *args.temperatures.split(",")]:
            images = calib
            if t != "default":
                n = repeats(dense, calib, float(t))
                images = calib.repeat_interleave(n, 0)
                row[f"distinct T={t}"] = int((n > 0).sum())
            row["default" if t == "default" else f"weighted T={t}"] = pruned_top1(dense, images, held_out, key)[0]
        rows.append(row)
        print(row, flush=True)
        atomic_write_json({"rows": rows, **run_metadata(torch.device("cpu"))}, args.json)


if __name__ == "__main__":
    main()
