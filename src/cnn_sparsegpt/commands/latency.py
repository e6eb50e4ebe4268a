"""`cnn-sparsegpt latency RUN_DIR`: the pruned model against the dense one it came from, timed side by side in one
process on a real runtime (ONNX Runtime on the CPU by default, its INT8 models, or PyTorch eager), at each batch size;
`--also RUNTIME` times both on more runtimes in the same rounds (e.g. the pruned INT8 model against the dense float
one), each against the first runtime's dense model.

Both models are BatchNorm-folded as `export` folds them. Dense and pruned alternate in rounds (so that a noisy
machine slows both alike); each round times `runs` calls after `warmup` untimed ones; the figure is the median
call. Results go to RUN_DIR/latency.json (raw per-call seconds included) and are printed.

`--top1` adds each runtime's top-1 of both models on the run's evaluation images (an INT8 runtime calibrated on
the run's own images), so that speed and accuracy of what would ship are read side by side.
"""
from __future__ import annotations

from pathlib import Path

import torch

from ..deploy.accuracy import top1
from ..deploy.runtimes import RUNTIMES, runtime as runtime_class, side_by_side
from ..utils import UserError, as_module, atomic_write_json, run_metadata
from .export import RunData, add_run_data_arguments, input_shape, run_data, run_data_options
from .pipeline import load_dense, load_run


def model_key(r: str, runtime: str, which: str) -> str:
    """The name of the `which` ('dense' or 'pruned') model on runtime r: bare on the first runtime, else 'r which'."""
    return which if r == runtime else f"{r} {which}"


def runtime_models(dense, pruned, shape, runtime: str = "onnxruntime", also: tuple[str, ...] = (),
                   threads: int | None = None, calibration: torch.Tensor | None = None) -> dict:
    """The dense and the pruned model on each runtime, by name: 'dense' and 'pruned' on `runtime`, 'R dense' and
    'R pruned' on each R of `also`; `calibration`: images for a runtime that quantizes (else random ones)."""
    makes = {r: runtime_class(r) for r in (runtime, *also)}
    if threads:
        torch.set_num_threads(threads)
    example = torch.randn(1, *shape, generator=torch.Generator().manual_seed(0))
    models = {}
    for r, make in makes.items():
        models |= {model_key(r, runtime, which): make(model.cpu(), example, threads, calibration)
                   for which, model in (("dense", dense), ("pruned", pruned))}
    return models


def time_models(models: dict, shape, runtime: str = "onnxruntime", batch_sizes=(1, 32), warmup: int = 5,
                runs: int = 20, rounds: int = 3, also: tuple[str, ...] = ()) -> list[dict]:
    """Per batch size: median seconds per call of runtime_models' models side by side, dense/pruned, and with
    `also` the same two on each of those runtimes with their speed-ups over the first runtime's dense model."""
    rows = []
    for b in batch_sizes:
        x = torch.randn(b, *shape, generator=torch.Generator().manual_seed(b))
        calls, med = side_by_side(models, x, warmup, runs, rounds)
        row = {"batch": b, "dense_s": med["dense"], "pruned_s": med["pruned"], "speedup": med["dense"] / med["pruned"],
               "calls": calls}
        if also:
            row["also"] = {r: {"dense_s": med[f"{r} dense"], "pruned_s": med[f"{r} pruned"],
                               "dense_speedup": med["dense"] / med[f"{r} dense"],
                               "pruned_speedup": med["dense"] / med[f"{r} pruned"]} for r in also if r != runtime}
        rows.append(row)
    return rows


def compare_latency(dense, pruned, shape, runtime: str = "onnxruntime", batch_sizes=(1, 32), warmup: int = 5,
                    runs: int = 20, rounds: int = 3, threads: int | None = None, also: tuple[str, ...] = ()
                    ) -> list[dict]:
    """Per batch size: median seconds per call of the dense and the pruned model side by side, and dense/pruned;
    with `also`, the same two on each of those runtimes in the same rounds, with their speed-ups over the first
    runtime's dense model."""
    models = runtime_models(as_module(dense, "the dense model"), as_module(pruned, "the pruned model"), shape,
                            runtime, also, threads)
    return time_models(models, shape, runtime, batch_sizes, warmup, runs, rounds, also)


def runtime_top1(models: dict, runtime: str, also: tuple[str, ...], test, progress: bool = True) -> dict:
    """Top-1 (a fraction) of the dense and the pruned model on each runtime over the images `test`."""
    return {r: {which: top1(models[model_key(r, runtime, which)], test, progress=progress,
                            desc=f"{r} {which} accuracy") for which in ("dense", "pruned")}
            for r in (runtime, *also)}


