#!/usr/bin/env bash
# Session 6, on the CPU: the CIFAR CNN at 90% fine-tuned for one epoch with its dropout switched off
# (`finetune --dropout 0`), appended to the GPU sweep (the held-out choice is over all settings tried), and the
# dense control given the same. Two threads, about 3 minutes per run on the 2-core development machine.
#   bash benchmarks/finetune_dropout_cifar_cnn.sh DATA_DIR
set -euo pipefail
DATA=${1:-../shared/data}
O="--data-dir $DATA --device cpu --holdout 5000 --warmups 0 --dropouts 0"
python3 benchmarks/finetune_sweep.py runs/ft_cifar_cnn_90 $O --lrs 0.01 0.03 0.1 \
    --out experiments/finetune_sweep/cifar_cnn_90.json
python3 benchmarks/finetune_sweep.py runs/cifar_cnn_dense $O --lrs 0.03 --out experiments/finetune_sweep/cifar_cnn_dense.json
