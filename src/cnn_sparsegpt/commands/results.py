"""Tables from the benchmark CSV: printed for the quick start, or written as docs/RESULTS.md."""
from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path

from ..data.datasets import JPEG_NOTE
from ..utils import UserError, atomic_write_text, file_stem
from .bench import read_rows
from .plot import _main_rows
from .report import read_report

OLD_REPO_2OF4 = {  # the original research repo's published 2:4 table: dense, magnitude, its SparseGPT (%)
    "resnet18_cifar": (85.22, 20.75, 42.58), "vgg16_cifar": (85.74, 31.15, 68.31),
    "cifar_cnn": (78.15, 45.48, 69.25), "mnist_cnn": (98.38, 97.33, 98.20),
}


def _pattern_order(p: str) -> tuple:
    return (1, int(p.split(":")[1]), p) if ":" in p else (0, float(p), p)


def model_table(rows: list[dict], model: str) -> str:
    """Methods × patterns; cells are pruned top-1 (%) with the drop from dense in brackets."""
    mrows = [r for r in rows if r["model"] == model]
    patterns = sorted({r["pattern"] for r in mrows}, key=_pattern_order)
    methods = [m for m in ("magnitude", "wanda", "sparsegpt") if any(r["method"] == m for r in mrows)]
    dense = float(mrows[0]["dense_acc"]) * 100
    head = "| method | " + " | ".join(f"{p}" if ":" in p else f"{float(p):.0%}" for p in patterns) + " |"
    n_eval = mrows[0]["eval_samples"]
    lines = [f"Dense top-1: {dense:.2f}% ({n_eval if n_eval not in ('', '0') else 'all'} test images; "
             f"{mrows[0]['nsamples']} calibration images; BN recalibration on).", "", head,
             "|---" * (len(patterns) + 1) + "|"]
    for method in methods:
        cells = []
        for p in patterns:
            r = next((r for r in mrows if r["method"] == method and r["pattern"] == p), None)
            cells.append(f"{100 * float(r['pruned_acc']):.2f} ({-100 * float(r['drop']):+.2f})" if r else "")
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    cells = []
    for p in patterns:  # achieved sparsity (pruned layers / all Conv2d+Linear weights), from the first method run
        r = next((r for r in mrows if r["pattern"] == p), None)
        cells.append(f"{float(r['sparsity']):.3f} / {float(r['total_sparsity']):.3f}" if r else "")
    lines.append("| sparsity (pruned layers / all weights) | " + " | ".join(cells) + " |")
    secs = defaultdict(list)
    for r in mrows:
        secs[r["method"]].append(float(r["prune_seconds"]))
    lines += ["", "Pruning seconds (mean over the patterns): " + ", ".join(
        f"{m} {sum(v) / len(v):.1f}" for m, v in secs.items()) + f"; device: {mrows[0]['device']}."]
    return "\n".join(lines)


def old_repo_table(rows: list[dict]) -> str:
    lines = ["| model | old dense | old magnitude | old SparseGPT | our dense | our magnitude | our Wanda "
             "| our SparseGPT |", "|---|---|---|---|---|---|---|---|"]
    for model, (d, mag, sg) in OLD_REPO_2OF4.items():
        ours = {r["method"]: 100 * float(r["pruned_acc"])
                for r in rows if r["model"] == model and r["pattern"] == "2:4"}
        dense = next((100 * float(r["dense_acc"]) for r in rows if r["model"] == model), None)
        fmt = lambda v: f"{v:.2f}" if v is not None else "not run"
        lines.append(f"| {model} | {d:.2f} | {mag:.2f} | {sg:.2f} | {fmt(dense)} | {fmt(ours.get('magnitude'))} | "
                     f"{fmt(ours.get('wanda'))} | {fmt(ours.get('sparsegpt'))} |")
    return "\n".join(lines)


