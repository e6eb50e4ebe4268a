"""OpenVINO on pruned runs (this CPU): top-1 of each run's model on OpenVINO float32 and bfloat16 against PyTorch's
(report.json's), on the run's own evaluation images, and `latency --also onnxruntime-int8 --also openvino --also
openvino-bf16` (dense and pruned on every CPU runtime, side by side in one process, against ONNX Runtime's dense
float32 model). The runs are those of `bash benchmarks/int8_onnxruntime.sh` (default recipe; RUNS=runs/int8).

    python benchmarks/openvino_runs.py runs/int8/* --data-dir ../shared/data --json experiments/runtimes/cifar_runs.json
"""
from __future__ import annotations

import argparse
import warnings
from pathlib import Path

import torch

from cnn_sparsegpt.commands.latency import measure_latency
from cnn_sparsegpt.commands.pipeline import load_run, run_images
from cnn_sparsegpt.deploy.accuracy import top1
from cnn_sparsegpt.deploy.runtimes import runtime
from cnn_sparsegpt.utils import atomic_write_json, run_metadata

ALSO = ("onnxruntime-int8", "openvino", "openvino-bf16")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--json", required=True)
    args = p.parse_args()
    out = {"runs": {}} | run_metadata(torch.device("cpu"))
    for run in args.runs:
        model, report, _ = load_run(run)
        _, test, _ = run_images(report, args.data_dir)
        example = torch.zeros(1, *report["input_shape"])
        row = {"model": report["model"], "pattern": report["pattern"], "torch_top1": report["pruned_acc"]}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            for name in ("openvino", "openvino-bf16"):
                row[f"{name}_top1"] = top1(runtime(name)(model, example, None), test, progress=False)
        row["latency"] = measure_latency(run, "onnxruntime", also=ALSO, out=Path(args.json).with_suffix("")
                                         .with_name(f"{Path(run).name}.latency.json"))["rows"]
        for r in row["latency"]:
            r.pop("calls")
        out["runs"][Path(run).name] = row
        print(Path(run).name, {k: v for k, v in row.items() if k != "latency"}, flush=True)
        atomic_write_json(out, args.json)


if __name__ == "__main__":
    main()
