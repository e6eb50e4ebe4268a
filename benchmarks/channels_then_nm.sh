#!/usr/bin/env bash
# Channels, then 2:4 on the smaller network, in one prune (`--structure channels --keep-macs F --nm 2:4`): ResNet-20
# on the test split, calibration seeds 0-2, the defaults otherwise; each run's report.json is copied to OUT_DIR as
# resnet20_keepF_2of4_seedS.report.json. A measurement of the combination, nothing chosen from it.
#   bash benchmarks/channels_then_nm.sh DATA_DIR OUT_DIR [KEEP_MACS]
set -euo pipefail
DATA=${1:-../shared/data}
OUT=${2:-experiments/channels_then_nm}
KEEP=${3:-0.7}
RUNS=${RUNS:-runs/channels_then_nm}
mkdir -p "$OUT" "$RUNS"
for seed in 0 1 2; do
    name=resnet20_keep${KEEP}_2of4_seed$seed
    python3 -m cnn_sparsegpt -q prune --model resnet20_cifar --weights ../shared/checkpoints/resnet20_cifar10.pt \
        --data-dir "$DATA" --structure channels --keep-macs "$KEEP" --nm 2:4 --seed "$seed" --out "$RUNS/$name" \
        | grep "top-1\|multiply-adds\|then 2:4"
    cp "$RUNS/$name/report.json" "$OUT/$name.report.json"
done
