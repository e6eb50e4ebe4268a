#!/usr/bin/env bash
# Session 6, on the CPU: does switching dropout off help the 90%-sparse MNIST CNN too (one epoch, lr 0.03, the
# model's own dropout 0.25 against none; chosen on 5,000 held-out training images)?
#   bash benchmarks/finetune_dropout_mnist_cnn.sh DATA_DIR
set -euo pipefail
DATA=${1:-../shared/data}
python3 -m cnn_sparsegpt -q prune --model mnist_cnn --weights checkpoints/mnist_cnn.pt --sparsity 0.9 \
    --data-dir "$DATA" --out runs/mnist_cnn_90
python3 benchmarks/finetune_sweep.py runs/mnist_cnn_90 --data-dir "$DATA" --device cpu --holdout 5000 --warmups 0 \
    --lrs 0.03 --dropouts own 0 --out experiments/finetune_sweep/mnist_cnn_90.json
