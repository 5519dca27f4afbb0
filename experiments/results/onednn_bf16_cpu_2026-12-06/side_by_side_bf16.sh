#!/bin/bash
# The paper pre-training step, alternating in one run: the original PyTorch code in float32 (as its
# scripts run it on a CPU) and under torch's CPU bfloat16 autocast, and prelar-jax in float32 and
# with model.compute_dtype=bfloat16. Usage, from the repository root, nothing else running
# (or background work at autogroup nice 19):
#   bash experiments/results/onednn_bf16_cpu_2026-12-06/side_by_side_bf16.sh REF TORCH_PY [rounds=2]
set -u
ref=$1; tpy=$2; rounds=${3:-2}
here=$(cd "$(dirname "$0")" && pwd); bench=$(cd ../shared/bench && pwd); out=$(mktemp -d)
for r in $(seq 1 "$rounds"); do
  (cd "$bench" && OMP_NUM_THREADS=2 "$tpy" official_pretrain_step.py "$ref" full 16 25 3) 2>&1 \
    | grep -o 'ms_per_step=[0-9.]*' | cut -d= -f2 | sed 's/^/original_fp32 /' >> "$out/all"
  (cd "$bench" && OMP_NUM_THREADS=2 "$tpy" "$here/official_autocast.py" official_pretrain_step.py "$ref" full 16 25 3) 2>&1 \
    | grep -o 'ms_per_step=[0-9.]*' | cut -d= -f2 | sed 's/^/original_bf16 /' >> "$out/all"
  for dt in float32 bfloat16; do
    WANDB_MODE=disabled .venv/bin/python experiments/throughput.py --config=configs/prelar_pretrain.py:paper \
      --config.model.compute_dtype=$dt --devices=1 --steps=3 --warmup=1 --out="$out/jax_$dt$r.json" > /dev/null 2>&1
    .venv/bin/python -c "import json; d=json.load(open('$out/jax_$dt$r.json')); print('jax_$dt', d['rows'][0]['step_seconds_median']*1000)" >> "$out/all"
  done
  echo "round $r:"; tail -4 "$out/all"
done
python3 - "$out/all" <<'PY'
import sys, statistics as s, collections
t = collections.defaultdict(list)
for line in open(sys.argv[1]):
    k, v = line.split(); t[k].append(float(v))
m = {k: s.median(v) for k, v in t.items()}
for k, v in t.items(): print(f"{k}: {' / '.join(f'{x:.0f}' for x in v)} ms, median {m[k]:.0f}")
print(f"float32: original / prelar-jax = {m['original_fp32'] / m['jax_float32']:.2f}x")
print(f"bfloat16: original (autocast) / prelar-jax = {m['original_bf16'] / m['jax_bfloat16']:.2f}x")
print(f"prelar-jax bfloat16 vs the original as it runs (float32) = {m['original_fp32'] / m['jax_bfloat16']:.2f}x")
PY