def checkpoints_table(rows: list[dict], meta_dir: str = "experiments/checkpoints") -> str:
    """Each checkpoint's recipe and accuracy, read from the .json its `train` command wrote: the committed copy in
    `meta_dir` (checkpoints are not committed, their metadata is: the doc must come out the same on every machine),
    else the one beside the checkpoint. A local checkpoint that is not the committed one is named on stderr."""
    def read(path: Path) -> dict | None:
        try:
            return json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            return None

    lines = ["| model | checkpoint | recipe | test top-1 at training | training time |", "|---|---|---|---|---|"]
    for model, ckpt in sorted({(r["model"], r["checkpoint"]) for r in rows}):
        committed, local = read(Path(meta_dir) / f"{Path(ckpt).name}.json"), read(Path(f"{ckpt}.json"))
        meta = committed or local
        if committed and local and committed.get("test_acc") != local.get("test_acc"):
            print(f"note: {ckpt} here is not the checkpoint {meta_dir} describes ({100 * local['test_acc']:.2f}% "
                  f"against {100 * committed['test_acc']:.2f}%); the table shows the committed one. Copy "
                  f"{ckpt}.json there when its rows replace the CSV's", file=sys.stderr)
        if meta is None:
            lines.append(f"| {model} | {ckpt} | (no metadata) | | |")
            continue
        cfg = meta.get("config")
        if cfg:
            recipe = f"{meta.get('epochs')} epochs, batch {cfg['batch_size']}, peak lr {cfg['lr']}, {cfg['schedule']}"
        else:
            recipe = f"{meta.get('epochs')} epochs, batch {meta.get('batch_size')}, {meta.get('schedule', '')}"
        secs = meta.get("seconds", meta.get("train_seconds"))
        lines.append(f"| {model} | `{ckpt}` | {recipe} | {100 * meta['test_acc']:.2f}% | "
                     f"{secs:.0f} s on {meta.get('device', '2 CPU cores')} |")
    return "\n".join(lines)


def ablation_table(all_rows: list[dict]) -> str:
    """Calibration size × BN recalibration, for every (model, method, pattern) run with more than one setting."""
    groups = defaultdict(list)
    for r in all_rows:
        if r.get("holdout", "0") == "0":
            groups[(r["model"], r["method"], r["pattern"])].append(r)
    lines = []
    for (model, method, pattern), rs in sorted(groups.items()):
        settings = {(int(r["nsamples"]), r["bn_recalibration"]) for r in rs}
        if len(settings) < 2:
            continue
        if not lines:
            lines = ["| model | method | pattern | calibration images | BN recalibration | top-1 (change) |",
                     "|---|---|---|---|---|---|"]
        for r in sorted(rs, key=lambda r: (int(r["nsamples"]), r["bn_recalibration"])):
            lines.append(f"| {model} | {method} | {pattern} | {r['nsamples']} | {r['bn_recalibration']} | "
                         f"{100 * float(r['pruned_acc']):.2f} ({-100 * float(r['drop']):+.2f}) |")
    return "\n".join(lines)


def holdout_table(path: Path) -> str:
    """Runs evaluated on held-out training images (for choosing settings without the test set)."""
    rows = read_rows(path)
    if not rows:
        return ""
    lines = ["| model | method | pattern | percdamp | calibration images | held-out images | dense | pruned (change) |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['method']} | {r['pattern']} | {r['percdamp']} | {r['nsamples']} | "
                     f"{r['holdout']} | {100 * float(r['dense_acc']):.2f} | {100 * float(r['pruned_acc']):.2f} "
                     f"({-100 * float(r['drop']):+.2f}) |")
    return "\n".join(lines)


