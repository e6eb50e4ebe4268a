#!/usr/bin/env bash
# Issue 22, item 4, in one short GPU run (a few minutes of a lent device): the fused column loop's gpu tests, the
# three column loops side by side, and the ResNet-18 prune's phases against its floor with the fused loop.
#   bash benchmarks/gpu_column_loop.sh DATA_DIR WEIGHTS OUT_DIR
set -euo pipefail
DATA=${1:-../shared/data}
WEIGHTS=${2:-../shared/checkpoints/resnet18_cifar10.pt}
OUT=${3:-experiments/gpu}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_fused_block.py tests/test_solver.py
python3 benchmarks/column_loop_speed.py --device cuda --data-dir "$DATA" --weights "$WEIGHTS" \
    --json "$OUT/column_loop_speed_gpu.json"
for loop in cuda_graph triton; do
    python3 benchmarks/speed.py --device cuda --data-dir "$DATA" --weights "$WEIGHTS" --column-loop "$loop" \
        --skip-solver --default-only --json "$OUT/speed_gpu_$loop.json"
done
