#!/bin/bash
# The `cpu` preset's PreLAR pre-training step: the original (official_cpu_step.py, same sizes:
# both have 2,325,459 parameters) vs prelar-jax (throughput.py), alternating, as in
# ../shared/bench/side_by_side_pretrain.sh. Usage (from the repository root):
#   bash experiments/results/onednn_cpu_2026-12-06/side_by_side_cpu.sh REF TORCH_PY JAX_PY [rounds=2]
set -u
ref=$1; tpy=$2; jpy=$3; rounds=${4:-2}
here=$(cd "$(dirname "$0")" && pwd)
out=$(mktemp -d)
for r in $(seq 1 "$rounds"); do
  OMP_NUM_THREADS=2 "$tpy" "$here/official_cpu_step.py" "$ref" 20 > "$out/off$r" 2>&1
  off=$(grep -o 'ms_per_step_median=[0-9.]*' "$out/off$r" | cut -d= -f2)
  WANDB_MODE=disabled "$jpy" experiments/throughput.py --config=configs/prelar_pretrain.py:cpu --devices=1 \
    --steps=20 --warmup=3 --out="$out/jax$r.json" > "$out/jaxlog$r" 2>&1
  jx=$("$jpy" -c "import json; d=json.load(open('$out/jax$r.json')); print(round(d['rows'][0]['step_seconds_median']*1000, 1))")
  echo "round $r: official $off ms, prelar-jax $jx ms ($(grep -o 'allocator: [a-z ]*' "$out/jaxlog$r"))"
done