def recipe_table(rows: list[dict]) -> str:
    """Runs with options beyond uniform SparseGPT next to the published methods at the same level, as an
    ablation: one table per (model, evaluation split, device kind), a row per (level, method), a column per
    recipe in the order the CSVs first list them. Cells: top-1 (change) and pruning seconds."""
    groups = defaultdict(list)
    for r in rows:
        split = f"held-out {r['holdout']}" if r.get("holdout", "0") != "0" else "test"
        device = "GPU" if str(r.get("device", "")).startswith("cuda") else "CPU"
        groups[(r["model"], split, device)].append(r)
    out = []
    for (model, split, device), rs in sorted(groups.items()):
        recipes = list(dict.fromkeys(r.get("recipe") or "" for r in rs))
        recipes.sort(key=lambda x: x != "")  # uniform first, then as listed
        cells = {(r["pattern"], r["method"], r.get("recipe") or ""): r for r in rs}
        out += [f"**{model}, {split} ({device}, {rs[0].get('device', '')})**", "",
                "| level | method | " + " | ".join(x or "uniform" for x in recipes) + " |",
                "|---|---|" + "---|" * len(recipes)]
        for pattern, method in sorted({(p, m) for p, m, _ in cells}):
            row = []
            for x in recipes:
                r = cells.get((pattern, method, x))
                row.append(f"{100 * float(r['pruned_acc']):.2f} ({-100 * float(r['drop']):+.2f}) · "
                           f"{float(r['prune_seconds']):.0f} s" if r else "")
            out.append(f"| {pattern} | {method} | " + " | ".join(row) + " |")
        out.append("")
    return "\n".join(out)


def results_markdown(csv_path: Path, plots: Path | None, preamble: str = "", holdout: Path | None = None,
                     postscript: str = "", recipes: list[Path] = (), recipes_text: str = "",
                     seeds: Path | None = None, finetune: list[Path] = (), sweeps: list[Path] = ()) -> str:
    all_rows = read_rows(csv_path)
    rows = _main_rows(all_rows)
    if not rows:
        raise UserError(f"no benchmark rows in {csv_path}")
    models = sorted({r["model"] for r in rows})
    parts = ["# Results", "", "<!-- generated by `make results` from "
             f"{csv_path}; edit the generator, not this file -->", "", preamble,
             "One-shot pruning, no fine-tuning. Cells: test top-1 (%) after pruning, and the change from dense. "
             "Percentages are unstructured sparsity of each pruned layer; N:M keeps N of every M input channels "
             "at each kernel tap. First conv and last linear stay dense.", ""]
    if any("JPEG" in r["data_source"] for r in rows):
        parts += [f"**Data:** CIFAR-10 results use the {JPEG_NOTE}.", ""]
    for model in models:
        label = next(r.get("recipe") or "" for r in rows if r["model"] == model)
        how = f"every method with `{label}` (the recommended recipe)" if label else "the methods as published"
        parts += [f"## {model}", "", f"Rows: {how}.", "", model_table(rows, model), ""]
        png = file_stem(f"{model}_accuracy_vs_sparsity.png")  # the name plot.py gives it
        if plots is not None and (plots / png).is_file():
            parts += [f"![{model}](../{plots}/{png})", ""]
    parts += ["## Against the original research repo (2:4)", "",
              "The old repo's numbers are as it published them (canonical CIFAR-10, its own checkpoints); ours are "
              "from the CSV above, so checkpoints and (for CIFAR) data differ: compare the drops, not the levels.",
              "", old_repo_table(rows), ""]
    if plots is not None and (plots / "nm_bars.png").is_file():
        parts += [f"![N:M](../{plots}/nm_bars.png)", ""]
    ablation = ablation_table(all_rows)
    if ablation:
        parts += ["## Calibration size and BatchNorm recalibration", "", ablation, ""]
    for png in sorted(plots.glob("*_layer_errors.png")) if plots is not None and plots.is_dir() else []:
        parts += [f"![{png.stem}](../{png})", ""]
    held = holdout_table(holdout) if holdout is not None else ""
    if held:
        parts += [f"## Held-out checks ({holdout})", "", held, "", postscript]
    recipe_rows = [r for path in recipes for r in read_rows(path)]
    if recipe_rows:
        parts += ["## Beyond uniform SparseGPT", "", recipes_text,
                  f"Rows from {', '.join(str(p) for p in recipes)} (`cnn-sparsegpt bench` with `recipes:`).", "",
                  recipe_table(recipe_rows), ""]
        for png in sorted(plots.rglob("*_layer_sparsity.png")) if plots is not None and plots.is_dir() else []:
            parts += [f"![{png.stem}](../{png})", ""]
    seed_rows = read_rows(seeds) if seeds is not None else []
    if seed_rows:
        parts += ["## Seed-to-seed variation", "", f"Rows from {seeds} (the calibration sample's seed; test split).",
                  "", seed_table(seed_rows), ""]
    if finetune:
        parts += ["## Fine-tuning with the masks kept", "",
                  "`cnn-sparsegpt finetune RUN_DIR --epochs 1 --lr LR` (cosine) on a `prune` run; test split; "
                  f"reports {', '.join(str(p) for p in finetune)}.", "", finetune_table(finetune), ""]
    if sweeps:
        parts += ["### Fine-tuning settings chosen on held-out images", "",
                  "`benchmarks/finetune_sweep.py`: each (optimizer, lr, warm-up, distillation weight, batch size, "
                  "dropout rate; own = the model's) fine-tuned with `finetune --holdout 5000`; the "
                  "one with the best held-out accuracy is chosen, and its test accuracy (measured once, at the end "
                  f"of its run) is reported. Files: {', '.join(str(p) for p in sweeps)}.", "", sweep_table(sweeps), ""]
    parts += ["## Checkpoints", "",
              "The checkpoints of the per-model tables at the top (their dense rows). The CIFAR and MNIST CNNs are "
              "not committed: `make checkpoints` trains them again on each machine, not to the same bits, and a "
              "section measured with a retrained one gives its dense top-1 where it reports it.", "",
              checkpoints_table(rows), ""]
    return "\n".join(parts) + "\n"


