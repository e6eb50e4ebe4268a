"""Choose fine-tuning settings honestly: for each (lr, warm-up) fine-tune a pruned run with `finetune --holdout N`
(train on all but N training images, best epoch on those N), choose the setting with the best held-out accuracy,
and report the test accuracy of that one (each run measures the test split once, at its end; the choice never
looks at it). Every run's numbers are kept in the JSON, which is rewritten after each run.

    python benchmarks/finetune_sweep.py RUN_DIR --data-dir ../shared/data --lrs 0.01 0.05 --warmups 0 0.1 \\
        --holdout 5000 --out experiments/finetune_sweep/NAME.json
"""
from __future__ import annotations

import argparse
import itertools
import json
import tempfile
from pathlib import Path

from cnn_sparsegpt.commands.cli import dropout_rate
from cnn_sparsegpt.commands.finetune import finetune_run
from cnn_sparsegpt.commands.results import sweep_setting
from cnn_sparsegpt.commands.train import OPTIMIZERS, TrainConfig
from cnn_sparsegpt.utils import atomic_write_json, git_commit


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir")
    p.add_argument("--data-dir")
    p.add_argument("--lrs", type=float, nargs="+", default=[0.01, 0.03, 0.1])
    p.add_argument("--optimizers", nargs="+", default=["sgd"], choices=list(OPTIMIZERS))
    p.add_argument("--warmups", type=float, nargs="+", default=[0.0, 0.1])
    p.add_argument("--distills", type=float, nargs="+", default=[0.0], help="distillation weights (0 = off)")
    p.add_argument("--teacher", help="dense checkpoint for distillation (default: the run's --weights)")
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--holdout", type=int, default=5000)
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[128])
    p.add_argument("--dropouts", type=dropout_rate, nargs="+", default=[None],
                   help="dropout rates; 'own' = the model's")
    p.add_argument("--device", default="auto")
    p.add_argument("--max-steps", type=int, default=0, help="per run (smoke tests)")
    p.add_argument("--commit", default=git_commit(), help="commit of the code (default: git's; a copy without .git)")
    p.add_argument("--out", required=True, help="JSON file")
    args = p.parse_args()
    out = Path(args.out)
    done = json.loads(out.read_text()) if out.is_file() else {}
    runs = done.get("runs", [])
    seen = {sweep_setting(r) for r in runs}
    summary = {"run_dir": args.run_dir, "epochs": args.epochs, "holdout": args.holdout,
               "chosen_on": f"accuracy on {args.holdout} held-out training images", "runs": runs,
               "chosen": done.get("chosen")}  # a resumed sweep with nothing left to run keeps its choice
    grid = itertools.product(args.optimizers, args.lrs, args.warmups, args.distills, args.batch_sizes, args.dropouts)
    for optimizer, lr, warmup, distill, bs, dropout in grid:
        if (optimizer, lr, warmup, distill, bs, dropout) in seen:  # an interrupted sweep goes on where it stopped
            continue
        cfg = TrainConfig(epochs=args.epochs, lr=lr, batch_size=bs, schedule="cosine", warmup=warmup,
                          max_steps=args.max_steps, distill=distill, optimizer=optimizer)
        with tempfile.TemporaryDirectory() as tmp:
            r = finetune_run(args.run_dir, cfg, tmp, args.data_dir, args.device, progress=False,
                             holdout=args.holdout, teacher_weights=args.teacher, dropout=dropout)
        f = r["finetune"]
        runs.append({"optimizer": optimizer, "lr": lr, "warmup": warmup, "distill": distill, "batch_size": bs,
                     "dropout": dropout,
                     "commit": args.commit, "holdout_acc_before": f["holdout_acc_before"],
                     "holdout_acc": f["holdout_acc"], "test_acc_before": f["pruned_acc_before"],
                     "test_acc": r["pruned_acc"], "dense_test_acc": r.get("dense_acc"), "seconds": f["seconds"],
                     "device": r.get("device"), "model": r["model"], "pattern": r.get("pattern"),
                     "recipe": r.get("recipe_label")})
        best = max(runs, key=lambda x: x["holdout_acc"])
        summary["chosen"] = {"optimizer": best.get("optimizer", "sgd"), "lr": best["lr"], "warmup": best["warmup"],
                             "distill": best.get("distill", 0.0),
                             "batch_size": best.get("batch_size", 128), "dropout": best.get("dropout"),
                             "test_acc": best["test_acc"]}
        atomic_write_json(summary, out)
        print(f"{optimizer} lr {lr} warm-up {warmup} distill {distill} batch {bs} dropout {dropout}: "
              f"held-out {100 * f['holdout_acc_before']:.2f} -> "
              f"{100 * f['holdout_acc']:.2f}, test {100 * r['pruned_acc']:.2f} ({f['seconds']:.0f} s)", flush=True)
    print(f"chosen on held-out images: {summary.get('chosen')}")


if __name__ == "__main__":
    main()
