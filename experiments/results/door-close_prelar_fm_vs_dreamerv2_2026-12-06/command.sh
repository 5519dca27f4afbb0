#!/usr/bin/env bash
# PreLAR (prelar_fm pre-training) vs DreamerV2 fine-tuning on door-close at the `cpu` preset
# (2-core CPU, 2026-12-06, two or three runs at a time). Run from the repository root.
set -euo pipefail
PY=.venv/bin/python
OUT=experiments/results/door-close_prelar_fm_vs_dreamerv2_2026-12-06
# Pre-training: M1 of experiments/results/implicit_action_metaworld_2026-12-06/command.sh
# (prelar_fm losses, 1200 updates on 30 tasks' scripted videos without door-close), saved to
# runs/prelar_fm_cpu_pre by pretrain_study.py --save_workdir.
# Fine-tuning, same schedule as the DreamerV2 run of experiments/results/dreamerv2_cpu_door-close_2026-12-05
# (that run is DreamerV2 seed 0):
$PY experiments/finetune.py --config=configs/prelar_finetune.py:cpu --config.task=door-close \
  --config.pretrained=runs/prelar_fm_cpu_pre --config.log.wandb_mode=disabled --workdir=runs/prelar_fm_door_close
$PY experiments/finetune.py --config=configs/dreamerv2.py:cpu --config.task=door-close --config.seed=1 \
  --config.steps=15000 --config.log.wandb_mode=disabled --workdir=runs/dv2_door_close_s1
$PY experiments/finetune.py --config=configs/prelar_finetune.py:cpu --config.task=door-close --config.seed=1 \
  --config.steps=15000 --config.pretrained=runs/prelar_fm_cpu_pre --config.log.wandb_mode=disabled \
  --workdir=runs/prelar_fm_door_close_s1
# Each run's small files are copied into $OUT/<method>_seed<n>/ (config.json, metrics.jsonl, summary.json,
# pretrained_load.json); then the report and the world-model error:
$PY experiments/compare_runs.py --run=dreamerv2=experiments/results/dreamerv2_cpu_door-close_2026-12-05 \
  --run=dreamerv2=$OUT/dreamerv2_seed1 --run=prelar_fm=$OUT/prelar_fm_seed0 --run=prelar_fm=$OUT/prelar_fm_seed1 \
  --random_policy=experiments/results/random_policy_2026-12-05/random_policy.json --random_policy_steps=150 --out=$OUT
$PY experiments/world_model_error.py --workdir=runs/prelar_fm_door_close --out=$OUT/world_model_error.json
