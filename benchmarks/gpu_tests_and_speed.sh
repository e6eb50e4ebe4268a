#!/usr/bin/env bash
# GPU checks and timings, as run for docs/PERFORMANCE.md: the gpu-marked tests, the speed benchmark on
# CUDA, and one `prune` from the command line. Needs a CUDA device.
#   bash benchmarks/gpu_tests_and_speed.sh DATA_DIR WEIGHTS OUT_DIR
set -euo pipefail
DATA=${1:-../shared/data}
WEIGHTS=${2:-../shared/checkpoints/resnet18_cifar10.pt}
OUT=${3:-experiments}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name(0))"
python3 -m pytest -q -m gpu -p no:cacheprovider tests
python3 benchmarks/speed.py --device cuda --data-dir "$DATA" --weights "$WEIGHTS" --json "$OUT/speed_gpu.json"
# SparseGPT's column loop three ways (issue 22, item 4): also on its own, benchmarks/gpu_column_loop.sh
bash benchmarks/gpu_column_loop.sh "$DATA" "$WEIGHTS" "$OUT"
# the Hessian paths on a GPU (their rules were measured on a CPU)
python3 benchmarks/hessian_paths.py --device cuda --json "$OUT/hessian_paths_gpu.json"
# bfloat16 Hessians with a float32 GEMM output (not on a CPU: docs/PERFORMANCE.md, "bfloat16 products")
python3 benchmarks/bf16_hessian.py --device cuda --weights "$WEIGHTS" --data-dir "$DATA" --json "$OUT/bf16_hessian_gpu.json"
python3 -m cnn_sparsegpt.commands.cli -q prune --model resnet18_cifar --weights "$WEIGHTS" --data-dir "$DATA" --nm 2:4 \
    --device cuda --eval-samples 1000 --out "$OUT/gpu_prune"
