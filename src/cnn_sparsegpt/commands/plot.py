"""`cnn-sparsegpt plot`: figures from the benchmark CSV (and per-layer errors from one run's JSON report)."""
from __future__ import annotations

from collections import defaultdict
from dataclasses import replace
from pathlib import Path

from .bench import pattern_options, read_rows
from ..pruning.config import PUBLISHED, RECOMMENDED, recipe_label
from .report import read_report
from ..utils import UserError, file_stem

METHOD_STYLE = {"magnitude": ("tab:red", "o"), "wanda": ("tab:orange", "s"), "sparsegpt": ("tab:blue", "^")}


def _main_rows(rows: list[dict]) -> list[dict]:
    """The headline setting per model: test split, default damping, BN recalibration on, largest calibration size,
    and one recipe: the methods as published where the CSV has them, else the recommended recipe (other recipes
    are compared in the recipe tables)."""
    rows = [r for r in rows if r.get("holdout", "0") == "0"]

    def kind(r: dict) -> str | None:
        """published or recommended, each at its default damping (the label and the damping depend on the method
        and pattern); None for any other setting, and for channel targets (plotted against speed instead)."""
        if "=" in r["pattern"]:
            return None
        for name, preset in (("published", PUBLISHED), ("recommended", RECOMMENDED)):
            try:
                config = replace(preset, method=r["method"], **pattern_options(r["pattern"])).resolved()
            except (UserError, ValueError, TypeError):
                return None
            damping = float(r.get("percdamp") or config.percdamp)
            if (r.get("recipe") or "") == recipe_label(config) and abs(damping - config.percdamp) < 1e-12:
                return name
        return None

    kinds = [kind(r) for r in rows]
    headline = {}
    for r, k in zip(rows, kinds):
        if k and headline.get(r["model"]) != "published":
            headline[r["model"]] = k
    rows = [r for r, k in zip(rows, kinds) if r["model"] in headline and k == headline[r["model"]]]
    best_n = defaultdict(int)
    for r in rows:
        best_n[r["model"]] = max(best_n[r["model"]], int(r["nsamples"]))
    return [r for r in rows if r["bn_recalibration"] == "True" and int(r["nsamples"]) == best_n[r["model"]]
            and r["seed"] == "0"]


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise UserError("plotting needs matplotlib: pip install 'cnn-sparsegpt[plot]'") from None
    return plt


def plot_accuracy_vs_sparsity(rows: list[dict], out: Path) -> list[Path]:
    plt = _pyplot()
    written = []
    for model in sorted({r["model"] for r in rows}):
        mrows = [r for r in rows if r["model"] == model and ":" not in r["pattern"]]
        if not mrows:
            continue
        fig, ax = plt.subplots(figsize=(6, 4))
        dense = float(mrows[0]["dense_acc"]) * 100
        ax.axhline(dense, color="gray", ls="--", label=f"dense ({dense:.2f}%)")
        for method in sorted({r["method"] for r in mrows}):
            pts = sorted((float(r["target_sparsity"]), float(r["pruned_acc"]) * 100) for r in mrows
                         if r["method"] == method)
            color, marker = METHOD_STYLE.get(method, (None, "x"))
            ax.plot(*zip(*pts), marker=marker, color=color, label=method)
        ax.set(title=f"{model}: top-1 after one-shot unstructured pruning (no fine-tuning)",
               xlabel="fraction of weights pruned in each pruned layer", ylabel="test top-1 accuracy (%)")
        ax.title.set_fontsize(9)
        ax.grid(alpha=0.3)
        ax.legend()
        written.append(_save(plt, fig, out, f"{model}_accuracy_vs_sparsity.png"))
    return written


