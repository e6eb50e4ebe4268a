"""Issue 21, a study: the dense target weighed per output position, by the dense network's ReLU or by its Fisher.

A conv's output reaches the next layer through BatchNorm and a ReLU (in a residual block: BatchNorm, the skip's sum,
then the ReLU). Where the dense network's ReLU output is 0, a pruned output that stays below zero costs nothing
downstream, yet the layer-wise problem min Σ_t (w·x_d,t − ŵ·x_p,t)² counts it like any other. Here each output
row r weighs position t by g_rt = 1 where the dense ReLU passes and α where it does not (α = 1: the plain dense
target), so each row gets its own Hessian H_r = Σ_t g_rt x_t x_tᵀ and target, solved with the project's exact OBS
greedy (one row per group: each row prunes the layer's fraction; the project's solver allocates across rows) and the
cg re-solve on the mask. Layers in order, each fed the pruned network; every BatchNorm re-estimated after each
layer. α = 0 (only active outputs count) lost 0.36 points at 2:4 (SparseGPT's solver, seed 0) in a first try: a
pruned output that turns positive where the dense one was negative does cost, so α stays above 0.

ResNet-20, 1024 calibration images, first conv and fc dense, top-1 on 5,000 held-out training images (the test split
is not read); rows are appended as they finish and rows already in the file are skipped (an interrupted run resumes).

`--weighting fisher` weighs position t of row r instead by the dense network's Fisher, as BRECQ's block reconstruction
does: f_rt = E_y (∂ℓ/∂z_rt)², z the conv's output, ℓ the cross-entropy of a label y drawn from the dense network's
own softmax (exactly: Σ_y p_y (∂ℓ_y/∂z_rt)², ten backward passes), normalized to mean 1 per row (a row's scale does not
move its solve) and mixed as g_rt = α + (1 − α)·f_rt. It sees everything the ReLU gate sees (∂ℓ/∂z is 0 where the
dense ReLU is off, unless a skip's sum decides) and also how much each active output moves the loss.

    python benchmarks/relu_gated_target.py --data-dir ../shared/data --json experiments/relu_gated_target_holdout.json
    python benchmarks/relu_gated_target.py --data-dir ../shared/data --weighting fisher --patterns 2:4,0.9 \
        --json experiments/fisher_weighted_target_holdout.json
"""
from __future__ import annotations

import copy
import json
import os
import time

import torch
import torch.nn.functional as F
from torch import nn

from cnn_sparsegpt import Pattern, calibration_set, evaluate
from cnn_sparsegpt.kernels.exact_obs import exact_obs_solve
from cnn_sparsegpt.kernels.linalg import damped
from cnn_sparsegpt.kernels.refine import cg_on_mask
from cnn_sparsegpt.pruning.batchnorm import bn_modules, recalibrate
from cnn_sparsegpt.utils import atomic_write_json, run_metadata
from holdout_study import held_out_resnet20, study_parser  # this directory is sys.path[0] for a script

CHUNK_BYTES = 128 * 2**20  # of the (rows, d, columns) gated copy per product


def layers_and_gates(model: nn.Module) -> list[tuple[str, str]]:
    """ResNet-20's pruned convs in order, each with the module whose dense output's sign is its ReLU's: a block's
    conv1 → its bn1; conv2 and the projection shortcut → the block (its output is the ReLU of the sum)."""
    out = []
    for stage in ("layer1", "layer2", "layer3"):
        for i, block in enumerate(getattr(model, stage)):
            name = f"{stage}.{i}"
            out += [(f"{name}.conv1", f"{name}.bn1"), (f"{name}.conv2", name)]
            if len(block.shortcut):
                out.append((f"{name}.shortcut.0", name))
    return out


