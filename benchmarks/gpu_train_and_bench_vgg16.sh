#!/usr/bin/env bash
# Train VGG-16 (BN) on CIFAR-10 and run its benchmark grid (configs/bench_vgg16.yaml), on a CUDA
# machine. Writes checkpoints/vgg16_cifar.pt (+ .json) and OUT_DIR/results_vgg16.csv + reports.tar.
#   bash benchmarks/gpu_train_and_bench_vgg16.sh DATA_DIR OUT_DIR [EPOCHS]
set -euo pipefail
DATA=${1:-../shared/data}
OUT=${2:-experiments}
EPOCHS=${3:-25}
mkdir -p "$OUT" checkpoints
export PYTHONUNBUFFERED=1
python3 -m cnn_sparsegpt.commands.cli -q train --model vgg16_cifar --data-dir "$DATA" --epochs "$EPOCHS" --lr 0.05 \
    --device cuda --out checkpoints/vgg16_cifar.pt
cp checkpoints/vgg16_cifar.pt.json "$OUT/"
python3 -m cnn_sparsegpt.commands.cli -q bench --config configs/bench_vgg16.yaml --data-dir "$DATA" --device cuda \
    --csv "$OUT/results_vgg16.csv"
tar cf "$OUT/reports_vgg16.tar" experiments/reports/vgg16_cifar-*.json