def plot_nm_bars(rows: list[dict], out: Path) -> Path | None:
    plt = _pyplot()
    nm = [r for r in rows if ":" in r["pattern"]]
    if not nm:
        return None
    groups = sorted({(r["model"], r["pattern"]) for r in nm})
    methods = [m for m in METHOD_STYLE if any(r["method"] == m for r in nm)]
    fig, ax = plt.subplots(figsize=(max(6, 1.3 * len(groups)), 4))
    width = 0.8 / len(methods)
    for j, method in enumerate(methods):  # the change from dense: at 2:4 the differences are too small for 0-100% bars
        xs, ys = [], []
        for i, (model, pattern) in enumerate(groups):
            r = next((r for r in nm if r["model"] == model and r["pattern"] == pattern and r["method"] == method), None)
            if r is not None:
                xs.append(i + (j - (len(methods) - 1) / 2) * width)
                ys.append((float(r["pruned_acc"]) - float(r["dense_acc"])) * 100)
        ax.bar(xs, ys, width, label=method, color=METHOD_STYLE[method][0])
    ax.axhline(0, color="gray", lw=0.8)
    ax.set_xticks(range(len(groups)), [f"{m}\n{p}" for m, p in groups], fontsize=8)
    ax.set(title="Change in top-1 from dense after one-shot N:M pruning (no fine-tuning)",
           ylabel="pruned − dense top-1 (percentage points)")
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    return _save(plt, fig, out, "nm_bars.png")


def plot_accuracy_vs_speedup(rows: list[dict], out: Path) -> list[Path]:
    """Per model: top-1 against the speed-up measured side by side (bench's `latency`), batch 1 and 32, one point
    per run labelled by its pattern (dense weights with zeros sit at 1x whatever their sparsity)."""
    plt = _pyplot()
    written = []
    timed = [r for r in rows if r.get("speedup_b1")]
    for model in sorted({r["model"] for r in timed}):
        mrows = [r for r in timed if r["model"] == model]
        fig, ax = plt.subplots(figsize=(6, 4))
        dense = float(mrows[0]["dense_acc"]) * 100
        ax.axhline(dense, color="gray", ls="--", label=f"dense ({dense:.2f}%)")
        for batch, marker in (("1", "o"), ("32", "s")):
            pts = [(float(r[f"speedup_b{batch}"]), float(r["pruned_acc"]) * 100, r["pattern"]) for r in mrows
                   if r.get(f"speedup_b{batch}")]
            ax.scatter([p[0] for p in pts], [p[1] for p in pts], marker=marker, label=f"batch {batch}")
            for x, y, label in pts:
                ax.annotate(label, (x, y), fontsize=6, xytext=(3, 3), textcoords="offset points")
        ax.set(title=f"{model}: top-1 against measured speed-up ({mrows[0].get('latency_runtime')}, one-shot)",
               xlabel="speed-up over the dense model (side by side, median call)", ylabel="top-1 accuracy (%)")
        ax.title.set_fontsize(9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        written.append(_save(plt, fig, out, f"{model}_accuracy_vs_speedup.png"))
    return written


def plot_output_error_vs_sparsity(rows: list[dict], out: Path) -> list[Path]:
    """Per model measured by its outputs (bench rows of metric output: not a classifier, or images without labels):
    the pruned model's output error against the dense model's, by the sparsity reached; N:M points labelled."""
    plt = _pyplot()
    written = []
    for model in sorted({r["model"] for r in rows}):
        mrows = [r for r in rows if r["model"] == model]
        fig, ax = plt.subplots(figsize=(6, 4))
        for method in sorted({r["method"] for r in mrows}):
            pts = sorted((float(r["sparsity"]), float(r["output_error"]), r["pattern"]) for r in mrows
                         if r["method"] == method)
            color, marker = METHOD_STYLE.get(method, (None, "x"))
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=marker, color=color, label=method, ls="")
            for x, y, pattern in pts:
                if ":" in pattern or "=" in pattern:
                    ax.annotate(pattern, (x, y), fontsize=6, xytext=(3, 3), textcoords="offset points")
        ax.set(yscale="log", title=f"{model}: output error after one-shot pruning (no fine-tuning)",
               xlabel="fraction of the pruned layers' weights pruned",
               ylabel="‖y − y_dense‖² / ‖y_dense‖² on evaluation images")
        ax.title.set_fontsize(9)
        ax.grid(alpha=0.3)
        ax.legend()
        written.append(_save(plt, fig, out, f"{model}_output_error_vs_sparsity.png"))
    return written


