#!/usr/bin/env bash
# The fine-tuning sweeps behind docs/RESULTS.md ("Fine-tuning with the masks kept"), one grid per call: each
# setting is one `finetune --holdout 5000` (benchmarks/finetune_sweep.py), the choice made on those held-out
# training images, the test split measured once per run. Run on a CUDA machine (a few seconds per run on an H200).
#   bash benchmarks/finetune_sweeps.sh GRID DATA_DIR RUNS_DIR OUT_DIR [PREV_DIR] [TEACHERS_DIR]
# GRID:
#   lr_warmup   one epoch, lr x warm-up: ResNet-18, ResNet-20 and the CIFAR CNN at 90%, and the dense CIFAR CNN
#               given the same epoch (a control: it is under-trained)
#   wider       the lr grid widened where the best was at its edge, and three epochs instead of one
#   distill     knowledge distillation from the dense model (TEACHERS_DIR holds cifar_cnn.pt, resnet20_cifar10.pt)
#   batch_size  smaller batches (more steps in the one epoch)
# PREV_DIR: the JSONs of earlier grids, copied in first so that each choice is over every setting tried.
# The runs are pruned beforehand with the recommended recipe (the default), e.g.
#   cnn-sparsegpt prune --model resnet18_cifar --weights ../shared/checkpoints/resnet18_cifar10.pt --sparsity 0.9 \
#       --no-evaluate --out RUNS_DIR/resnet18_90      (likewise resnet20_cifar -> resnet20_90, cifar_cnn ->
#   ft_cifar_cnn_90; the dense control: --sparsity 0 --method magnitude --recipe published --no-bn-recalibration
#   -> cifar_cnn_dense)
set -euo pipefail
GRID=$1
DATA=$2
RUNS=$3
OUT=$4
mkdir -p "$OUT"
[ -n "${5:-}" ] && cp "$5"/*.json "$OUT"/
export PYTHONUNBUFFERED=1
S="python3 benchmarks/finetune_sweep.py --data-dir $DATA --device cuda --holdout 5000 --commit ${COMMIT:-unknown}"
case "$GRID" in
lr_warmup)
    $S "$RUNS/resnet18_90" --lrs 0.01 0.03 --warmups 0.1 --out "$OUT/resnet18_90.json"
    $S "$RUNS/ft_cifar_cnn_90" --lrs 0.01 0.03 0.1 --warmups 0 0.1 --out "$OUT/cifar_cnn_90.json"
    $S "$RUNS/cifar_cnn_dense" --lrs 0.01 0.03 0.1 --warmups 0 0.1 --out "$OUT/cifar_cnn_dense.json"
    $S "$RUNS/resnet20_90" --lrs 0.01 0.03 0.1 --warmups 0.1 --out "$OUT/resnet20_90.json" ;;
wider)
    $S "$RUNS/resnet18_90" --lrs 0.01 0.03 0.1 --warmups 0.1 --out "$OUT/resnet18_90.json"
    $S "$RUNS/resnet20_90" --lrs 0.01 0.03 0.1 0.3 --warmups 0.1 --out "$OUT/resnet20_90.json"
    $S "$RUNS/ft_cifar_cnn_90" --epochs 3 --lrs 0.03 0.1 --warmups 0.1 --out "$OUT/cifar_cnn_90_3epochs.json"
    $S "$RUNS/cifar_cnn_dense" --epochs 3 --lrs 0.03 0.1 --warmups 0.1 --out "$OUT/cifar_cnn_dense_3epochs.json"
    $S "$RUNS/resnet18_90" --epochs 3 --lrs 0.03 0.1 --warmups 0.1 --out "$OUT/resnet18_90_3epochs.json" ;;
distill)
    T=${6:?distill needs TEACHERS_DIR}
    $S "$RUNS/ft_cifar_cnn_90" --lrs 0.03 0.1 --warmups 0 --distills 0.5 0.9 --teacher "$T/cifar_cnn.pt" \
        --out "$OUT/cifar_cnn_90.json"
    $S "$RUNS/resnet20_90" --lrs 0.03 0.1 --warmups 0.1 --distills 0.5 0.9 --teacher "$T/resnet20_cifar10.pt" \
        --out "$OUT/resnet20_90.json"
    $S "$RUNS/ft_cifar_cnn_90" --epochs 3 --lrs 0.1 --warmups 0.1 --distills 0.9 --teacher "$T/cifar_cnn.pt" \
        --out "$OUT/cifar_cnn_90_3epochs.json" ;;
batch_size)
    $S "$RUNS/ft_cifar_cnn_90" --lrs 0.01 0.03 0.1 --warmups 0.1 --batch-sizes 32 64 --out "$OUT/cifar_cnn_90.json"
    $S "$RUNS/resnet18_90" --lrs 0.03 --warmups 0.1 --batch-sizes 32 64 --out "$OUT/resnet18_90.json" ;;
*)
    echo "unknown GRID '$GRID': lr_warmup, wider, distill or batch_size" >&2; exit 2 ;;
esac
