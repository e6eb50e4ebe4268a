#!/usr/bin/env bash
# Fourth GPU call of session 4: the fine-tuning goal on MNIST (issue 14): train mnist_cnn as `make checkpoints`
# does, prune it to 90% (SparseGPT, defaults), fine-tune one epoch with the masks kept.
#   bash benchmarks/gpu_finetune_mnist_cnn.sh DATA_DIR OUT_DIR
set -euo pipefail
DATA=${1:-../shared/data}
OUT=${2:-experiments/gpu/h100}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD/src${PYTHONPATH:+:$PYTHONPATH}
python3 -m cnn_sparsegpt -q train --model mnist_cnn --data-dir "$DATA" --epochs 3 --device cuda --out /tmp/mnist_cnn.pt
python3 -m cnn_sparsegpt -q prune --model mnist_cnn --weights /tmp/mnist_cnn.pt --data-dir "$DATA" --sparsity 0.9 \
    --device cuda --out /tmp/m90 | grep "top-1"
python3 -m cnn_sparsegpt -q finetune /tmp/m90 --data-dir "$DATA" --epochs 1 --device cuda
cp /tmp/mnist_cnn.pt.json "$OUT/mnist_cnn_checkpoint.json"
cp /tmp/m90/finetune/report.json "$OUT/mnist_90_finetune.json"
