#!/usr/bin/env bash
# ResNet-18 prune (shared checkpoint, 1024 images, 2:4) in 1 process and in N torchrun processes, one thread
# each, on the CPU: seconds per phase and activations held, into one JSON (docs/PERFORMANCE.md, torchrun).
#   bash benchmarks/dist_speed.sh DATA_DIR WEIGHTS OUT_JSON [N]
set -euo pipefail
DATA=${1:-../shared/data}
WEIGHTS=${2:-../shared/checkpoints/resnet18_cifar10.pt}
OUT=${3:-experiments/dist_resnet18.json}
N=${4:-2}
TMP=$(mktemp -d)
ARGS="prune --model resnet18_cifar --weights $WEIGHTS --data-dir $DATA --nm 2:4 --device cpu --no-evaluate"
OMP_NUM_THREADS=1 python -m cnn_sparsegpt -q $ARGS --out "$TMP/p1" > /dev/null
OMP_NUM_THREADS=1 torchrun --standalone --nproc_per_node="$N" -m cnn_sparsegpt -q $ARGS --out "$TMP/pN" > /dev/null
python - "$TMP" "$OUT" <<'PY'
import json, sys, torch
tmp, out = sys.argv[1:]
rows = {}
for tag in ("p1", "pN"):
    r = json.load(open(f"{tmp}/{tag}/report.json"))
    rows[f"processes={r['world_size']}"] = {k: r[k] for k in ("seconds", "timings", "peak_stored_mb", "world_size",
                                                             "nsamples", "git_commit", "device", "date")}
a, b = (torch.load(f"{tmp}/{t}/masks.pt") for t in ("p1", "pN"))
rows["masks_identical"] = all(torch.equal(a[k], b[k]) for k in a)
json.dump(rows, open(out, "w"), indent=1)
for k, v in rows.items():
    print(k, v if not isinstance(v, dict) else (round(v["seconds"], 1), round(v["peak_stored_mb"] or 0), v["timings"]))
PY
