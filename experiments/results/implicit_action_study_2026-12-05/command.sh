#!/usr/bin/env bash
# Reproduces every run of this study (2-core CPU: 3-7 min each). Run from the repository root.
set -euo pipefail
PY=.venv/bin/python
# Smooth square motion (sq*: 40 training / 12 probe episodes of 48 steps, square 10 px, 4 px/step, smoothness 0.7)
$PY experiments/generate_square_videos.py --out data/sq_train --episodes 40 --length 48 --seed 0 --square 10 --speed 4 --smoothness 0.7
$PY experiments/generate_square_videos.py --out data/sq_probe --episodes 12 --length 48 --seed 1 --square 10 --speed 4 --smoothness 0.7
# Independent actions (P*: 80 / 12 episodes, square 12 px, 3 px/step): the code is the only source of the motion
$PY experiments/generate_square_videos.py --out data/sq3_train --episodes 80 --length 48 --seed 0
$PY experiments/generate_square_videos.py --out data/sq3_probe --episodes 12 --length 48 --seed 1
COMMON="--config=configs/prelar_pretrain.py:tiny --steps=2000 --eval_every=500 --set model.encoder=plain
  --set model.depth=8 --set model.deter=64 --set model.hidden=64 --set model.stoch=8 --set model.classes=8 --set batch_size=8"
OUT=experiments/results/implicit_action_study_2026-12-05
sq() { name=$1; shift; $PY experiments/pretrain_study.py $COMMON --videos=data/sq_train --probe_videos=data/sq_probe --out=$OUT/$name "$@"; }
p()  { name=$1; shift; $PY experiments/pretrain_study.py $COMMON --videos=data/sq3_train --probe_videos=data/sq3_probe --out=$OUT/$name "$@"; }
sq sqA
sq sqB --set loss.implicit_kl_scale=0.1
sq sqC --set loss.implicit_kl_free=2.0
sq sqF --set loss.prior_image_scale=1.0
p P0
p P1 --set implicit_action.input=embed
p P2 --set loss.prior_image_scale=1.0 --set loss.implicit_kl_free=2.0
p P3b --set implicit_action.code_type=deter --set loss.consistency=off
p P4 --set loss.implicit_kl_free=2.0 --set loss.consistency=off
p P5 --set loss.implicit_kl_free=2.0 --set loss.consistency=off --set implicit_action.stoch=2
p P6 --set loss.implicit_kl_warmup=1500 --set loss.consistency=off
# Forward model of the code (loss.code_forward_scale): in embedding space (P7, P8), in pixel space (P10, P11)
p P7 --set loss.code_forward_scale=30.0 --set loss.code_forward_space=embed
p P8 --set loss.code_forward_scale=30.0 --set loss.code_forward_space=embed --set loss.implicit_kl_free=3.0
p P10 --set loss.code_forward_scale=30.0 --set loss.implicit_kl_free=3.0
# The code network and a pixel forward model alone, without the world model (forward_model_check/*.log)
F=experiments/results/implicit_action_study_2026-12-05/forward_model_check.py
$PY $F 3 1 30 true 8 3e-4 1501; $PY $F 3 1 30 true 32 3e-4 751; $PY $F 3 0 30 det 32 3e-4 751
$PY $F 3 1 30 code 32 3e-4 1501; $PY $F 3 0 30 none 32 3e-4 501
$PY experiments/results/implicit_action_study_2026-12-05/supervised_check.py
# Follow-up 2: the code network's output layer initialised at zero (implicit_action.head_init_scale=0)
$PY $F 3 0 30 det 32 3e-4 751 0.0   # forward_model_check/det32_head0.log
p P12 --set implicit_action.head_init_scale=0.0 --set implicit_action.code_type=deter --set loss.consistency=off
p P14 --set implicit_action.head_init_scale=0.0 --set loss.code_forward_scale=30.0 --set loss.implicit_kl_free=3.0
p P15 --set implicit_action.head_init_scale=0.0 --set implicit_action.code_type=deter --set loss.consistency=off --set loss.code_forward_scale=30.0
# The check that breaks it: P15 with the original code initialisation (2026-12-06)
$PY experiments/pretrain_study.py $COMMON --steps=1000 --videos=data/sq3_train --probe_videos=data/sq3_probe --out=$OUT/P16 \
  --set implicit_action.code_type=deter --set loss.consistency=off --set loss.code_forward_scale=30.0
# The learning test's setting and its break checks: learning_test_checks/README.md
$PY experiments/study_report.py $OUT/sq* $OUT/P* > $OUT/table.md
$PY experiments/study_report.py --plot $OUT/curves.png $OUT/P0 $OUT/P3b $OUT/P12 $OUT/P14 $OUT/P15 $OUT/P16 > /dev/null