@torch.no_grad()
def captured(model: nn.Module, name: str, images: torch.Tensor, output: bool) -> torch.Tensor:
    """A module's input (output) over the images."""
    seen = []
    hook = dict(model.named_modules())[name].register_forward_hook(
        lambda _m, i, o: seen.append(o if output else i[0]))
    for x in images.split(256):
        model(x)
    hook.remove()
    return torch.cat(seen)


def fisher(model: nn.Module, names: list[str], images: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per module of `names`, Σ_y p_y (∂ℓ_y/∂z)² over its output z (shaped as z, over the images), ℓ_y the
    cross-entropy of label y and p the model's softmax: the diagonal of the Fisher at z, one backward per class."""
    modules, z, out = dict(model.named_modules()), {}, {n: [] for n in names}
    hooks = [modules[n].register_forward_hook(lambda _m, _i, o, n=n: z.__setitem__(n, o)) for n in names]
    for x in images.split(128):
        logp = F.log_softmax(model(x), 1)
        root_p = logp.detach().exp().sqrt()  # (√p_y ∂ℓ_y/∂z)² = p_y (∂ℓ_y/∂z)²
        total = {n: torch.zeros_like(z[n]) for n in names}
        for y in range(logp.shape[1]):
            grads = torch.autograd.grad(-(root_p[:, y] * logp[:, y]).sum(), [z[n] for n in names], retain_graph=True)
            for n, g in zip(names, grads):
                total[n] += g ** 2
        for n in names:
            out[n].append(total[n])
    for h in hooks:
        h.remove()
    return {n: torch.cat(v) for n, v in out.items()}


def position_weights(weighting: str, gate: torch.Tensor, alpha: float) -> torch.Tensor:
    """g (N, rows, H, W) from the dense ReLU's input `gate` (relu: α where it is ≤ 0, else 1) or from the Fisher
    (fisher: α + (1 − α)·f, f normalized to mean 1 per row)."""
    if weighting == "relu":
        return alpha + (1 - alpha) * (gate > 0).float()
    return alpha + (1 - alpha) * gate / gate.mean((0, 2, 3), keepdim=True)


def columns(x: torch.Tensor, conv: nn.Conv2d) -> torch.Tensor:
    """im2col columns (d, T), rows in the (kh, kw, in) order of the weight matrix below."""
    k, c = conv.kernel_size[0], x.shape[1]
    u = F.unfold(x, conv.kernel_size, padding=conv.padding, stride=conv.stride)
    n, _, positions = u.shape
    return u.view(n, c, k * k, positions).transpose(1, 2).reshape(n, k * k * c, positions).transpose(0, 1).reshape(
        k * k * c, -1)


@torch.no_grad()
def gated_sums(conv: nn.Conv2d, xp: torch.Tensor, xd: torch.Tensor, weights: torch.Tensor | None
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row r: H_r = 2/N Σ g_rt x_t x_tᵀ and b_r = 2/N Σ g_rt (w_r·x_d,t) x_t (float32, summed in float64), g the
    position weights shaped as the conv's output (None: all 1, one H for every row)."""
    W = conv.weight.permute(0, 2, 3, 1).reshape(conv.out_channels, -1)
    rows, d = W.shape
    H = torch.zeros(d, d, dtype=torch.float64) if weights is None else torch.zeros(rows, d, d, dtype=torch.float64)
    b = torch.zeros(rows, d, dtype=torch.float64)
    n = 0
    for i in range(0, len(xp), 64):
        X, Xd = columns(xp[i:i + 64], conv), columns(xd[i:i + 64], conv)
        if weights is None:
            H += (X @ X.T).double()
            b += ((W @ Xd) @ X.T).double()
        else:
            g = weights[i:i + 64].transpose(0, 1).reshape(rows, -1)
            b += ((g * (W @ Xd)) @ X.T).double()
            step = max(1, CHUNK_BYTES // (4 * rows * d))
            for t in range(0, X.shape[1], step):
                Xt = X[:, t:t + step]
                H += torch.bmm(g[:, None, t:t + step] * Xt, Xt.T.expand(rows, -1, -1)).double()
        n += X.shape[1]
    return (2 * H.expand(rows, d, d) / n).float(), (2 * b / n).float()


@torch.no_grad()
def prune_gated(dense: nn.Module, calib: torch.Tensor, pattern: Pattern, alpha: float, percdamp: float,
                gates: dict[str, torch.Tensor], weighting: str) -> nn.Module:
    """Layers in order; `gates` per conv: its dense ReLU's input (relu) or its output's Fisher (fisher)."""
    model = copy.deepcopy(dense)
    for conv_name, _ in layers_and_gates(dense):
        conv = dict(model.named_modules())[conv_name]
        xp, xd = captured(model, conv_name, calib, False), captured(dense, conv_name, calib, False)
        weights = None if alpha == 1 else position_weights(weighting, gates[conv_name], alpha)
        H, b = gated_sums(conv, xp, xd, weights)
        rows, d = b.shape
        Hd = damped(H, percdamp)
        target = torch.linalg.solve(Hd, b[:, :, None])[:, :, 0]  # each row's unconstrained fit
        # one row per group: (rows, 1, d) against (rows, d, d)
        Q, pruned, _ = exact_obs_solve(target[:, None, :], H, pattern, percdamp)
        Q = cg_on_mask(target[:, None, :], Q, pruned, Hd)[:, 0]
        k = conv.kernel_size[0]
        conv.weight.copy_(Q.view(rows, k, k, -1).permute(0, 3, 1, 2))
        recalibrate(bn_modules(model), model, calib.split(256))
    return model


def main() -> None:
    p = study_parser(__doc__, seeds="0,1,2")
    p.add_argument("--patterns", default="2:4,0.9,0.7", help="comma-separated: sparsities or N:M")
    p.add_argument("--alphas", default="1.0,0.3", help="weights of inactive outputs, comma-separated (1: plain)")
    p.add_argument("--weighting", choices=("relu", "fisher"), default="relu",
                   help="what weighs the positions: the dense ReLU (α where off) or the dense Fisher (mixed with α)")
    p.add_argument("--percdamp", type=float, default=0.01, help="damping, a fraction of mean(diag H)")
    args = p.parse_args()
    dense, train, held_out = held_out_resnet20(args)
    rows = json.load(open(args.json))["rows"] if os.path.exists(args.json) else []
    done = {(r["seed"], r["pattern"], r["alpha"], r.get("weighting", "relu")) for r in rows}
    names = [conv for conv, _ in layers_and_gates(dense)]
    for pattern in args.patterns.split(","):
        for seed in map(int, args.seeds.split(",")):
            calib = calibration_set(train, 1024, seed)
            gates = None
            for alpha in map(float, args.alphas.split(",")):
                if (seed, pattern, alpha, args.weighting) in done:
                    continue
                if gates is None and args.weighting == "fisher":
                    gates = fisher(dense, names, calib)
                elif gates is None:
                    gates = {conv: captured(dense, gate, calib, True) for conv, gate in layers_and_gates(dense)}
                pat = Pattern(n=int(pattern.split(":")[0]), m=int(pattern.split(":")[1])) if ":" in pattern \
                    else Pattern(sparsity=float(pattern))
                t0 = time.perf_counter()
                model = prune_gated(dense, calib, pat, alpha, args.percdamp, gates, args.weighting)
                seconds = time.perf_counter() - t0
                rows.append({"seed": seed, "pattern": pattern, "alpha": alpha, "weighting": args.weighting,
                             "seconds": seconds,
                             "holdout_top1": 100 * evaluate(model, held_out, "cpu", 500, False),
                             "git_commit": run_metadata(torch.device("cpu"))["git_commit"]})
                print(rows[-1], flush=True)
                atomic_write_json({"percdamp": args.percdamp, "nsamples": 1024, "rows": rows,
                                   **run_metadata(torch.device("cpu"))}, args.json)


if __name__ == "__main__":
    main()
