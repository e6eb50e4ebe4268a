#!/usr/bin/env bash
# INT8 on ONNX Runtime (this CPU): the shared CIFAR checkpoints pruned with the default recipe (2:4, half the
# multiply-adds by channels, and sparsity 0 for the dense network with BatchNorm re-estimated), each exported with
# `export --int8` (ORT's minmax ranges from the run's 1024 calibration images, not tuned; top-1 of the float and the
# INT8 model on the whole test split, measured once) and timed with `latency --also onnxruntime-int8` (dense and pruned,
# float and INT8, side by side in one process). Each run's report, export and latency JSON are copied to OUT_DIR.
#   bash benchmarks/int8_onnxruntime.sh DATA_DIR OUT_DIR
set -euo pipefail
DATA=${1:-../shared/data}
OUT=${2:-experiments/int8}
RUNS=${RUNS:-runs/int8}
mkdir -p "$OUT" "$RUNS"
CK=../shared/checkpoints
run() {  # MODEL NAME PRUNE-OPTIONS...
    python3 -m cnn_sparsegpt -q prune --model "$1" --weights "$CK/${1%_cifar}_cifar10.pt" --data-dir "$DATA" \
        --out "$RUNS/$2" "${@:3}" | grep "top-1"
    python3 -m cnn_sparsegpt -q export "$RUNS/$2" --int8 "$RUNS/$2/int8.onnx" --data-dir "$DATA"
    python3 -m cnn_sparsegpt -q latency "$RUNS/$2" --also onnxruntime-int8 --out "$OUT/$2.latency.json"
    cp "$RUNS/$2/report.json" "$OUT/$2.report.json"
    cp "$RUNS/$2/int8.export.json" "$OUT/$2.export.json"
}
run resnet20_cifar resnet20_dense --sparsity 0 --recipe published
run resnet20_cifar resnet20_24 --nm 2:4
run resnet18_cifar resnet18_dense --sparsity 0 --recipe published
run resnet18_cifar resnet18_24 --nm 2:4
run resnet18_cifar resnet18_keep50 --structure channels --keep-macs 0.5
