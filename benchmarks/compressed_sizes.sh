#!/usr/bin/env bash
# Compressed files of the shared ResNet-18 (issue 20's size goals): 2:4 + 4-bit and 90% + 8-bit, each pruned with
# the default recipe on 1024 calibration images, exported with BatchNorm folded; the export JSON (sizes per
# encoding, against the fp32 state dict) and the prune report are copied to OUT_DIR.
#   bash benchmarks/compressed_sizes.sh DATA_DIR OUT_DIR
set -euo pipefail
DATA=${1:-../shared/data}
OUT=${2:-experiments/compressed}
RUNS=${RUNS:-runs/compressed}
CK=../shared/checkpoints
mkdir -p "$OUT" "$RUNS"
run() {  # NAME PATTERN-FLAGS...
    name=$1; shift
    python3 -m cnn_sparsegpt -q prune --model resnet18_cifar --weights $CK/resnet18_cifar10.pt --data-dir "$DATA" \
        "$@" --out "$RUNS/$name" | grep "top-1"
    python3 -m cnn_sparsegpt export "$RUNS/$name" --compressed "$RUNS/$name/weights.compressed.safetensors" \
        --onnx "$RUNS/$name/model.onnx" | tail -1
    cp "$RUNS/$name/model.export.json" "$OUT/$name.export.json"
    cp "$RUNS/$name/report.json" "$OUT/$name.report.json"
}
run resnet18_24_w4 --nm 2:4 --wbits 4
run resnet18_90_w8 --sparsity 0.9 --wbits 8
