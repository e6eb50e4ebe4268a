#!/usr/bin/env bash
# Third part of session 6's GPU call: knowledge distillation from the dense model (`finetune --distill`) added to
# the one-epoch sweeps of the CIFAR CNN and ResNet-20 at 90% (appended to the JSONs of finetune_sweep_lr_warmup.sh, so the
# held-out choice is over all settings tried). ResNet-18 is left out: its dense checkpoint (45 MB) and the data
# do not travel together to the lent machine.
#   bash benchmarks/finetune_sweep_distill.sh DATA_DIR RUNS_DIR OUT_DIR PREV TEACHERS
set -euo pipefail
DATA=$1
RUNS=$2
OUT=$3
mkdir -p "$OUT"
cp "$4"/*.json "$OUT"/
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD/src${PYTHONPATH:+:$PYTHONPATH}
S="python3 benchmarks/finetune_sweep.py --data-dir $DATA --device cuda --holdout 5000 --commit ${COMMIT:-unknown}"
$S "$RUNS/ft_cifar_cnn_90" --lrs 0.03 0.1 --warmups 0 --distills 0.5 0.9 --teacher "$5/cifar_cnn.pt" \
    --out "$OUT/cifar_cnn_90.json"
$S "$RUNS/resnet20_90" --lrs 0.03 0.1 --warmups 0.1 --distills 0.5 0.9 --teacher "$5/resnet20_cifar10.pt" \
    --out "$OUT/resnet20_90.json"
$S "$RUNS/ft_cifar_cnn_90" --epochs 3 --lrs 0.1 --warmups 0.1 --distills 0.9 --teacher "$5/cifar_cnn.pt" \
    --out "$OUT/cifar_cnn_90_3epochs.json"
