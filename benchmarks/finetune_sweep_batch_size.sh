#!/usr/bin/env bash
# Fourth part of session 6's GPU call: smaller batches (more steps in the one epoch) for the CIFAR CNN at 90% and
# ResNet-18 at 90%, appended to the sweeps of finetune_sweep_lr_warmup.sh (the held-out choice is over all settings tried).
#   bash benchmarks/finetune_sweep_batch_size.sh DATA_DIR RUNS_DIR OUT_DIR PREV
set -euo pipefail
DATA=$1
RUNS=$2
OUT=$3
mkdir -p "$OUT"
cp "$4"/*.json "$OUT"/
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD/src${PYTHONPATH:+:$PYTHONPATH}
S="python3 benchmarks/finetune_sweep.py --data-dir $DATA --device cuda --holdout 5000 --commit ${COMMIT:-unknown}"
$S "$RUNS/ft_cifar_cnn_90" --lrs 0.01 0.03 0.1 --warmups 0.1 --batch-sizes 32 64 --out "$OUT/cifar_cnn_90.json"
$S "$RUNS/resnet18_90" --lrs 0.03 --warmups 0.1 --batch-sizes 32 64 --out "$OUT/resnet18_90.json"
