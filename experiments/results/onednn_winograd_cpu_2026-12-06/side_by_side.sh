#!/bin/bash
# The paper pre-training step (B16 x T25, float32), alternating in one run: the original PyTorch
# code as its scripts run it on a CPU and with tcmalloc preloaded (the allocator prelar-jax's
# scripts preload), prelar-jax with oneDNN's direct kernels only
# (PRELAR_CONV_ALGORITHM=direct, the code before Winograd) and prelar-jax as it runs by default
# (Winograd for the 16x16 and 8x8 layers). Medians of 5 steps per run. Usage, from the repository
# root, nothing else running (or background work at autogroup nice 19):
#   bash experiments/results/onednn_winograd_cpu_2026-12-06/side_by_side.sh REF TORCH_PY [rounds=3]
set -u
ref=$1; tpy=$2; rounds=${3:-3}
bench=$(cd ../shared/bench && pwd); out=$(mktemp -d)
for r in $(seq 1 "$rounds"); do
  (cd "$bench" && OMP_NUM_THREADS=2 "$tpy" official_pretrain_step.py "$ref" full 16 25 5) 2>&1 \
    | grep -o 'ms_per_step=[0-9.]*' | cut -d= -f2 | sed 's/^/original /' >> "$out/all"
  (cd "$bench" && LD_PRELOAD=/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4 OMP_NUM_THREADS=2 "$tpy" official_pretrain_step.py "$ref" full 16 25 5) 2>&1 \
    | grep -o 'ms_per_step=[0-9.]*' | cut -d= -f2 | sed 's/^/original_tcmalloc /' >> "$out/all"
  for algorithm in direct auto; do
    PRELAR_CONV_ALGORITHM=$algorithm WANDB_MODE=disabled .venv/bin/python experiments/throughput.py \
      --config=configs/prelar_pretrain.py:paper --devices=1 --steps=5 --warmup=1 --out="$out/jax_$algorithm$r.json" > /dev/null 2>&1
    .venv/bin/python -c "import json; d=json.load(open('$out/jax_$algorithm$r.json')); print('jax_$algorithm', d['rows'][0]['step_seconds_median']*1000)" >> "$out/all"
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
print(f"original / prelar-jax (direct kernels) = {m['original'] / m['jax_direct']:.2f}x")
print(f"original / prelar-jax (default: Winograd on 16x16 and 8x8) = {m['original'] / m['jax_auto']:.2f}x")
print(f"original with tcmalloc / prelar-jax (default) = {m['original_tcmalloc'] / m['jax_auto']:.2f}x")
PY
