#!/usr/bin/env bash
# Implicit actions on Meta-World videos at 1/4 of the frame rate (data.frame_stride=4), `cpu`
# preset, 2-core CPU shared with the other runs listed here (2026-12-06). Run from the repository
# root. The videos are those of implicit_action_metaworld_2026-12-06/command.sh (30 pre-training
# tasks x 4 episodes x 150 steps; probe: 8 unseen tasks x 6 episodes; seen: 8 pre-training tasks x 6).
set -euo pipefail
PY=.venv/bin/python
OUT=experiments/results/implicit_action_metaworld_stride_2026-12-06
FM="--set implicit_action.head_init_scale=0.0 --set implicit_action.code_type=deter --set loss.consistency=off"
# K4: the prelar_fm losses (pixel forward model) at lr 1e-3 on every 4th frame, 1600 updates; saved
$PY experiments/pretrain_study.py --config=configs/prelar_pretrain.py:cpu --steps=1600 --eval_every=400 \
  --videos=data/videos --probe_videos=data/probe $FM --set loss.code_forward_scale=30.0 \
  --set optimizer.lr=0.001 --set data.frame_stride=4 --out=$OUT/K4 --save_workdir=runs/prelar_fm_k4_pre
# The check that must fail: the same without the forward model (code_forward_scale 0)
$PY experiments/pretrain_study.py --config=configs/prelar_pretrain.py:cpu --steps=800 --eval_every=400 \
  --videos=data/videos --probe_videos=data/probe $FM --set loss.code_forward_scale=0.0 \
  --set optimizer.lr=0.001 --set data.frame_stride=4 --out=$OUT/K4_no_forward_model
# The original PreLAR losses (stochastic code, its KL, tanh consistency, no forward model) at stride 4
$PY experiments/pretrain_study.py --config=configs/prelar_pretrain.py:cpu --steps=800 --eval_every=400 \
  --videos=data/videos --probe_videos=data/probe --set data.frame_stride=4 --out=$OUT/K4_original_losses
# New episodes of 8 pre-training tasks, probed at the model's stride (random features as baseline)
$PY experiments/diagnostics.py --pretrained=runs/prelar_fm_k4_pre --out=$OUT/seen_tasks_probe \
  --probe_videos=data/probe_seen --skip_transfer
# Supervised ceilings: the same code network trained on the true (summed) actions
for k in 1 4 8; do for m in "" "--in_domain"; do echo "== k=$k $m"
  $PY $OUT/supervised_ceiling_stride.py data/videos data/probe $k 800 1e-3 $m; done; done > $OUT/supervised_ceiling.log
$PY experiments/study_report.py --plot $OUT/curves.png \
  experiments/results/implicit_action_metaworld_2026-12-06/M2 $OUT/K4 $OUT/K4_no_forward_model \
  $OUT/K4_original_losses > $OUT/table.md
# Extra ceilings (extra/): 3x the pre-training videos (8 more episodes per task, seed 3), DrQ shifts
PROBE=reach-wall,push,faucet-open,sweep-into,pick-place,button-press-wall,plate-slide,coffee-push
$PY experiments/generate_videos.py --out data/videos_more --exclude door-close,window-close,$PROBE \
  --episodes 8 --max-steps 150 --noise-std 0.2 --seed 3 --workers 1
for d in data/videos/* data/videos_more/*; do mkdir -p data/videos_all/$(basename $d)  # one root: links to both
  for f in $d/*.npz; do ln -sf $(realpath $f) data/videos_all/$(basename $d)/; done; done
$PY $OUT/supervised_ceiling_stride.py data/videos_all data/probe 4 1200 1e-3 > $OUT/extra/supervised_ceiling_k4_3x_videos.log
$PY $OUT/supervised_ceiling_stride.py data/videos data/probe 4 1200 1e-3 --shift 4 > $OUT/extra/supervised_ceiling_k4_shift4.log
# ... and a code network of twice the width (conv depth 32, hidden 512)
$PY $OUT/supervised_ceiling_stride.py data/videos data/probe 4 800 1e-3 --set model.depth=32 \
  --set implicit_action.hidden=512 > $OUT/extra/supervised_ceiling_k4_wider.log
# ... and 40 tasks: the 10 Meta-World tasks in neither set (4 episodes each) added to the 30
$PY experiments/generate_videos.py --out data/videos_extra10 --tasks button-press,button-press-topdown-wall,dial-turn,\
door-lock,door-open,drawer-open,hammer,lever-pull,reach,window-open --episodes 4 --max-steps 150 --noise-std 0.2 \
  --seed 0 --workers 2
for d in data/videos/* data/videos_extra10/*; do mkdir -p data/videos_40/$(basename $d)
  for f in $d/*.npz; do ln -sf $(realpath $f) data/videos_40/$(basename $d)/; done; done
$PY $OUT/supervised_ceiling_stride.py data/videos_40 data/probe 4 800 1e-3 > $OUT/extra/supervised_ceiling_k4_40_tasks.log
# S4_prestrided: K4's setting for 800 updates, run first through files that were already strided
# (frame_stride 1 on them): each pre-training episode written as 4 files (frames o, o+4, ... for
# o = 0..3, the 4 actions between kept frames summed), each probe episode as one (o = 0)
PYTHONPATH=. $PY - <<'PY'
import pathlib, numpy as np
from prelar_jax.evaluation import probe
for src, dst, offsets in (("data/videos", "data/videos_s4", range(4)), ("data/probe", "data/probe_s4", range(1))):
    for path in sorted(pathlib.Path(src).rglob("*.npz")):
        d = dict(np.load(path))
        for o in offsets:
            (ep,) = probe.stride_episodes([{"image": d["image"][o:], "action": d["action"][o:]}], 4)
            out = pathlib.Path(dst) / path.relative_to(src).with_name(f"{path.stem}-s4o{o}.npz")
            out.parent.mkdir(parents=True, exist_ok=True)
            np.savez(out, image=ep["image"], action=ep["action"])
PY
$PY experiments/pretrain_study.py --config=configs/prelar_pretrain.py:cpu --steps=800 --eval_every=400 \
  --videos=data/videos_s4 --probe_videos=data/probe_s4 $FM --set loss.code_forward_scale=30.0 \
  --set optimizer.lr=0.001 --out=$OUT/S4_prestrided
