#!/bin/bash
# OMP_WAIT_POLICY=PASSIVE (oneDNN's OpenMP threads sleep at once instead of spinning) against the
# default, the `cpu` preset's steps, alternating, three rounds (log: omp_wait_policy.log).
cd "$(git rev-parse --show-toplevel)"
run() { local name=$1 cfg=$2; shift 2
  env "$@" .venv/bin/python experiments/throughput.py --config=$cfg --steps=15 --warmup=3 --out=${OUT:-/tmp}/$name.json > ${OUT:-/tmp}/$name.log 2>&1
  echo "$name: $(python3 -c "import json;d=json.load(open('${OUT:-/tmp}/$name.json'))['rows'];print([(r['name'], round(r['step_seconds_median']*1000,1)) for r in d])")"; }
for r in 1 2 3; do
run pre_default_r$r configs/prelar_pretrain.py:cpu
run pre_passive_r$r configs/prelar_pretrain.py:cpu OMP_WAIT_POLICY=PASSIVE
run ft_default_r$r configs/dreamerv2.py:cpu
run ft_passive_r$r configs/dreamerv2.py:cpu OMP_WAIT_POLICY=PASSIVE
done
