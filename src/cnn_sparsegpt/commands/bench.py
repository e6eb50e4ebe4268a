"""`cnn-sparsegpt bench`: a grid of prune runs from YAML, one CSV row per run, resumable."""
from __future__ import annotations

import csv
import hashlib
import io
import itertools
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from ..pruning import dist
from ..pruning.config import PRESETS, RECIPE_KEYS, recipe_label
from ..utils import UserError, atomic_write_json, atomic_write_text, file_stem, git_commit
from ..deploy.runtimes import RUNTIMES
from .options import PruneOptions, check_options, read_yaml_mapping

KEY = ("model", "checkpoint", "dataset", "method", "pattern", "nsamples", "seed", "bn_recalibration", "eval_samples",
       "holdout", "percdamp", "recipe")
COLUMNS = KEY + (
    "data_source", "target_sparsity", "sparsity", "total_sparsity", "layers_pruned", "layers_skipped",
    "dense_acc", "pruned_acc", "drop", "prune_seconds", "eval_seconds", "peak_rss_mb", "peak_gpu_mb",
    "forward_passes", "macs_kept", "latency_runtime", "speedup_b1", "speedup_b32", "report", "git_commit",
    "torch_version", "device", "date", "metric", "output_error", "output_agreement")
LATENCY_BATCHES = (1, 32)  # the speedup_bN columns


@dataclass
class BenchModel:
    model: str
    model_kwargs: dict = field(default_factory=dict)  # the builder's keyword arguments, as prune's --model-kwargs
    weights: str | None = None  # checkpoint; its path is part of each row's key
    dataset: str | None = None
    methods: list = field(default_factory=lambda: ["magnitude", "wanda", "sparsegpt"])
    # sparsity levels, N:M, or channel targets: keep_macs=F, keep_params=F, target_speedup=S (then a pattern on the
    # smaller network: keep_macs=0.7+2:4)
    patterns: list = field(default_factory=lambda: ["0.5", "2:4"])
    ignore: list = field(default_factory=list)  # layer names or regexes kept dense
    # top1 | output | auto, as prune's --metric (output: a model that is not a classifier); not part of a row's key,
    # so one CSV holds one metric per model
    metric: str = "auto"


@dataclass
class BenchConfig:
    models: list = field(default_factory=list)  # BenchModel mappings
    csv: str = "experiments/results.csv"  # one row per run, appended as runs finish
    reports: str = "experiments/reports"  # per-run JSON report (per-layer errors)
    nsamples: list = field(default_factory=lambda: [1024])  # calibration sizes
    bn_recalibration: list = field(default_factory=lambda: [True])
    seeds: list = field(default_factory=lambda: [0])
    data_dir: str | None = None
    device: str = "auto"
    percdamp: float | None = None  # None: the prune's default (0.01 for weight masks, 0.001 for channels)
    eval_samples: int = 0  # 0 = the whole test split
    holdout: int = 0  # > 0: evaluate on that many held-out training images instead (for choosing settings)
    low_memory: bool | None = None  # None: by free memory; same results either way
    recipe: str = "recommended"  # recommended | published: the base every entry of `recipes` starts from
    recipes: list = field(default_factory=lambda: [{}])  # option sets beyond uniform SparseGPT, e.g. {allocation: dp}
    latency: str | None = None  # a runtime (onnxruntime, torch): time dense and pruned side by side, batch 1 and 32


def load_bench_config(path: str) -> BenchConfig:
    data = read_yaml_mapping(path)
    models = data.pop("models", None)
    for key in ("nsamples", "bn_recalibration", "seeds"):
        if key in data and not isinstance(data[key], list):
            data[key] = [data[key]]
    for key in ("nsamples", "bn_recalibration", "seeds"):
        kinds = bool if key == "bn_recalibration" else int
        for v in data.get(key, []):
            if not isinstance(v, kinds) or (kinds is int and isinstance(v, bool)):
                raise UserError(f"{path}: '{key}' must be a list of {kinds.__name__}, got {v!r}")
    known = set(BenchConfig.__dataclass_fields__)
    for key in data:
        if key not in known:
            raise UserError(f"{path}: unknown key '{key}'; valid keys: models, {', '.join(sorted(known - {'models'}))}")
    for i, r in enumerate(data.get("recipes", [{}])):
        if not isinstance(r, dict) or set(r) - set(RECIPE_KEYS + ("recipe",)):
            raise UserError(f"{path}: recipes[{i}] must be a mapping of recipe, {', '.join(RECIPE_KEYS)}, got {r!r}")
        check_options(PruneOptions, r, f"{path}: recipes[{i}]")
    cfg = BenchConfig(**{k: v for k, v in data.items()})
    if cfg.latency is not None and cfg.latency not in RUNTIMES:
        raise UserError(f"{path}: 'latency' must be a runtime, one of {', '.join(RUNTIMES)}, got {cfg.latency!r}")
    if cfg.recipe not in PRESETS:
        raise UserError(f"{path}: 'recipe' must be one of {', '.join(PRESETS)}, got {cfg.recipe!r}")
    if not models or not isinstance(models, list):
        raise UserError(f"{path}: 'models' must be a non-empty list of {{model: NAME, weights: PATH, ...}}")
    for i, m in enumerate(models):
        if not isinstance(m, dict) or "model" not in m:
            raise UserError(f"{path}: models[{i}] needs at least 'model: NAME'")
        bad = set(m) - set(BenchModel.__dataclass_fields__)
        if bad:
            raise UserError(f"{path}: models[{i}]: unknown key '{sorted(bad)[0]}'; valid keys: "
                            f"{', '.join(BenchModel.__dataclass_fields__)}")
        m = dict(m)
        m["patterns"] = [str(p) for p in m.get("patterns", BenchModel(model="").patterns)]
        cfg.models.append(BenchModel(**m))
    return cfg


