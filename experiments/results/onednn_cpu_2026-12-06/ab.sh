#!/bin/bash
# before (XLA convolutions, glibc malloc) vs after (project defaults: oneDNN + tcmalloc), alternating
cd /work/main
out=experiments/results/onednn_cpu_2026-12-06
for cfg in prelar_pretrain.py:paper prelar_pretrain.py:cpu dreamerv2.py:cpu; do
  case $cfg in *paper) st="--steps=3 --warmup=1";; *) st="--steps=10 --warmup=2";; esac
  name=$(echo $cfg | tr ':.' '__')
  PRELAR_CONV=xla PRELAR_MALLOC=system .venv/bin/python experiments/throughput.py --config=configs/$cfg $st --out=$out/${name}_before.json > /tmp/ab_${name}_before.log 2>&1
  .venv/bin/python experiments/throughput.py --config=configs/$cfg $st --out=$out/${name}_after.json > /tmp/ab_${name}_after.log 2>&1
  echo "$cfg before: $(grep -E ' on 1 device' /tmp/ab_${name}_before.log | tr -s ' ' | tr '\n' ';')"
  echo "$cfg after:  $(grep -E ' on 1 device' /tmp/ab_${name}_after.log | tr -s ' ' | tr '\n' ';')"
done