def seed_table(rows: list[dict]) -> str:
    """Seed-to-seed spread (the calibration sample): per (model, method, level, recipe), the mean, lowest and
    highest top-1 change over the seeds run."""
    groups = defaultdict(list)
    for r in rows:
        groups[(r["model"], r["method"], r["pattern"], r.get("recipe") or "")].append(-100 * float(r["drop"]))
    lines = ["| model | method | level | recipe | seeds | change from dense: mean (lowest, highest) |",
             "|---|---|---|---|---|---|"]
    for (model, method, pattern, recipe), d in sorted(groups.items()):
        lines.append(f"| {model} | {method} | {pattern} | {recipe or 'as published'} | {len(d)} | "
                     f"{sum(d) / len(d):+.2f} ({min(d):+.2f}, {max(d):+.2f}) |")
    return "\n".join(lines)


def _pct(x: float | None) -> str:
    return "–" if x is None else f"{100 * x:.2f}"  # – : not measured (e.g. a prune run with --no-evaluate)


def finetune_table(paths: list[Path]) -> str:
    """One row per `finetune` report: dense, pruned and fine-tuned top-1 and the training time."""
    lines = ["| model | pattern | recipe | bits | dense | pruned | after fine-tuning | epochs | lr | seconds "
             "| device |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for path in paths:
        r = read_report(path)  # any schema: the recipe's label and the bits as the run recorded them
        f = r["finetune"]
        lines.append(f"| {r['model']} | {r['pattern']} | {r.get('recipe_label') or 'as published'} | "
                     f"{r['config'].get('wbits') or 'float'} | {_pct(r.get('dense_acc'))} | "
                     f"{100 * f['pruned_acc_before']:.2f} | "
                     f"{100 * r['pruned_acc']:.2f} | {f['epochs']} | {f.get('lr', '')} | {f['seconds']:.0f} | "
                     f"{r.get('device', '')} |")
    return "\n".join(lines)


def sweep_setting(run: dict) -> tuple:
    """(optimizer, lr, warm-up, distillation, batch size, dropout) of a benchmarks/finetune_sweep.py run or choice;
    the defaults fill in rows written before a setting was swept."""
    return (run.get("optimizer", "sgd"), run["lr"], run["warmup"], run.get("distill", 0.0), run.get("batch_size", 128),
            run.get("dropout"))


def sweep_table(paths: list[Path]) -> str:
    """One row per benchmarks/finetune_sweep.py JSON: the setting chosen on held-out images and its accuracies."""
    lines = ["| model | pattern | epochs | settings tried | chosen optimizer, lr, warm-up, distillation, batch, "
             "dropout | held-out: before → after | test: before → after | dense (test) | seconds per run | device | "
             "commit |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for path in paths:
        s = json.loads(Path(path).read_text())
        c = s["chosen"]
        r = next(x for x in s["runs"] if sweep_setting(x) == sweep_setting(c))
        dense = _pct(r.get("dense_test_acc"))
        pattern = "dense (control)" if float(r["pattern"]) == 0 and ":" not in r["pattern"] else r["pattern"]
        lines.append(f"| {r['model']} | {pattern} | {s['epochs']} | {len(s['runs'])} | "
                     f"{c.get('optimizer', 'sgd')}, {c['lr']}, "
                     f"{c['warmup']}, "
                     f"{c.get('distill', 0.0)}, "
                     f"{c.get('batch_size', 128)}, {'own' if c.get('dropout') is None else c['dropout']} | "
                     f"{100 * r['holdout_acc_before']:.2f} → {100 * r['holdout_acc']:.2f} | "
                     f"{100 * r['test_acc_before']:.2f} → {100 * r['test_acc']:.2f} | {dense} | "
                     f"{r['seconds']:.0f} | {r['device']} | {r.get('commit') or s.get('commit', '')} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m cnn_sparsegpt.commands.results", description=__doc__)
    p.add_argument("--csv", default="experiments/results.csv")
    p.add_argument("--models", nargs="+", help="only these models (printed table)")
    p.add_argument("--out", help="write the full markdown page here instead of printing tables")
    p.add_argument("--plots", default="experiments/plots", help="folder of PNGs to embed")
    p.add_argument("--preamble", help="markdown file inserted after the title")
    p.add_argument("--holdout-csv", help="CSV of runs evaluated on held-out training images")
    p.add_argument("--postscript", help="markdown file inserted after the held-out table")
    p.add_argument("--recipes-csv", nargs="+", default=[], help="CSVs of runs with recipes beyond uniform SparseGPT")
    p.add_argument("--recipes-text", help="markdown file inserted before the recipes table")
    p.add_argument("--seeds-csv", help="CSV of runs repeated over calibration seeds")
    p.add_argument("--finetune-json", nargs="+", default=[], help="report.json files of `finetune` runs")
    p.add_argument("--sweep-json", nargs="+", default=[], help="JSONs of benchmarks/finetune_sweep.py")
    args = p.parse_args(argv)
    try:
        if args.out:
            pre = Path(args.preamble).read_text() if args.preamble else ""
            post = Path(args.postscript).read_text() if args.postscript else ""
            held = Path(args.holdout_csv) if args.holdout_csv else None
            text = Path(args.recipes_text).read_text() if args.recipes_text else ""
            atomic_write_text(results_markdown(Path(args.csv), Path(args.plots), pre, held, post,
                                               [Path(c) for c in args.recipes_csv], text,
                                               Path(args.seeds_csv) if args.seeds_csv else None,
                                               [Path(f) for f in args.finetune_json],
                                               [Path(f) for f in args.sweep_json]), args.out)
            print(f"wrote {args.out}")
            return 0
        rows = _main_rows(read_rows(Path(args.csv)))
        if not rows:
            raise UserError(f"no benchmark rows in {args.csv}")
        for model in args.models or sorted({r["model"] for r in rows}):
            print(f"\n{model}\n" + model_table(rows, model))
        return 0
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
