"""How finely the held-out rule can tell two settings apart (issue 21's 2:4 goal): for every ResNet-20 2:4 setting
that ran beside the default on the same three calibration seeds in the held-out CSVs, its per-seed difference from
the default; the spread of those differences pooled over all comparisons gives the standard error of a three-seed
mean difference. No prune is run: it reads experiments/*holdout*.csv.

    python benchmarks/holdout_resolution.py --json experiments/holdout_resolution.json
"""
from __future__ import annotations

import argparse
import collections
import csv
import glob
import math
import statistics

from cnn_sparsegpt.utils import atomic_write_json

DEFAULT = "solver=auto,refine=cg,dense_target=True,intercept=True"
BASE = (DEFAULT, "0.01", "True")  # the default's (recipe, percdamp, BatchNorm re-estimation) in a results row
SEEDS = ("0", "1", "2")


def comparisons(paths, pattern: str) -> list[dict]:
    out = []
    for path in paths:
        runs = collections.defaultdict(dict)  # (recipe, percdamp, bn) -> seed -> top-1 (%)
        for r in csv.DictReader(open(path)):
            if (r.get("model"), r.get("pattern"), r.get("method"), r.get("nsamples")) == \
                    ("resnet20_cifar", pattern, "sparsegpt", "1024"):
                runs[(r.get("recipe", ""), r.get("percdamp", ""), r.get("bn_recalibration", ""))][r["seed"]] = \
                    100 * float(r["pruned_acc"])
        base = runs.get(BASE)
        if not base or not all(s in base for s in SEEDS):
            continue
        for (recipe, percdamp, bn), acc in runs.items():
            if (recipe, percdamp, bn) != BASE and all(s in acc for s in SEEDS):
                diff = [acc[s] - base[s] for s in SEEDS]
                out.append({"file": path, "recipe": recipe, "percdamp": percdamp, "bn_recalibration": bn,
                            "per_seed": diff, "mean": statistics.mean(diff), "sd": statistics.stdev(diff)})
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pattern", default="2:4")
    p.add_argument("--json", default="experiments/holdout_resolution.json")
    args = p.parse_args()
    rows = comparisons(sorted(glob.glob("experiments/*holdout*.csv")), args.pattern)
    pooled = math.sqrt(statistics.mean(r["sd"] ** 2 for r in rows))
    result = {"pattern": args.pattern, "default": DEFAULT, "comparisons": rows, "pooled_sd": pooled,
              "se_of_three_seed_mean_difference": pooled / math.sqrt(len(SEEDS)),
              "default_seed_effect": {s: statistics.mean(-r["per_seed"][i] for r in rows)
                                      for i, s in enumerate(SEEDS)}}
    for r in rows:
        print(f"{r['file']}: {r['recipe'] or '(published)'} pd {r['percdamp']}: "
              + " / ".join(f"{d:+.2f}" for d in r["per_seed"]) + f" (mean {r['mean']:+.2f})")
    print(f"pooled sd of a per-seed difference {pooled:.2f} over {len(rows)} comparisons; standard error of a "
          f"three-seed mean difference {result['se_of_three_seed_mean_difference']:.2f}; the default's own seed "
          "effect (how far the default is above the others, per seed): "
          + ", ".join(f"{s}: {v:+.2f}" for s, v in result["default_seed_effect"].items()))
    atomic_write_json(result, args.json)


if __name__ == "__main__":
    main()
