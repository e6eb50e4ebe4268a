"""ImageNet-scale architectures at 224x224: each is pruned (2:4 and 50%) through the CLI on a generated
ImageNet-layout folder with random weights saved to a file, and its masks are checked.

    python benchmarks/zoo.py --nsamples 16 --json experiments/zoo.json

The accuracy of a random model means nothing: this checks that every architecture prunes without error,
that masks are valid (exact counts; 2:4 along input channels), and lists what each skips and why.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import tempfile
import time
from collections import Counter
from pathlib import Path

import torch

from cnn_sparsegpt.commands.cli import main as cli
from cnn_sparsegpt.models import create_model
from cnn_sparsegpt.data.synthetic import make_imagefolder
from cnn_sparsegpt.utils import atomic_write_json, file_stem, run_metadata

MODELS = ("torchvision:resnet50", "torchvision:mobilenet_v3_large", "torchvision:efficientnet_b0",
          "torchvision:convnext_tiny", "timm:resnet50")


def check_masks(report: dict, masks: dict, state: dict) -> list[str]:
    """Problems with a prune's masks: counts off by more than one weight from the layer's target, zeros outside the
    mask, 2:4 broken."""
    problems = []
    for layer in report["layers"]:
        if layer["skipped"]:
            continue
        key = f"{layer['name']}.weight"
        mask, w = masks[key], state[key]
        zeros = int((~mask).sum())
        if int((w == 0).sum()) != zeros:
            problems.append(f"{key}: {int((w == 0).sum())} zeros, mask prunes {zeros}")
        if report["pattern"] == "2:4":
            kept = mask.transpose(1, -1).reshape(-1, 4).sum(-1)
            if not torch.all(kept == 2):
                problems.append(f"{key}: not 2:4 along input channels")
        elif abs(zeros - layer["sparsity"] * mask.numel()) > 1:  # the layer's own target (non-uniform allocations)
            problems.append(f"{key}: {zeros} pruned of {mask.numel()}, target {layer['sparsity']:.4f}")
    return problems


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=list(MODELS))
    p.add_argument("--patterns", nargs="+", default=["2:4", "0.5"])
    p.add_argument("--nsamples", type=int, default=16)
    p.add_argument("--folder", help="an ImageNet-layout folder (default: a generated one, 10 classes)")
    p.add_argument("--json", default="experiments/zoo.json")
    args = p.parse_args()
    work = Path(tempfile.mkdtemp(prefix="zoo-"))
    data = Path(args.folder) if args.folder else make_imagefolder(work / "data", 10, 20, 5)
    rows = []
    for name in args.models:
        weights = work / f"{file_stem(name)}.pt"
        torch.save(create_model(name, num_classes=10).state_dict(), weights)
        for pattern in args.patterns:
            out = work / f"{file_stem(name)}-{pattern.replace(':', 'of')}"
            flag = ["--nm", pattern] if ":" in pattern else ["--sparsity", pattern]
            t0 = time.perf_counter()
            with contextlib.redirect_stdout(io.StringIO()):  # the per-layer tables: report.json has them
                code = cli(["-q", "prune", "--model", name, "--weights", str(weights), "--dataset", str(data),
                            "--streaming", "on", "--nsamples", str(args.nsamples), "--no-evaluate", "--out", str(out),
                            *flag])
            row = {"model": name, "pattern": pattern, "exit_code": code, "seconds": time.perf_counter() - t0}
            if code == 0:
                report = json.loads((out / "report.json").read_text())
                masks = torch.load(out / "masks.pt", weights_only=True)
                state = torch.load(out / "model.pt", weights_only=True)
                skipped = [(x["name"], x["reason"]) for x in report["layers"] if x["skipped"]]
                reasons = Counter(r.split(" (")[0] for _, r in skipped)
                row |= {"layers": len(report["layers"]), "pruned": len(report["layers"]) - len(skipped),
                        "sparsity": report["sparsity"], "total_sparsity": report["total_sparsity"],
                        "prune_seconds": report["seconds"], "skipped": skipped, "skip_reasons": dict(reasons),
                        "problems": check_masks(report, masks, state), "preprocess": report["preprocess"]["source"]}
            rows.append(row)
            print(json.dumps({k: v for k, v in row.items() if k != "skipped"}), flush=True)
            atomic_write_json({"meta": run_metadata(torch.device("cpu")) | {"nsamples": args.nsamples}, "rows": rows},
                              args.json)
    print("\n| model | pattern | layers pruned / all | sparsity of pruned | prune s | skipped (why) | mask problems |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        if r["exit_code"]:
            print(f"| {r['model']} | {r['pattern']} | FAILED (exit {r['exit_code']}) | | | | |")
            continue
        why = "; ".join(f"{n} x {k}" for k, n in r["skip_reasons"].items()) or "none"
        print(f"| {r['model']} | {r['pattern']} | {r['pruned']} / {r['layers']} | {r['sparsity']:.4f} | "
              f"{r['prune_seconds']:.0f} | {why} | {len(r['problems'])} |")
    print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
