"""Fill docs/CHANNELS.md's tables from experiments/channels/ (what benchmarks/channels_goals.sh wrote): the text
between `<!-- NAME -->` and `<!-- /NAME -->` is replaced for NAME in test, latency, finetune, torch_pruning.

    python benchmarks/channels_tables.py --doc docs/CHANNELS.md --dir experiments/channels
"""
from __future__ import annotations

import argparse
import json
import re
from pathlib import Path


def test_rows(d: Path) -> str:
    lines = ["| model (dense top-1) | target | multiply-adds kept | weights kept | top-1 | drop | prune time "
             "| commit |",
             "|---|---|---|---|---|---|---|---|"]
    for p in sorted(d.glob("*.report.json")):
        r = json.loads(p.read_text())
        (md, mk), (pd, pk) = r["structure"]["macs"], r["structure"]["params"]
        target = ", ".join(f"keep_{k} {v}" for k, v in r["structure"]["target"].items())
        lines.append(f"| {r['model']} ({100 * r['dense_acc']:.2f}) | {target} | {mk / md:.1%} | {pk / pd:.1%} | "
                     f"{100 * r['pruned_acc']:.2f} | {100 * (r['pruned_acc'] - r['dense_acc']):+.2f} | "
                     f"{r['seconds']:.0f} s | {r['git_commit']} |")
    return "\n".join(lines)


def latency_rows(d: Path) -> str:
    lines = ["| run | runtime | batch | dense (ms) | pruned (ms) | speed-up | commit |",
             "|---|---|---|---|---|---|---|"]
    for p in sorted(d.glob("*.latency.json")):
        r = json.loads(p.read_text())
        for row in r["rows"]:
            lines.append(f"| {p.name.split('.')[0]} | {r['runtime']} | {row['batch']} | {1000 * row['dense_s']:.2f} | "
                         f"{1000 * row['pruned_s']:.2f} | {row['speedup']:.2f}x | {r['git_commit']} |")
    return "\n".join(lines)


def finetune_rows(d: Path) -> str:
    lines = ["| run | dense | one-shot | after fine-tuning | epochs | lr | seconds | commit |",
             "|---|---|---|---|---|---|---|---|"]
    for p in sorted(d.glob("*.finetune.json")):
        r = json.loads(p.read_text())
        f = r["finetune"]
        lines.append(f"| {p.name.split('.')[0]} | {100 * r['dense_acc']:.2f} | {100 * f['pruned_acc_before']:.2f} | "
                     f"{100 * r['pruned_acc']:.2f} | {f['epochs']} | {f['lr']} | {f['seconds']:.0f} | "
                     f"{r['git_commit']} |")
    return "\n".join(lines)


def torch_pruning_rows(d: Path) -> str:
    lines = []
    for p in sorted(d.glob("*_vs_torch_pruning.json")):
        r = json.loads(p.read_text())
        lines += [f"{r['model']}, dense {100 * r['dense_holdout_acc']:.2f}% held-out (commit {r['git_commit']}):", "",
                  "| target | method | multiply-adds kept | held-out top-1 | seconds |", "|---|---|---|---|---|"]
        for row in r["rows"]:
            lines.append(f"| {row['keep_macs']} | {row['method']} | {row['macs_kept']:.1%} | "
                         f"{100 * row['holdout_acc']:.2f} | {row['seconds']:.0f} |")
        lines.append("")
    return "\n".join(lines).rstrip()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--doc", default="docs/CHANNELS.md")
    ap.add_argument("--dir", default="experiments/channels")
    args = ap.parse_args()
    d, doc = Path(args.dir), Path(args.doc)
    text = doc.read_text()
    for name, fn in (("test", test_rows), ("latency", latency_rows), ("finetune", finetune_rows),
                     ("torch_pruning", torch_pruning_rows)):
        text = re.sub(rf"<!-- {name} -->.*?<!-- /{name} -->", lambda m: f"<!-- {name} -->\n{fn(d)}\n<!-- /{name} -->",
                      text, flags=re.S)
    doc.write_text(text)


if __name__ == "__main__":
    main()
