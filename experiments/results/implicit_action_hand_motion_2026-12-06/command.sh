#!/usr/bin/env bash
# The implicit actions on unseen Meta-World tasks, probed against the hand's measured motion as well
# as the commanded action (2026-12-06, 2-core CPU). Run from the repository root. Models and videos:
# implicit_action_metaworld_stride_2026-12-06/command.sh (K4: runs/prelar_fm_k4_pre, 1600 updates at
# data.frame_stride=4) and implicit_action_metaworld_2026-12-06/command.sh (M1: runs/prelar_fm_cpu_pre,
# stride 1, 1200 updates).
set -euo pipefail
PY=.venv/bin/python
OUT=experiments/results/implicit_action_hand_motion_2026-12-06
PROBE=reach-wall,push,faucet-open,sweep-into,pick-place,button-press-wall,plate-slide,coffee-push
# The probe episodes again (same seed: the same 48 episodes as data/probe), now with the hand's position
$PY experiments/generate_videos.py --out data/probe_hand --tasks $PROBE --episodes 6 --max-steps 150 \
  --noise-std 0.2 --seed 1 --workers 2
# ... and the new episodes of 8 pre-training tasks (same seed as data/probe_seen)
SEEN=basketball,button-press-topdown,coffee-pull,drawer-close,handle-pull,peg-insert-side,push-back,sweep
$PY experiments/generate_videos.py --out data/probe_seen_hand --tasks $SEEN --episodes 6 --max-steps 150 \
  --noise-std 0.2 --seed 2 --workers 1
# How much of the commanded action the hand's true motion explains, and K4's codes on the same splits
$PY $OUT/action_vs_motion.py data/probe_hand 4 runs/prelar_fm_k4_pre > $OUT/action_vs_motion_k4_unseen.log
$PY $OUT/action_vs_motion.py data/probe_seen_hand 4 runs/prelar_fm_k4_pre > $OUT/action_vs_motion_k4_seen.log
# K4 and M1 (the check that must fail: codes without action information) through the diagnostics
$PY experiments/diagnostics.py --pretrained=runs/prelar_fm_k4_pre --out=$OUT/K4_unseen_tasks \
  --probe_videos=data/probe_hand --skip_transfer
$PY experiments/diagnostics.py --pretrained=runs/prelar_fm_k4_pre --out=$OUT/K4_seen_tasks \
  --probe_videos=data/probe_seen_hand --skip_transfer
$PY experiments/diagnostics.py --pretrained=runs/prelar_fm_cpu_pre --out=$OUT/M1_stride1_unseen_tasks \
  --probe_videos=data/probe_hand --skip_transfer
# Stride 4, 800 updates, probed every 400: prelar_fm (K4's losses), without the forward model, the original losses
FM="--set implicit_action.head_init_scale=0.0 --set implicit_action.code_type=deter --set loss.consistency=off"
COMMON="--config=configs/prelar_pretrain.py:cpu --steps=800 --eval_every=400 --videos=data/videos \
  --probe_videos=data/probe_hand --set data.frame_stride=4"
$PY experiments/pretrain_study.py $COMMON $FM --set loss.code_forward_scale=0.0 --set optimizer.lr=0.001 \
  --out=$OUT/K4_no_forward_model
$PY experiments/pretrain_study.py $COMMON $FM --set loss.code_forward_scale=30.0 --set optimizer.lr=0.001 \
  --out=$OUT/K4_800
$PY experiments/pretrain_study.py $COMMON --out=$OUT/K4_original_losses
$PY experiments/study_report.py --plot $OUT/curves.png $OUT/K4_800 $OUT/K4_no_forward_model \
  $OUT/K4_original_losses > $OUT/table.md
# Input variants of the supervised ceiling, from a checkout with extra/code_input_variants.patch applied
for v in "" "--set implicit_action.input=pixels_diff" "--set implicit_action.readout=mean" \
    "--set implicit_action.input=pixels_diff --set implicit_action.readout=mean"; do echo "== ${v:-(the cpu network)}"
  $PY $OUT/extra/supervised_ceiling_variants.py data/videos data/probe 4 800 1e-3 $v | grep -a "^k=\|^update"
done > $OUT/extra/supervised_ceiling_input_variants.log
# (These ran with --out under /tmp/hand and were copied here; the paths inside the JSON files say so.)
