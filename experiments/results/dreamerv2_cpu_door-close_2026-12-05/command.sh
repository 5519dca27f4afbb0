#!/usr/bin/env bash
# 2-core CPU, 2026-12-05 (wall ~67 min, shared part of the time with other jobs). Run from the repository root.
.venv/bin/python experiments/finetune.py --config=configs/dreamerv2.py:cpu --config.task=door-close \
  --config.batch_size=16 --config.sequence_length=16 --config.train_every=10 --config.steps=30000 \
  --config.eval_every=3000 --config.eval_eps=6 --config.log.wandb_mode=disabled --workdir=runs/dv2_door_close
# World-model error of the final checkpoint on 6 held-out random-action episodes (world_model_error.json)
.venv/bin/python experiments/world_model_error.py --workdir=runs/dv2_door_close \
  --out=experiments/results/dreamerv2_cpu_door-close_2026-12-05/world_model_error.json
