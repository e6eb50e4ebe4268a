#!/usr/bin/env bash
# Second GPU call of session 4: held-out ResNet-20 rows for --dense-target / --refine
# (configs/bench_dense_target_holdout.yaml) and the 2:4 kernels with the CUTLASS backend.
#   bash benchmarks/gpu_dense_target_holdout.sh DATA_DIR OUT_DIR
set -uo pipefail
DATA=${1:-../shared/data}
OUT=${2:-experiments/gpu/h100}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD/src${PYTHONPATH:+:$PYTHONPATH}
python3 -m cnn_sparsegpt -q bench --config configs/bench_dense_target_holdout.yaml --data-dir "$DATA" --device cuda \
    --csv "$OUT/accuracy_holdout_gpu.csv" 2>&1 | grep "top-1\|rror"
python3 benchmarks/semi_structured.py --backend cutlass --json "$OUT/semi_structured_cutlass.json" 2>&1 | grep -v Warn
