#!/usr/bin/env bash
# End to end on a small built-in default: install what is needed, render a small action-free
# video set from Meta-World's scripted experts, pre-train a tiny PreLAR world model on it,
# fine-tune it with a Dreamer agent on a Meta-World task it has never seen, and print where the
# results are. Re-running resumes (videos are kept, training continues).
#
#   bash experiments/quickstart.sh [WORKDIR]          (default: runs/quickstart)
#   STEPS=2000 FT_STEPS=5000 TASK=reach PRESET=small bash experiments/quickstart.sh
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
WORKDIR="${1:-$ROOT/runs/quickstart}"
PRESET="${PRESET:-tiny}"
STEPS="${STEPS:-400}"
FT_STEPS="${FT_STEPS:-600}"
TASK="${TASK:-drawer-open}"
PY="${PRELAR_VENV:-$ROOT/.venv}/bin/python"

bash "$ROOT/experiments/setup_env.sh"
cd "$ROOT"

VIDEOS="$WORKDIR/videos"
if [ -z "$(find "$VIDEOS" -name '*.npz' -print -quit 2>/dev/null)" ]; then
  echo "[quickstart] rendering scripted-expert videos into $VIDEOS"
  "$PY" experiments/generate_videos.py --out "$VIDEOS" \
    --tasks basketball,box-close,coffee-push,faucet-open,handle-pull,plate-slide,push,sweep \
    --episodes 2 --max-steps 150 --noise-std 0.2 --workers 2 --quiet
fi

echo "[quickstart] pre-training PreLAR ($PRESET preset, $STEPS steps) in $WORKDIR/pretrain"
"$PY" experiments/pretrain.py --config="configs/prelar_pretrain.py:$PRESET" \
  --config.data.root="$VIDEOS" --config.steps="$STEPS" --config.log.wandb_mode=offline \
  --workdir="$WORKDIR/pretrain"

echo "[quickstart] fine-tuning it on $TASK ($PRESET preset, $FT_STEPS environment steps) in $WORKDIR/finetune"
"$PY" experiments/finetune.py --config="configs/prelar_finetune.py:$PRESET" \
  --config.task="$TASK" --config.pretrained="$WORKDIR/pretrain" --config.steps="$FT_STEPS" \
  --config.log.wandb_mode=offline --workdir="$WORKDIR/finetune"

cat <<MSG

[quickstart] done. Results:
  videos         $VIDEOS/<task>/*.npz
  pre-training   $WORKDIR/pretrain/   config.json, metrics.jsonl, checkpoints/,
                 media/open_loop_*.png (rows: truth | model | error)
  fine-tuning    $WORKDIR/finetune/   config.json, metrics.jsonl (eval/success_rate, eval/return,
                 train/return, losses), checkpoints/, replay/ (episodes), media/open_loop_*.png,
                 pretrained_load.json (which arrays came from pre-training)
  last evaluation: $(grep '"eval/success_rate"' "$WORKDIR/finetune/metrics.jsonl" | tail -1)
  wandb (offline) <run>/wandb/   (upload with: wandb sync <dir>)

The tiny preset checks that everything runs; it is too small to learn. What a learning run at
CPU scale costs and shows so far: README section "Learning".
MSG
