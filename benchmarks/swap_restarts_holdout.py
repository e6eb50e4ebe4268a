"""Issue 21, a study (not a feature): is the 2:4 mask search the limit? The swap (`--refine swap`, kernels/swap.py)
stops at a local minimum of each row's layer error: no single swap of a kept and a pruned weight lowers it. An
iterated local search goes further: from the swap's mask, re-draw the 2:4 choice in a random fraction of each row's
groups, run the swap again from there, and keep per row whichever mask has the lower error; repeat. The default recipe
runs with its swap replaced by this search (the same damped Hessian, dead inputs and groups holding one untouched),
beside the default on the same calibration images. ResNet-20, 1024 calibration images, top-1 on 5,000 held-out
training images (the test split is not read); each row also sums the layer errors (Σ over layers of the rows'
(w − ŵ)ᵀH(w − ŵ) over wᵀHw, the layers in order) after the swap and after the search. Rows are appended as they
finish; rows already in the file are skipped (an interrupted run resumes).

    python benchmarks/swap_restarts_holdout.py --data-dir ../shared/data --json experiments/swap_restarts_holdout.json
"""
from __future__ import annotations

import copy
import json
import os
import time
from unittest import mock

import torch

from cnn_sparsegpt import calibration_set, evaluate, prune_model
from cnn_sparsegpt.kernels import refine
from cnn_sparsegpt.kernels.swap import swap_refine
from cnn_sparsegpt.utils import atomic_write_json, run_metadata
from holdout_study import held_out_resnet20, study_parser  # this directory is sys.path[0] for a script


def row_errors(W: torch.Tensor, Q: torch.Tensor, Hd: torch.Tensor) -> torch.Tensor:
    """Each row's layer error (w − ŵ)ᵀH(w − ŵ), (G, rows), in float64."""
    D = (W - Q).double()
    return torch.einsum("grd,gde,gre->gr", D, Hd.double(), D)


def searched_swap(rounds: int, fraction: float, log: list):
    """A drop-in for swap_refine: the swap, then `rounds` perturb-and-swap restarts kept per row where better; the
    relative layer errors after the swap and after the search go to `log`."""
    def search(W, pruned, Hd, pattern, dead=None):
        Q, p = swap_refine(W, pruned, Hd, pattern, dead)
        e = row_errors(W, Q, Hd)
        first = e.sum()
        if pattern.is_nm:
            gen = torch.Generator(device=W.device).manual_seed(0)  # the same restarts on every run
            G, rows, d = W.shape
            m, nb = pattern.m, d // pattern.m
            fixed = torch.zeros(G, 1, nb, dtype=torch.bool, device=W.device) if dead is None \
                else dead.view(G, 1, nb, m).any(-1)
            for _ in range(rounds):
                redraw = (torch.rand(G, rows, nb, generator=gen, device=W.device) < fraction) & ~fixed
                drawn = torch.rand(G, rows, nb, m, generator=gen, device=W.device).argsort(-1).argsort(-1) \
                    < m - pattern.n  # m − n random inputs of the group pruned
                start = torch.where(redraw[..., None], drawn, p.view(G, rows, nb, m)).view(G, rows, d)
                Qs, ps = swap_refine(W, start, Hd, pattern, dead)
                es = row_errors(W, Qs, Hd)
                better = es < e
                e = torch.where(better, es, e)
                Q = torch.where(better[..., None], Qs, Q)
                p = torch.where(better[..., None], ps, p)
        total = torch.einsum("grd,gde,gre->", W.double(), Hd.double(), W.double())
        log.append(((first / total).item(), (e.sum() / total).item()))
        return Q, p
    return search


def main() -> None:
    p = study_parser(__doc__, seeds="0,1,2,3,4,5,6,7,8,9")
    p.add_argument("--pattern", default="2:4")
    p.add_argument("--rounds", type=int, default=8, help="restarts after the swap")
    p.add_argument("--fraction", type=float, default=0.15, help="fraction of each row's groups re-drawn per restart")
    args = p.parse_args()
    dense, train, held_out = held_out_resnet20(args)
    rows = json.load(open(args.json))["rows"] if os.path.exists(args.json) else []
    done = {(r["seed"], r["pattern"], r["rounds"], r["fraction"]) for r in rows}
    for seed in map(int, args.seeds.split(",")):
        if (seed, args.pattern, args.rounds, args.fraction) in done:
            continue
        calib = calibration_set(train, 1024, seed)
        row = {"seed": seed, "pattern": args.pattern, "rounds": args.rounds, "fraction": args.fraction}
        for name, rounds in (("default", 0), ("search", args.rounds)):
            log: list = []
            model = copy.deepcopy(dense)
            t = time.perf_counter()
            with mock.patch.object(refine, "swap_refine", searched_swap(rounds, args.fraction, log)):
                prune_model(model, calib, progress=False, nm=args.pattern)
            row[f"{name}_seconds"] = time.perf_counter() - t
            row[name] = 100 * evaluate(model, held_out, "cpu", 500, False)
            row[f"{name}_layer_error"] = [e for _, e in log]
            if name == "search":
                row["swap_layer_error"] = [e for e, _ in log]
        rows.append(row)
        print({k: v for k, v in row.items() if not k.endswith("layer_error")}, flush=True)
        atomic_write_json({"rows": rows, **run_metadata(torch.device("cpu"))}, args.json)


if __name__ == "__main__":
    main()
