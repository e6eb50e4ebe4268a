#!/usr/bin/env bash
# Third GPU call of session 4: --reconstruct on held-out ResNet-20 images, the epochs chosen there (the
# better mean top-1 over its rows), then that setting once on the test split, appended to the GPU CSVs.
#   bash benchmarks/gpu_reconstruct_holdout.sh DATA_DIR OUT_DIR
set -euo pipefail
DATA=${1:-../shared/data}
OUT=${2:-experiments/gpu/h100}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD/src${PYTHONPATH:+:$PYTHONPATH}
cp experiments/gpu/h100/accuracy_holdout_gpu.csv experiments/gpu/h100/accuracy_test_gpu.csv "$OUT/" 2>/dev/null || true
python3 -m cnn_sparsegpt -q bench --config configs/bench_reconstruct_holdout.yaml --data-dir "$DATA" --device cuda \
    --csv "$OUT/accuracy_holdout_gpu.csv" | grep "top-1"
EPOCHS=$(python3 - "$OUT/accuracy_holdout_gpu.csv" <<'PY'
import csv, sys
from collections import defaultdict
acc = defaultdict(list)
for r in csv.DictReader(open(sys.argv[1])):
    for e in ("2", "8"):
        if f"reconstruct={e}" in (r.get("recipe") or ""):
            acc[e].append(float(r["pruned_acc"]))
print(max(acc, key=lambda e: sum(acc[e]) / len(acc[e])))
PY
)
echo "epochs chosen on held-out images: $EPOCHS"
sed "s/EPOCHS/$EPOCHS/g" > /tmp/test.yaml <<'YAML'
models:
  - model: resnet20_cifar
    weights: ../shared/checkpoints/resnet20_cifar10.pt
    methods: [magnitude, wanda, sparsegpt]
    patterns: ["0.5", "0.7", "0.9", "2:4"]
recipes:
  - {reconstruct: EPOCHS}
  - {dense_target: true, refine: admm, reconstruct: EPOCHS}
csv: experiments/gpu/h100/accuracy_test_gpu.csv
reports: experiments/gpu/h100/test_reports
YAML
python3 -m cnn_sparsegpt -q bench --config /tmp/test.yaml --data-dir "$DATA" --device cuda \
    --csv "$OUT/accuracy_test_gpu.csv" | grep "top-1"
