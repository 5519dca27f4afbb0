#!/usr/bin/env bash
# The stride-4 pair on door-close at the cpu preset, 3 seeds (started 2026-12-07): PreLAR with the
# prelar_fm losses pre-trained on every 4th video frame and fine-tuned with each action held for 4
# control steps, against DreamerV2 from scratch at the same action repeat. Episodes of 152 control
# steps (the cpu preset's 150 is not a multiple of 4). Re-running it skips the archived runs.
# The random-policy baseline: experiments/random_policy.py --tasks door-close --episodes 20 \
#   --time_limits 152 --action_repeat 4 --out experiments/results/random_policy_repeat4_2026-12-07/random_policy.json
set -euo pipefail
cd "$(dirname "$0")/../../.."  # the repository root
exec nice -n 19 .venv/bin/python experiments/benchmark.py --config=configs/benchmark.py:cpu \
  --workdir=runs/bench_stride4 \
  --config.methods=prelar_fm_stride4,dreamerv2_repeat4 --config.tasks=door-close \
  --config.finetune.time_limit=152 \
  --config.results=experiments/results/benchmark_cpu_stride4 \
  --config.random_policy=experiments/results/random_policy_repeat4_2026-12-07/random_policy.json \
  --config.random_policy_steps=152 "$@"
