#!/usr/bin/env bash
# Channels, then 2:4 on the smaller network, in one prune (`--structure channels --keep-macs F --nm 2:4`): a shared
# CIFAR checkpoint (MODEL: resnet20 or resnet18) on the test split, calibration seeds 0-2, the defaults otherwise;
# each run's report.json is copied to OUT_DIR as MODEL_keepF_2of4_seedS.report.json. A measurement of the
# combination, nothing chosen from it.
#   bash benchmarks/channels_then_nm.sh DATA_DIR OUT_DIR [KEEP_MACS] [MODEL]
set -euo pipefail
DATA=${1:-../shared/data}
OUT=${2:-experiments/channels_then_nm}
KEEP=${3:-0.7}
MODEL=${4:-resnet20}
RUNS=${RUNS:-runs/channels_then_nm}
mkdir -p "$OUT" "$RUNS"
for seed in 0 1 2; do
    name=${MODEL}_keep${KEEP}_2of4_seed$seed
    python3 -m cnn_sparsegpt -q prune --model ${MODEL}_cifar --weights ../shared/checkpoints/${MODEL}_cifar10.pt \
        --data-dir "$DATA" --structure channels --keep-macs "$KEEP" --nm 2:4 --seed "$seed" --out "$RUNS/$name" \
        | grep "top-1\|multiply-adds\|then 2:4"
    cp "$RUNS/$name/report.json" "$OUT/$name.report.json"
done