CHANNEL_TARGETS = ("keep_macs", "keep_params", "target_speedup")


def pattern_options(pattern: str) -> dict:
    """A grid pattern: '0.5' (sparsity), '2:4' (N:M) or 'keep_macs=0.5' / 'keep_params=0.5' /
    'target_speedup=2' (channels), or a channel target then a pattern for the smaller network ('keep_macs=0.7+2:4')."""
    if "+" in pattern:
        first, _, then = pattern.partition("+")
        channels, weights = pattern_options(first), pattern_options(then)
        if "structure" not in channels or "structure" in weights:
            raise UserError(f"pattern '{pattern}': a channel target, then a sparsity or N:M (e.g. keep_macs=0.7+2:4)")
        return channels | weights
    if "=" in pattern:
        key, _, value = pattern.partition("=")
        if key not in CHANNEL_TARGETS:
            raise UserError(f"unknown pattern '{pattern}': use a sparsity (0.5), N:M (2:4), keep_macs=F, "
                            "keep_params=F or target_speedup=S")
        try:
            return {"structure": "channels", key: float(value)}
        except ValueError:
            raise UserError(f"pattern '{pattern}': {value!r} is not a number") from None
    return {"nm": pattern} if ":" in pattern else {"sparsity": float(pattern)}


def read_rows(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def _key(row: dict) -> tuple:
    return tuple(str(row.get(k) or "") if k == "recipe" else str(row[k]) for k in KEY)


def append_row(path: Path, row: dict) -> None:
    """Rewrite the CSV with the new row through a temporary file: a kill never leaves half a row."""
    rows = read_rows(path) + [{k: row.get(k, "") for k in COLUMNS}]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=COLUMNS, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(buf.getvalue(), path)


class PeakRSS:
    """Peak resident memory of this process while the block runs (sampled from /proc; ru_maxrss elsewhere)."""

    def __enter__(self):
        self.peak, self._stop = self._rss(), threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()
        return self

    @staticmethod
    def _rss() -> int:
        try:
            with open("/proc/self/statm") as f:
                return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        except OSError:
            import resource

            return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    def _loop(self):
        while not self._stop.wait(0.02):
            self.peak = max(self.peak, self._rss())

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._rss())


def grid(cfg: BenchConfig):
    for m in cfg.models:
        for method, pattern, bn, n, seed, recipe in itertools.product(m.methods, m.patterns, cfg.bn_recalibration,
                                                                      cfg.nsamples, cfg.seeds, cfg.recipes):
            yield m, method, pattern, bn, n, seed, recipe


