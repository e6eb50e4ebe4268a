#!/usr/bin/env bash
# Channel pruning on the shared CIFAR checkpoints (this 2-core CPU): the test split once per setting (nothing was
# tuned on it: the defaults are the recommended recipe, round_to 8), ONNX Runtime latency of the 50% ResNet-18
# against its dense model, then the same levels against Torch-Pruning's importances on 5,000 held-out images.
# Each run's report.json and latency.json are copied to OUT_DIR.
#   bash benchmarks/channels_goals.sh DATA_DIR OUT_DIR
set -euo pipefail
DATA=${1:-../shared/data}
OUT=${2:-experiments/channels}
RUNS=${RUNS:-runs/channels}
mkdir -p "$OUT" "$RUNS"
CK=../shared/checkpoints
prune() {  # MODEL KEEP NAME [OPTIONS]
    python3 -m cnn_sparsegpt -q prune --model "$1" --weights "$CK/${1%_cifar}_cifar10.pt" --data-dir "$DATA" \
        --structure channels --keep-macs "$2" --out "$RUNS/$3" "${@:4}" | grep "top-1\|multiply-adds"
    cp "$RUNS/$3/report.json" "$OUT/$3.report.json"
}
prune resnet18_cifar 0.5 resnet18_keep50
python3 -m cnn_sparsegpt latency "$RUNS/resnet18_keep50" --out "$OUT/resnet18_keep50.latency.json"
# channel counts in multiples of 16, ONNX Runtime's channel block on AVX-512 (configs/bench_channel_round_to_holdout.yaml)
prune resnet18_cifar 0.5 resnet18_keep50_r16 --round-to 16
python3 -m cnn_sparsegpt latency "$RUNS/resnet18_keep50_r16" --out "$OUT/resnet18_keep50_r16.latency.json"
prune resnet18_cifar 0.7 resnet18_keep70
prune resnet20_cifar 0.7 resnet20_keep70
# allocation by measured latency: the search's own timing is in the report, then an independent measurement
python3 -m cnn_sparsegpt -q prune --model resnet18_cifar --weights $CK/resnet18_cifar10.pt --data-dir "$DATA" \
    --structure channels --target-speedup 2.0 --out "$RUNS/resnet18_speedup2" | grep "top-1\|speed-up"
cp "$RUNS/resnet18_speedup2/report.json" "$OUT/resnet18_speedup2.report.json"
python3 -m cnn_sparsegpt latency "$RUNS/resnet18_speedup2" --out "$OUT/resnet18_speedup2.latency.json"
python3 benchmarks/target_speedup.py --model torchvision:resnet50 --image-size 224 --target 2.0 \
    --json "$OUT/resnet50_target_speedup.json"
python3 benchmarks/channels_vs_torch_pruning.py --model resnet20_cifar --weights $CK/resnet20_cifar10.pt \
    --data-dir "$DATA" --keep-macs 0.7 0.5 0.35 --out "$OUT/resnet20_vs_torch_pruning.json"
python3 benchmarks/channels_vs_torch_pruning.py --model resnet18_cifar --weights $CK/resnet18_cifar10.pt \
    --data-dir "$DATA" --keep-macs 0.7 0.5 0.35 --out "$OUT/resnet18_vs_torch_pruning.json"
for m in resnet20 resnet18; do  # Torch-Pruning's gradient importances (labels, a backward pass per image)
    python3 benchmarks/channels_vs_torch_pruning.py --model ${m}_cifar --weights $CK/${m}_cifar10.pt \
        --data-dir "$DATA" --skip-ours --importances taylor hessian --out "$OUT/${m}_gradients_vs_torch_pruning.json"
done
# one epoch of fine-tuning with the defaults (chosen on held-out images for the unstructured runs) on the 50% run
python3 -m cnn_sparsegpt -q finetune "$RUNS/resnet18_keep50" --epochs 1 --data-dir "$DATA" | tail -2
cp "$RUNS/resnet18_keep50/finetune/report.json" "$OUT/resnet18_keep50.finetune.json"
