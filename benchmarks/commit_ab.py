"""The same prune under two versions of the library, side by side: a base commit (checked out into a temporary
git worktree) against the working tree, each prune in a fresh process, the two alternating, time per phase and
peak RSS of each. This machine is shared and noisy; only such pairs say whether a change made a prune faster.

    python benchmarks/commit_ab.py --base 3c77804 --arch resnet50 --nsamples 256 --json experiments/x.json

The prunes are heap_reuse.py's (ResNet-18 on the shared checkpoint and CIFAR training images, ResNet-50 at 224² on
random weights and images; SparseGPT 2:4 as published unless --recipe recommended), with the library's defaults.
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

    row = one_prune(args.arch, args.weights, args.data_dir, args.nsamples, args.recipe, reuse=True)
    row["package"] = str(Path(cnn_sparsegpt.__file__).resolve().parent)
    print("ROW " + json.dumps(row), flush=True)


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
                            "--data-dir", args.data_dir, "--nsamples", str(args.nsamples), "--recipe", args.recipe])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base", help="the commit to compare the working tree with")
    p.add_argument("--arch", default="resnet18_cifar", choices=["resnet18_cifar", "resnet50"])
    p.add_argument("--weights", default="../shared/checkpoints/resnet18_cifar10.pt")
    p.add_argument("--data-dir", default="../shared/data")
    p.add_argument("--nsamples", type=int, default=1024)
    p.add_argument("--recipe", default="published", choices=["published", "recommended"])
    p.add_argument("--repeat", type=int, default=2, help="pairs of prunes, each pair base then working tree")
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
                  {k: round(v, 1) for k, v in row["timings"].items() if v}, flush=True)
    row = {"base_commit": base, "arch": args.arch, "nsamples": args.nsamples, "recipe": args.recipe,
           "runs": runs} | run_metadata(torch.device("cpu"))
    atomic_write_json(row, args.json)


if __name__ == "__main__":
    main()
