#!/usr/bin/env bash
# Implicit actions on Meta-World videos at the `cpu` preset (2-core CPU, 2026-12-06, run beside
# other jobs: M1 ~41 min). Run from the repository root.
set -euo pipefail
PY=.venv/bin/python
PROBE=reach-wall,push,faucet-open,sweep-into,pick-place,button-press-wall,plate-slide,coffee-push
# Pre-training videos: the 40 default tasks less door-close, window-close (fine-tuning) and the probe tasks
$PY experiments/generate_videos.py --out data/videos --exclude door-close,window-close,$PROBE \
  --episodes 4 --max-steps 150 --noise-std 0.2 --workers 2
# Probe videos: scripted episodes (with their actions) of 8 tasks the pre-training never sees
$PY experiments/generate_videos.py --out data/probe --tasks $PROBE --episodes 6 --max-steps 150 \
  --noise-std 0.2 --seed 1 --workers 2
OUT=experiments/results/implicit_action_metaworld_2026-12-06
FM="--set implicit_action.head_init_scale=0.0 --set implicit_action.code_type=deter --set loss.consistency=off --set loss.code_forward_scale=30.0"
# M1: the prelar_fm losses (P15 of the synthetic study), 1200 updates; kept as a pre-training workdir
$PY experiments/pretrain_study.py --config=configs/prelar_pretrain.py:cpu --steps=1200 --eval_every=400 \
  --videos=data/videos --probe_videos=data/probe $FM --out=$OUT/M1 --save_workdir=runs/prelar_fm_cpu_pre
# M2: the same at learning rate 1e-3 (the learning test's rate), 800 updates
$PY experiments/pretrain_study.py --config=configs/prelar_pretrain.py:cpu --steps=800 --eval_every=400 \
  --videos=data/videos --probe_videos=data/probe $FM --set optimizer.lr=0.001 --out=$OUT/M2
# Ceiling: the same code network trained by MSE to the true actions of the pre-training videos
$PY $OUT/supervised_ceiling.py data/videos data/probe 800 1e-3 > $OUT/supervised_ceiling_800.log
$PY $OUT/supervised_ceiling.py data/videos data/probe 2400 3e-4 > $OUT/supervised_ceiling_2400.log
$PY experiments/study_report.py --plot $OUT/curves.png $OUT/M1 $OUT/M2 > $OUT/table.md
# Probe on held-out episodes of 8 pre-training tasks (M1's saved model; random features as baseline)
SEEN=basketball,button-press-topdown,coffee-pull,drawer-close,handle-pull,peg-insert-side,push-back,sweep
$PY experiments/generate_videos.py --out data/probe_seen --tasks $SEEN --episodes 6 --max-steps 150 \
  --noise-std 0.2 --seed 2 --workers 1
$PY experiments/diagnostics.py --pretrained=runs/prelar_fm_cpu_pre --out=$OUT/seen_tasks_probe \
  --probe_videos=data/probe_seen --skip_transfer
