"""The same prune under two versions of the library, side by side: a base commit (checked out into a temporary
git worktree) against the working tree, each prune in a fresh process, the two alternating, time per phase and
peak RSS of each. This machine is shared and noisy; only such pairs say whether a change made a prune faster.

    python benchmarks/commit_ab.py --base 3c77804 --arch resnet50 --nsamples 256 --json experiments/x.json

The prunes are heap_reuse.py's (ResNet-18 on the shared checkpoint and CIFAR training images, ResNet-50 at 224² on
random weights and images; SparseGPT 2:4 as published unless --recipe recommended), with the library's defaults.
With --keep-macs F the prune is `--structure channels` to F of the multiply-adds instead, and each row also holds a
digest of the pruned weights (equal digests: bit-identical models):

    python benchmarks/commit_ab.py --base 0f1c9a7 --keep-macs 0.5 --nsamples 512 --recipe recommended --json ...
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def worker(args: argparse.Namespace) -> None:
    """In a fresh process whose PYTHONPATH puts one version's src/ first: one prune, its row on stdout."""
    import cnn_sparsegpt
    from heap_reuse import one_prune  # this directory is sys.path[0] for a script

    row = (channel_prune(args) if args.keep_macs else
           one_prune(args.arch, args.weights, args.data_dir, args.nsamples, args.recipe, reuse=True))
    row["package"] = str(Path(cnn_sparsegpt.__file__).resolve().parent)
    print("ROW " + json.dumps(row), flush=True)


def channel_prune(args: argparse.Namespace) -> dict:
    """One `--structure channels` prune: its phases' seconds, peak RSS and a digest of the pruned weights."""
    import hashlib
    import resource
    import time

    import torch

    from cnn_sparsegpt import PUBLISHED, RECOMMENDED, prune_model
    from speed import model_and_images

    model, x = model_and_images(args.arch, args.weights, args.data_dir, args.nsamples, torch.device("cpu"))
    t0 = time.perf_counter()
    rep = prune_model(model, x, PUBLISHED if args.recipe == "published" else RECOMMENDED, structure="channels",
                      keep_macs=args.keep_macs, progress=False)
    seconds = time.perf_counter() - t0
    digest = hashlib.sha256()
    for name, t in model.state_dict().items():
        digest.update(name.encode() + t.detach().cpu().contiguous().numpy().tobytes())
    return {"seconds": seconds, "timings": rep.timings, "weights_digest": digest.hexdigest()[:16],
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def run_worker(src: Path, cmd: list[str]) -> dict:
    """Run `cmd` (a worker printing one 'ROW {json}' line with its package's path) against the library in `src`."""
    env = dict(os.environ, PYTHONPATH=f"{src}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    out = subprocess.run(cmd, env=env, check=True, capture_output=True, text=True).stdout
    row = json.loads(next(line[4:] for line in out.splitlines() if line.startswith("ROW ")))
    if Path(row["package"]) != (src / "cnn_sparsegpt").resolve():
        raise SystemExit(f"the worker imported {row['package']}, not {src}: is another copy first on the path?")
    return row


@contextlib.contextmanager
def base_tree(commit: str):
    """(the commit's full hash, its src/ in a temporary git worktree), removed afterwards."""
    base = subprocess.run(["git", "rev-parse", commit], cwd=ROOT, check=True, capture_output=True,
                          text=True).stdout.strip()
    with tempfile.TemporaryDirectory() as tmp:
        tree = Path(tmp) / "base"
        subprocess.run(["git", "worktree", "add", "--detach", str(tree), base], cwd=ROOT, check=True,
                       capture_output=True)
        try:
            yield base, tree / "src"
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(tree)], cwd=ROOT, check=False)


def pairs(base_src: Path, repeat: int):
    """(version, src) of each run in turn: the base, then the working tree, `repeat` times."""
    for _ in range(repeat):
        yield from (("base", base_src), ("work", ROOT / "src"))


def run_one(src: Path, args: argparse.Namespace) -> dict:
    return run_worker(src, [sys.executable, __file__, "--worker", "--arch", args.arch, "--weights", args.weights,
                            "--data-dir", args.data_dir, "--nsamples", str(args.nsamples), "--recipe", args.recipe]
                      + (["--keep-macs", str(args.keep_macs)] if args.keep_macs else []))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base", help="the commit to compare the working tree with")
    p.add_argument("--arch", default="resnet18_cifar", choices=["resnet18_cifar", "resnet50"])
    p.add_argument("--weights", default="../shared/checkpoints/resnet18_cifar10.pt")
    p.add_argument("--data-dir", default="../shared/data")
    p.add_argument("--nsamples", type=int, default=1024)
    p.add_argument("--recipe", default="published", choices=["published", "recommended"])
    p.add_argument("--repeat", type=int, default=2, help="pairs of prunes, each pair base then working tree")
    p.add_argument("--keep-macs", type=float, help="a channel prune to this fraction of the multiply-adds instead")
    p.add_argument("--json")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        return worker(args)
    if not args.base or not args.json:
        p.error("--base and --json are required")
    import torch
    from cnn_sparsegpt.utils import atomic_write_json, run_metadata

    runs = []
    with base_tree(args.base) as (base, base_src):
        for name, src in pairs(base_src, args.repeat):
            row = run_one(src, args) | {"version": name}
            runs.append(row)
            print(name, f"{row['seconds']:.1f} s", f"{row['peak_rss_mb']:.0f} MB",
                  {k: round(v, 1) for k, v in row["timings"].items() if v}, row.get("weights_digest", ""), flush=True)
            atomic_write_json({"base_commit": base, "arch": args.arch, "nsamples": args.nsamples,
                               "recipe": args.recipe, "keep_macs": args.keep_macs, "runs": runs}
                              | run_metadata(torch.device("cpu")), args.json)


if __name__ == "__main__":
    main()