def plot_layer_errors(report_paths: list[Path], out: Path, name: str) -> Path:
    """Per-layer relative reconstruction error of one or more runs of the same model and pattern."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 4))
    title = ""
    for p in report_paths:
        rep = read_report(p)
        layers = [x for x in rep["layers"] if not x["skipped"]]
        color, marker = METHOD_STYLE.get(rep["method"], (None, "x"))
        ax.plot(range(len(layers)), [x["error"] for x in layers], marker=marker, color=color, label=rep["method"])
        ax.set_xticks(range(len(layers)), [x["name"] for x in layers], rotation=90, fontsize=6)
        title = f"{rep['model']} {rep['pattern']}: per-layer reconstruction error on calibration inputs"
    ax.set(yscale="log", title=title, ylabel="‖WX − ŴX‖² / ‖WX‖²")
    ax.title.set_fontsize(9)
    ax.legend()
    ax.grid(alpha=0.3)
    return _save(plt, fig, out, f"{name}_layer_errors.png")


def _save(plt, fig, out: Path, name: str) -> Path:
    path = out / file_stem(name)  # model names may hold ':' or '/'
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_layer_sparsity(report_paths: list[Path], out: Path, name: str) -> Path:
    """Per-layer sparsity chosen by non-uniform allocations (one line per run of the same model and level)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 4))
    for p in report_paths:
        rep = read_report(p)
        layers = [x for x in rep["layers"] if not x["skipped"]]
        label = f"{rep['method']} {rep.get('recipe_label') or 'uniform'}"
        ax.plot(range(len(layers)), [x["sparsity"] for x in layers], marker=".", label=label)
        ax.set_xticks(range(len(layers)), [x["name"] for x in layers], rotation=90, fontsize=6)
        ax.set_title(f"{rep['model']}: per-layer sparsity at {rep['pattern']} overall", fontsize=9)
    ax.set(ylabel="fraction of the layer's weights pruned", ylim=(0, 1))
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    return _save(plt, fig, out, f"{name}_layer_sparsity.png")


def make_plots(csv_path: str | Path, out: str | Path = "experiments/plots") -> list[Path]:
    rows = read_rows(Path(csv_path))
    if not rows:
        raise UserError(f"no benchmark rows in {csv_path}: run `cnn-sparsegpt bench` first")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    written = plot_output_error_vs_sparsity([r for r in rows if r.get("output_error")], out)
    rows = [r for r in rows if r.get("pruned_acc")]  # the rest plot top-1
    allocated = [r for r in rows if "allocation=" in (r.get("recipe") or "") and Path(r["report"]).is_file()]
    written += plot_accuracy_vs_speedup(rows, out)
    rows = _main_rows(rows)
    written += plot_accuracy_vs_sparsity(rows, out)
    for model, pattern in sorted({(r["model"], r["pattern"]) for r in allocated}):
        reps = [Path(r["report"]) for r in allocated if (r["model"], r["pattern"]) == (model, pattern)]
        written.append(plot_layer_sparsity(reps, out, f"{model}_{pattern}"))
    bars = plot_nm_bars(rows, out)
    written += [bars] if bars else []
    for model in sorted({r["model"] for r in rows}):  # per-layer errors at 2:4, all methods
        reps = [Path(r["report"]) for r in rows if r["model"] == model and r["pattern"] == "2:4"
                and Path(r["report"]).is_file()]
        if reps:
            written.append(plot_layer_errors(reps, out, f"{model}_2of4"))
    return written


def add_plot_parser(sub) -> None:
    p = sub.add_parser("plot", help="draw PNGs from the benchmark CSV")
    p.add_argument("--csv", default="experiments/results.csv", help="benchmark CSV (default %(default)s)")
    p.add_argument("--out", default="experiments/plots", help="folder for the PNGs (default %(default)s)")
    p.set_defaults(func=lambda args: print("\n".join(f"wrote {p}" for p in make_plots(args.csv, args.out))) or 0)
