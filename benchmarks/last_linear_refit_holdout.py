"""Issue 21, a study (not a feature): after the recommended prune, re-fit the dense last linear layer by least squares
to the dense network's logits on the calibration images (min ‖Ŵx̂ + b̂ − (Wx + b)‖², damped like a layer's Hessian).
ResNet-20, 1024 calibration images, three seeds, top-1 on 5,000 held-out training images (the test split is not read).

    python benchmarks/last_linear_refit_holdout.py --data-dir ../shared/data \\
        --json experiments/last_linear_refit_holdout.json
"""
from __future__ import annotations

import copy

import torch
from torch import nn

from cnn_sparsegpt import calibration_set, evaluate, prune_model
from cnn_sparsegpt.utils import atomic_write_json, run_metadata
# this directory is sys.path[0] for a script
from holdout_study import held_out_resnet20, pattern_arguments, study_parser


@torch.no_grad()
def linear_io(model: nn.Module, linear: nn.Module, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The linear layer's inputs and outputs over the images, float64."""
    seen = []
    hook = linear.register_forward_hook(lambda _m, i, o: seen.append((i[0], o)))
    for x in images.split(256):
        model(x)
    hook.remove()
    return torch.cat([s[0] for s in seen]).double(), torch.cat([s[1] for s in seen]).double()


def refit_(linear: nn.Linear, X: torch.Tensor, T: torch.Tensor, percdamp: float) -> None:
    """Weights and bias of `linear` ← the damped least-squares fit of targets T (N, out) from inputs X (N, in)."""
    Xa = torch.cat([X, torch.ones(len(X), 1, dtype=X.dtype)], 1)
    H = Xa.T @ Xa
    H += percdamp * H.diagonal()[:-1].mean() * torch.eye(len(H), dtype=H.dtype)
    Wb = torch.linalg.solve(H, Xa.T @ T).T
    linear.weight.copy_(Wb[:, :-1])
    linear.bias.copy_(Wb[:, -1])


def main() -> None:
    p = study_parser(__doc__, seeds="0,1,2")
    p.add_argument("--patterns", default="0.7,0.9,2:4")
    p.add_argument("--percdamp", type=float, default=0.01)
    args = p.parse_args()
    dense, train, held_out = held_out_resnet20(args)
    name = [n for n, m in dense.named_modules() if isinstance(m, nn.Linear)][-1]
    rows = []
    for seed in map(int, args.seeds.split(",")):
        calib = calibration_set(train, 1024, seed)
        _, targets = linear_io(dense, dict(dense.named_modules())[name], calib)
        for pattern in args.patterns.split(","):
            model = copy.deepcopy(dense)
            prune_model(model, calib, progress=False, **pattern_arguments(pattern))
            before = evaluate(model, held_out, "cpu", 500, False)
            linear = dict(model.named_modules())[name]
            with torch.no_grad():
                refit_(linear, linear_io(model, linear, calib)[0], targets, args.percdamp)
            after = evaluate(model, held_out, "cpu", 500, False)
            rows.append({"seed": seed, "pattern": pattern, "recommended": before, "last_linear_refit": after})
            print(rows[-1], flush=True)
            atomic_write_json({"percdamp": args.percdamp, "rows": rows, **run_metadata(torch.device("cpu"))}, args.json)


if __name__ == "__main__":
    main()
