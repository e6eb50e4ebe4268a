#!/usr/bin/env bash
# GPU checks and timings for the refined solve (issue 11), torch.distributed (issue 13) and 2:4 sparse
# tensor cores (issue 14), as run for docs/PERFORMANCE.md. Needs a CUDA device. ResNet-18 runs use random
# weights (timings only: the trained checkpoint does not travel to the lent machine).
#   bash benchmarks/gpu_refine_torchrun_semistructured.sh DATA_DIR OUT_DIR
set -uo pipefail
DATA=${1:-../shared/data}
OUT=${2:-experiments/gpu}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD/src${PYTHONPATH:+:$PYTHONPATH}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name(0))"
python3 -m pytest -q -m gpu -p no:cacheprovider tests 2>&1 | tail -3
python3 benchmarks/semi_structured.py --json "$OUT/semi_structured.json"
R18="--model resnet18_cifar --data-dir $DATA --no-evaluate --device cuda"
run() {  # label, then prune flags; the report is kept as OUT/prune_<label>.json
  local label=$1; shift
  "$@" --out "/tmp/prune_$label" > "/tmp/prune_$label.log" 2>&1 || tail -5 "/tmp/prune_$label.log"
  cp "/tmp/prune_$label/report.json" "/tmp/report_$label.json" 2>/dev/null
}
python3 -m cnn_sparsegpt -q prune $R18 --nm 2:4 --out /tmp/warm > /dev/null 2>&1  # decode the data once
run single python3 -m cnn_sparsegpt -q prune $R18 --nm 2:4
run torchrun1 torchrun --standalone --nproc_per_node=1 -m cnn_sparsegpt -q prune $R18 --nm 2:4
for r in none cg admm; do run "s90_$r" python3 -m cnn_sparsegpt -q prune $R18 --sparsity 0.9 --refine $r; done
run s90_dense_target python3 -m cnn_sparsegpt -q prune $R18 --sparsity 0.9 --dense-target
python3 - "$OUT/prunes.json" <<'PY'
import glob, json, sys
keep = ("seconds", "timings", "world_size", "device", "git_commit", "refine", "dense_target", "pattern", "sparsity")
rows = {f.split("report_")[1][:-5]: {k: r.get(k) for k in keep}
        for f in sorted(glob.glob("/tmp/report_*.json")) for r in [json.load(open(f))]}
json.dump(rows, open(sys.argv[1], "w"), indent=1)
for k, v in rows.items():
    print(k, round(v["seconds"], 2), v["world_size"], v["device"])
PY