def measure_latency(run_dir: str | Path, runtime: str = "onnxruntime", batch_sizes=(1, 32), warmup: int = 5,
                    runs: int = 20, rounds: int = 3, threads: int | None = None, teacher: str | None = None,
                    out: str | Path | None = None, also: tuple[str, ...] = (), accuracy: RunData | None = None
                    ) -> dict:
    """Median seconds per call of the dense and the pruned model of a run, at each batch size; the speed-up is
    dense / pruned. With `accuracy` (the run's data), also each runtime's top-1 of both models on the run's
    evaluation images, an INT8 runtime calibrated on the run's calibration images. Written to `out` (default
    RUN_DIR/latency.json)."""
    for r in (runtime, *also):  # an unknown runtime before loading anything
        runtime_class(r)
    for name, value in (("warmup", warmup), ("runs", runs), ("rounds", rounds)):
        if value < (0 if name == "warmup" else 1):
            raise UserError(f"--{name} must be {'>= 0' if name == 'warmup' else 'at least 1'}, got {value}")
    if not batch_sizes or any(b < 1 for b in batch_sizes):
        raise UserError(f"--batch-sizes must be positive, got {list(batch_sizes)}")
    if accuracy is not None:
        accuracy.check()
    out = Path(out) if out else Path(run_dir) / "latency.json"
    pruned, report, _ = load_run(run_dir)
    if accuracy is not None and report.get("metric") == "output":
        raise UserError(f"--top1 measures a classifier's accuracy on labelled images, and {run_dir} measured its "
                        "outputs against the dense model's (--metric output)")
    dense = load_dense(report, teacher)
    shape = input_shape(report)
    also = tuple(dict.fromkeys(r for r in also if r != runtime))
    calib, test, same = run_data(report, accuracy, "--top1") if accuracy is not None else (None, None, None)
    models = runtime_models(dense, pruned, shape, runtime, also, threads, calib)
    rows = time_models(models, shape, runtime, batch_sizes, warmup, runs, rounds, also)
    result = {"run": str(run_dir), "model": report["model"], "pattern": report.get("pattern"), "runtime": runtime,
              "also": list(also),
              "input_shape": shape, "warmup": warmup, "runs": runs, "rounds": rounds, "threads": threads,
              "macs": (report.get("structure") or {}).get("macs"), "rows": rows} | run_metadata(torch.device("cpu"))
    if accuracy is not None and len(test) and accuracy.eval_samples != 0:
        result |= {"top1": runtime_top1(models, runtime, also, test, accuracy.progress), "eval_images": len(test),
                   "eval_split": report.get("eval_split", "test")}
        if not accuracy.eval_samples and report.get("pruned_acc") is not None:  # prune's figures: the same images
            result["torch_top1"] = {"dense": report.get("dense_acc"), "pruned": report["pruned_acc"]}
        if any(RUNTIMES[r].name.endswith("-int8") for r in (runtime, *also)):
            result |= {"int8_calibration_images": len(calib), "int8_calibration": accuracy.calibration,
                       "int8_calibration_is_the_runs": same and not accuracy.samples}
    atomic_write_json(result, out)
    return result


def add_latency_parser(sub) -> None:
    p = sub.add_parser("latency", help="time a pruned run against its dense model on a real runtime (side by side)")
    p.add_argument("run_dir", metavar="RUN_DIR", help="the --out folder of a `prune` run")
    p.add_argument("--runtime", default="onnxruntime", help=f"{' | '.join(RUNTIMES)} (default onnxruntime, CPU)")
    p.add_argument("--also", action="append", default=[], metavar="RUNTIME",
                   help="time dense and pruned on this runtime too, in the same rounds, each against the first "
                        "runtime's dense model (repeatable; e.g. --also onnxruntime-int8)")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 32], help="default 1 32")
    p.add_argument("--warmup", type=int, default=5, help="untimed calls before each timed round (default 5)")
    p.add_argument("--runs", type=int, default=20, help="timed calls per model per round (default 20)")
    p.add_argument("--rounds", type=int, default=3, help="rounds, alternating dense and pruned (default 3)")
    p.add_argument("--threads", type=int, help="intra-op threads (default: the runtime's)")
    p.add_argument("--teacher", help="the dense checkpoint (default: the run's --weights, as report.json names it)")
    p.add_argument("--out", help="JSON to write (default RUN_DIR/latency.json)")
    p.add_argument("--top1", action="store_true",
                   help="also measure top-1 of the dense and the pruned model on every runtime named, on the run's "
                        "evaluation images (an INT8 runtime calibrated on the run's calibration images); needs the "
                        "run's data (--data-dir)")
    add_run_data_arguments(p, "--top1")
    p.set_defaults(func=_cmd_latency)


def _cmd_latency(args) -> int:
    r = measure_latency(args.run_dir, args.runtime, args.batch_sizes, args.warmup, args.runs, args.rounds,
                        args.threads, args.teacher, args.out, tuple(args.also),
                        run_data_options(args, "--top1", args.top1))
    print(format_latency(r))
    print(f"wrote {args.out or Path(args.run_dir) / 'latency.json'}")
    return 0


def format_latency(r: dict) -> str:
    """latency.json in a few lines: each batch size's times and speed-up (and top-1 where measured)."""
    lines = [f"{r['model']} {r['pattern']} on {r['runtime']} (median of {r['runs'] * r['rounds']} calls):"]
    for row in r["rows"]:
        lines.append(f"  batch {row['batch']:>4}: dense {1000 * row['dense_s']:.2f} ms, pruned "
                     f"{1000 * row['pruned_s']:.2f} ms, speed-up {row['speedup']:.2f}x")
        for name, a in row.get("also", {}).items():
            lines.append(f"  {'':>10} {name}: dense {1000 * a['dense_s']:.2f} ms ({a['dense_speedup']:.2f}x), pruned "
                         f"{1000 * a['pruned_s']:.2f} ms ({a['pruned_speedup']:.2f}x) against {r['runtime']}'s dense")
    if "top1" in r:
        torch_top1 = r.get("torch_top1") or {}
        lines.append(f"  top-1 on {r['eval_images']} {r['eval_split']} images:")
        for name, t in ({"PyTorch (prune's)": torch_top1} | r["top1"]).items():
            if t.get("pruned") is not None:
                dense = f"dense {100 * t['dense']:.2f}%, " if t.get("dense") is not None else ""
                lines.append(f"  {name:>17}: {dense}pruned {100 * t['pruned']:.2f}%")
    return "\n".join(lines)
