#!/usr/bin/env bash
# Second part of session 6's GPU call: widen the lr grid where the best was at its edge (ResNet-18, ResNet-20), and
# three epochs instead of one for the CIFAR CNN (pruned and its dense control) and ResNet-18. Appends to the JSONs
# of benchmarks/finetune_sweep_lr_warmup.sh when PREV holds them.
#   bash benchmarks/finetune_sweep_wider_lr_epochs.sh DATA_DIR RUNS_DIR OUT_DIR [PREV]
set -euo pipefail
DATA=$1
RUNS=$2
OUT=$3
mkdir -p "$OUT"
[ -n "${4:-}" ] && cp "$4"/*.json "$OUT"/
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD/src${PYTHONPATH:+:$PYTHONPATH}
S="python3 benchmarks/finetune_sweep.py --data-dir $DATA --device cuda --holdout 5000 --commit ${COMMIT:-unknown}"
$S "$RUNS/resnet18_90" --lrs 0.01 0.03 0.1 --warmups 0.1 --out "$OUT/resnet18_90.json"
$S "$RUNS/resnet20_90" --lrs 0.01 0.03 0.1 0.3 --warmups 0.1 --out "$OUT/resnet20_90.json"
$S "$RUNS/ft_cifar_cnn_90" --epochs 3 --lrs 0.03 0.1 --warmups 0.1 --out "$OUT/cifar_cnn_90_3epochs.json"
$S "$RUNS/cifar_cnn_dense" --epochs 3 --lrs 0.03 0.1 --warmups 0.1 --out "$OUT/cifar_cnn_dense_3epochs.json"
$S "$RUNS/resnet18_90" --epochs 3 --lrs 0.03 0.1 --warmups 0.1 --out "$OUT/resnet18_90_3epochs.json"
