"""`cnn-sparsegpt show RUN_DIR ...`: what runs gave, read back from their folders (report.json, latency.json,
FILE.export.json), without loading a model or data. One run: its table as `prune` printed it, its fine-tuning,
latency and exports. Several (and the runs inside a folder given, such as its finetune/): one line each, side by
side."""
from __future__ import annotations

from pathlib import Path

from ..utils import UserError, read_json
from .export import format_export
from .finetune import format_finetune
from .latency import format_latency
from .pipeline import format_report
from .report import read_report


def run_folders(paths: list[str | Path]) -> list[Path]:
    """Each given run folder (one with report.json) followed by the run folders directly inside it (a fine-tuning's
    finetune/); a path that holds no run is a UserError."""
    runs = []
    for path in map(Path, paths):
        found = [path] if (path / "report.json").is_file() else []
        found += sorted(p for p in path.glob("*/") if (p / "report.json").is_file()) if path.is_dir() else []
        if not found:
            raise UserError(f"no run in {path}: give the --out folder of a `prune` or `finetune` run (it holds "
                            "report.json)")
        runs += [p for p in found if p not in runs]
    return runs


def describe(run: Path) -> str:
    """One run in full: the prune's table (or the fine-tuning's summary), then its latency and its exports."""
    r = read_report(run / "report.json")
    parts = [f"{run}:", format_finetune(r) if r.get("finetune") else format_report(r)]
    if (run / "latency.json").is_file():
        parts.append(format_latency(read_json(run / "latency.json")))
    parts += [format_export(read_json(p), verb="exported") for p in sorted(run.glob("*.export.json"))]
    return "\n".join(parts)


def _measured(r: dict) -> str:
    where = "held-out" if str(r.get("eval_split", "test")).startswith("holdout") else "test"
    if r.get("pruned_acc") is not None:
        drop = f" ({100 * (r['pruned_acc'] - r['dense_acc']):+.2f})" if r.get("dense_acc") is not None else ""
        return f"{100 * r['pruned_acc']:.2f}%{drop} {where}"
    if r.get("output_error") is not None:
        return f"output error {r['output_error']:.3g} {where}"
    return "not measured"


def _what(r: dict) -> str:
    f = r.get("finetune")
    tuned = f" + {f['epochs']} epoch(s) fine-tuning" if f else ""
    st = r.get("structure") or {}
    if st:
        (md, mk), _ = st["macs"], st["params"]
        return f"channels, {mk / md:.0%} of the MACs{tuned}"
    return f"{r['pattern']}{tuned}"


def _speedup(run: Path, r: dict) -> str:
    """latency.json's speed-ups, else the one a --target-speedup prune measured."""
    if (run / "latency.json").is_file():
        lat = read_json(run / "latency.json")
        return " / ".join(f"{row['speedup']:.2f}x" for row in lat["rows"]) + \
            f" ({lat['runtime']}, batch {' / '.join(str(row['batch']) for row in lat['rows'])})"
    lat = (r.get("structure") or {}).get("latency")
    return f"{lat['measured_speedup']:.2f}x ({lat['runtime']}, batch {lat['batch']}, at the prune)" if lat else "-"


def compare(runs: list[Path]) -> str:
    """Several runs, one line each: model, what was pruned, top-1 (or output error) and its change, the dense
    model's, the settings beyond the published method, the measured speed-up."""
    rows = [("run", "model", "pruned", "top-1 (change)", "dense", "options", "speed-up")]
    for run in runs:
        r = read_report(run / "report.json")
        dense = f"{100 * r['dense_acc']:.2f}%" if r.get("dense_acc") is not None else "-"
        rows.append((str(run), r["model"], _what(r), _measured(r), dense, r.get("recipe_label") or "as published",
                     _speedup(run, r)))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows)


def show(paths: list[str | Path]) -> str:
    """What `cnn-sparsegpt show` prints for these paths: one run folder in full (with a line for each run inside it),
    several side by side."""
    runs = run_folders(paths)
    if len(paths) == 1 and (Path(paths[0]) / "report.json").is_file():
        return describe(runs[0]) + (f"\n\n{compare(runs)}" if len(runs) > 1 else "")
    return compare(runs)


def add_show_parser(sub) -> None:
    p = sub.add_parser("show", help="print what runs gave, from their folders: one in full, several side by side")
    p.add_argument("runs", nargs="+", metavar="RUN_DIR", help="--out folders of prune or finetune runs (the runs "
                   "inside a folder, such as its finetune/, are shown too)")
    p.set_defaults(func=_cmd_show)


def _cmd_show(args) -> int:
    print(show(args.runs))
    return 0