def run_bench(cfg: BenchConfig, progress: bool = True) -> list[dict]:
    from .pipeline import measured, run_prune

    git_commit()  # the code this run loaded, for every row (utils.git_commit)
    csv_path, reports = Path(cfg.csv), Path(cfg.reports)
    done = {_key(r) for r in read_rows(csv_path)}
    dense = {(r["model"], r["checkpoint"], r["eval_samples"], r["holdout"]): float(r["dense_acc"])
             for r in read_rows(csv_path) if r.get("dense_acc")}
    runs = list(grid(cfg))
    new_rows = []
    for i, (m, method, pattern, bn, n, seed, recipe) in enumerate(runs, 1):
        label = f"[{i}/{len(runs)}] {m.model} {method} {pattern} n={n} bn={'on' if bn else 'off'} seed={seed}"
        try:
            opts = PruneOptions.build(dict(model=m.model, model_kwargs=m.model_kwargs, weights=m.weights,
                                           dataset=m.dataset, data_dir=cfg.data_dir,
                                           method=method, nsamples=n, seed=seed, bn_recalibration=bn,
                                           device=cfg.device, percdamp=cfg.percdamp, eval_samples=cfg.eval_samples,
                                           holdout=cfg.holdout, ignore=list(m.ignore), low_memory=cfg.low_memory,
                                           metric=m.metric,
                                           **pattern_options(pattern), **({"recipe": cfg.recipe} | recipe)))
        except UserError as e:  # a combination of the grid that cannot run (e.g. bn_aware with wanda)
            if dist.is_main(dist.process_group()):
                print(f"{label} {recipe}: skipped, {e}", flush=True)
            continue
        key_row = {"model": m.model, "checkpoint": m.weights or "", "dataset": m.dataset or "",
                   "method": method, "pattern": pattern, "nsamples": n, "seed": seed, "bn_recalibration": bn,
                   "eval_samples": cfg.eval_samples, "holdout": cfg.holdout,
                   "percdamp": opts.config.resolved().percdamp,
                   "recipe": recipe_label(opts.config.resolved(dist.launched()))}  # what runs (torchrun: uniform)
        label += f"{' ' + key_row['recipe'] if key_row['recipe'] else ''}"
        if _key(key_row) in done:
            if dist.is_main(dist.process_group()):
                print(f"{label}: already in {csv_path}, skipped", flush=True)
            continue
        t0 = time.perf_counter()
        dense_key = (m.model, m.weights or "", str(cfg.eval_samples), str(cfg.holdout))
        with PeakRSS() as mem:
            r, pruned = run_prune(opts, progress=progress, dense_acc=dense.get(dense_key), write=False,
                                  return_model=True)
        dense[dense_key] = r["dense_acc"]
        timing = _latency_columns(cfg.latency, r, pruned) if cfg.latency and dist.is_main(dist.process_group()) \
            else {}
        name = hashlib.sha1(repr(_key(key_row)).encode()).hexdigest()[:12]
        stem = file_stem(f"{m.model}-{method}-{pattern.replace(':', 'of').replace('=', '-')}")
        report_path = reports / f"{stem}-{name}.json"
        row = key_row | {
            "data_source": r["data_source"], "target_sparsity": r["target_sparsity"], "sparsity": r["sparsity"],
            "total_sparsity": r["total_sparsity"], "layers_pruned": sum(not x["skipped"] for x in r["layers"]),
            "layers_skipped": sum(x["skipped"] for x in r["layers"]), "dense_acc": r["dense_acc"],
            "pruned_acc": r["pruned_acc"], "prune_seconds": r["seconds"], "metric": r["metric"],
            "output_error": r["output_error"], "output_agreement": r.get("output_agreement"),
            "drop": r["dense_acc"] - r["pruned_acc"] if r["pruned_acc"] is not None else None,
            "eval_seconds": r["eval_seconds"], "peak_rss_mb": mem.peak / 2**20,
            "peak_gpu_mb": (r["peak_gpu_memory"] or 0) / 2**20, "forward_passes": r["forward_passes"],
            "macs_kept": _macs_kept(r), **timing, "report": str(report_path), "git_commit": r["git_commit"],
            "torch_version": r["torch_version"], "device": r["device"], "date": r["date"]}
        new_rows.append(row)
        if not dist.is_main(dist.process_group()):  # torchrun: rank 0 writes and prints
            continue
        atomic_write_json(r, report_path)
        append_row(csv_path, row)
        print(f"{label}: {measured(r)}, sparsity {r['sparsity']:.3f}, {r['seconds']:.1f} s pruning "
              f"({time.perf_counter() - t0:.0f} s in all)", flush=True)
    return new_rows


def _macs_kept(r: dict) -> float | str:
    """Fraction of the dense multiply-adds per image a run keeps: its channels, else its weights' non-zeros."""
    st = r.get("structure") or {}
    if st.get("macs"):
        return st["macs"][1] / st["macs"][0]
    return ""


def _latency_columns(runtime: str, r: dict, pruned) -> dict:
    """speedup_b1/b32: the run's pruned model against its dense checkpoint, side by side (commands.latency)."""
    from .latency import compare_latency
    from .pipeline import load_dense

    rows = compare_latency(load_dense(r), pruned, r["input_shape"], runtime, LATENCY_BATCHES)
    r["latency"] = {"runtime": runtime, "rows": [{k: v for k, v in row.items() if k != "calls"} for row in rows]}
    return {"latency_runtime": runtime} | {f"speedup_b{row['batch']}": row["speedup"] for row in rows}


def add_bench_parser(sub) -> None:
    p = sub.add_parser("bench", help="run a grid of prunes from a YAML file; one CSV row per run, resumable")
    p.add_argument("--config", required=True, help="YAML grid, e.g. configs/bench_default.yaml")
    p.add_argument("--csv", help="override the CSV path of the config")
    p.add_argument("--data-dir", help="data root for every run (overrides the config)")
    p.add_argument("--device", help="auto, cpu, cuda or cuda:N (overrides the config)")
    p.set_defaults(func=_cmd_bench)


def _cmd_bench(args) -> int:
    from ..utils import ensure_writable

    cfg = load_bench_config(args.config)
    for name in ("csv", "data_dir", "device"):
        if getattr(args, name):
            setattr(cfg, name, getattr(args, name))
    ensure_writable(Path(cfg.csv).parent)
    t0 = time.perf_counter()
    run_bench(cfg, progress=not args.quiet)
    if dist.is_main(dist.process_group()):
        print(f"bench done in {time.perf_counter() - t0:.0f} s; results in {cfg.csv}")
    return 0
