#!/usr/bin/env bash
# Session 6's GPU call (issue 14, fine-tuning after one-shot pruning): one epoch, lr and warm-up chosen on 5,000
# held-out training images (benchmarks/finetune_sweep.py), for the shared ResNet-18 at 90%, the CIFAR CNN at 90%
# (and, as a control, the dense CIFAR CNN given the same epoch: it is under-trained), and ResNet-20 at 90%.
# The runs are pruned beforehand on the CPU with the recommended recipe (the default):
#   cnn-sparsegpt prune --model resnet18_cifar --weights ../shared/checkpoints/resnet18_cifar10.pt --sparsity 0.9 \
#       --no-evaluate --out runs/resnet18_90        (likewise resnet20_cifar -> runs/resnet20_90;
#   the CIFAR CNN 90% run is runs/ft_cifar_cnn_90 of experiments/finetune/cifar_cnn_90.json; the dense control is
#   --sparsity 0 --method magnitude --recipe published --no-bn-recalibration -> runs/cifar_cnn_dense)
#   bash benchmarks/finetune_sweep_lr_warmup.sh DATA_DIR RUNS_DIR OUT_DIR
set -euo pipefail
DATA=$1
RUNS=$2
OUT=$3
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD/src${PYTHONPATH:+:$PYTHONPATH}
S="python3 benchmarks/finetune_sweep.py --data-dir $DATA --device cuda --holdout 5000 --commit ${COMMIT:-unknown}"
$S "$RUNS/resnet18_90" --lrs 0.01 0.03 --warmups 0.1 --out "$OUT/resnet18_90.json"
$S "$RUNS/ft_cifar_cnn_90" --lrs 0.01 0.03 0.1 --warmups 0 0.1 --out "$OUT/cifar_cnn_90.json"
$S "$RUNS/cifar_cnn_dense" --lrs 0.01 0.03 0.1 --warmups 0 0.1 --out "$OUT/cifar_cnn_dense.json"
$S "$RUNS/resnet20_90" --lrs 0.01 0.03 0.1 --warmups 0.1 --out "$OUT/resnet20_90.json"
