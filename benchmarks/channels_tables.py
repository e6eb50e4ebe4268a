"""Fill docs/CHANNELS.md's tables from experiments/channels/ (what benchmarks/channels_goals.sh wrote): the text
between `<!-- NAME -->` and `<!-- /NAME -->` is replaced for NAME in test, latency, finetune, torch_pruning,
target_speedup.

    python benchmarks/channels_tables.py --doc docs/CHANNELS.md --dir experiments/channels
"""
from __future__ import annotations

import argparse
import json
import re
from pathlib import Path


def _table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(map(str, r)) + " |" for r in rows])


def test_rows(d: Path) -> str:
    rows = []
    for p in sorted(d.glob("*.report.json")):
        r = json.loads(p.read_text())
        (md, mk), (pd, pk) = r["structure"]["macs"], r["structure"]["params"]
        names = {"macs": "keep_macs", "params": "keep_params", "speedup": "target_speedup"}
        target = ", ".join(f"{names[k]} {v}" for k, v in r["structure"]["target"].items())
        if r["config"].get("round_to", 8) != 8:  # the default
            target += f", round_to {r['config']['round_to']}"
        if r["structure"].get("latency"):
            lat = r["structure"]["latency"]
            target += f" ({lat['measured_speedup']:.2f}x measured, batch {lat['batch']})"
        rows.append([f"{r['model']} ({100 * r['dense_acc']:.2f})", target, f"{mk / md:.1%}", f"{pk / pd:.1%}",
                     f"{100 * r['pruned_acc']:.2f}", f"{100 * (r['pruned_acc'] - r['dense_acc']):+.2f}",
                     f"{r['seconds']:.0f} s", r["git_commit"]])
    return _table(["model (dense top-1)", "target", "multiply-adds kept", "weights kept", "top-1", "drop",
                   "prune time", "commit"], rows)


def latency_rows(d: Path) -> str:
    rows = []
    for p in sorted(d.glob("*.latency.json")):
        r = json.loads(p.read_text())
        rows += [[p.name.split(".")[0], r["runtime"], row["batch"], f"{1000 * row['dense_s']:.2f}",
                  f"{1000 * row['pruned_s']:.2f}", f"{row['speedup']:.2f}x", r["git_commit"]] for row in r["rows"]]
    return _table(["run", "runtime", "batch", "dense (ms)", "pruned (ms)", "speed-up", "commit"], rows)


def finetune_rows(d: Path) -> str:
    rows = []
    for p in sorted(d.glob("*.finetune.json")):
        r = json.loads(p.read_text())
        f = r["finetune"]
        rows.append([p.name.split(".")[0], f"{100 * r['dense_acc']:.2f}", f"{100 * f['pruned_acc_before']:.2f}",
                     f"{100 * r['pruned_acc']:.2f}", f["epochs"], f["lr"], f"{f['seconds']:.0f}", r["git_commit"]])
    return _table(["run", "dense", "one-shot", "after fine-tuning", "epochs", "lr", "seconds", "commit"], rows)


def torch_pruning_rows(d: Path) -> str:
    parts = []
    for p in sorted(d.glob("*_vs_torch_pruning.json")):
        r = json.loads(p.read_text())
        rows = [[row["keep_macs"], row["method"], f"{row['macs_kept']:.1%}", f"{100 * row['holdout_acc']:.2f}",
                 f"{row['seconds']:.0f}"] for row in r["rows"]]
        parts.append(f"{r['model']}, dense {100 * r['dense_holdout_acc']:.2f}% held-out (commit {r['git_commit']}):\n\n"
                     + _table(["target", "method", "multiply-adds kept", "held-out top-1", "seconds"], rows))
    return "\n\n".join(parts)


def target_speedup_rows(d: Path) -> str:
    """benchmarks/target_speedup.py's runs: the search's tries, then the independent measurement."""
    rows = []
    for p in sorted(d.glob("*_target_speedup.json")):
        r = json.loads(p.read_text())
        tries = ", ".join(f"{t['predicted_speedup']:.2f}→{t['measured_speedup']:.2f}x" for t in r["search"]["tries"])
        again = ", ".join(f"{row['speedup']:.2f}x (batch {row['batch']})" for row in r["measured_after"])
        rows.append([r["model"], "×".join(map(str, r["input_shape"][1:])), f"{r['target_speedup']:g}x", tries, again,
                     f"{r['macs'][1] / r['macs'][0]:.1%}", f"{r['prune_seconds']:.0f} s", r["git_commit"]])
    return _table(["model (random weights)", "input", "target", "search: predicted→measured", "measured again",
                   "multiply-adds kept", "prune time", "commit"], rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--doc", default="docs/CHANNELS.md")
    ap.add_argument("--dir", default="experiments/channels")
    args = ap.parse_args()
    d, doc = Path(args.dir), Path(args.doc)
    text = doc.read_text()
    for name, fn in (("test", test_rows), ("latency", latency_rows), ("finetune", finetune_rows),
                     ("torch_pruning", torch_pruning_rows), ("target_speedup", target_speedup_rows)):
        text = re.sub(rf"<!-- {name} -->.*?<!-- /{name} -->", lambda m: f"<!-- {name} -->\n{fn(d)}\n<!-- /{name} -->",
                      text, flags=re.S)
    doc.write_text(text)


if __name__ == "__main__":
    main()
