"""Pre-train and measure learning as it happens: open-loop error against the mean-frame and
last-frame baselines, and the implicit-action probe R² against a random encoder, every few steps.

    python experiments/pretrain_study.py --config=configs/prelar_pretrain.py:cpu \
        --videos=data/videos --probe_videos=data/probe --steps=3000 --eval_every=500 --out=runs/study

Same model, loss and compiled step as ``experiments/pretrain.py`` (one device); one JSON line per
evaluation in ``<out>/study.jsonl``; ``--save_workdir`` keeps the final state for fine-tuning. The
loop is ``prelar_jax.analysis.pretrain_eval.study``. README "Learning" has the details.
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("MUJOCO_GL", "egl")
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(os.path.expanduser("~"), ".cache", "prelar_jax", "xla"))


def parse_value(text: str):
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/prelar_pretrain.py:cpu")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override (repeatable)")
    p.add_argument("--videos", required=True, help="pre-training videos (.npz episodes)")
    p.add_argument("--probe_videos", required=True, help="held-out scripted episodes with actions")
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--eval_every", type=int, default=500)
    p.add_argument("--context", type=int, default=3)
    p.add_argument("--out", required=True)
    p.add_argument(
        "--save_workdir",
        default="",
        help="also save the trained state there as a pre-training workdir (for finetune.py --config.pretrained)",
    )
    args = p.parse_args(argv)

    from prelar_jax.runtime import config as config_lib
    from prelar_jax.data import videos
    from prelar_jax.analysis import pretrain_eval, probe

    overrides = {"data.root": args.videos, **dict(item.split("=", 1) for item in args.set)}
    config = config_lib.load_config(args.config, {k: parse_value(v) for k, v in overrides.items()})
    config_lib.validate_pretrain_config(config)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "config.json"), "w") as f:
        json.dump(
            {
                "config": args.config,
                "overrides": overrides,
                "steps": args.steps,
                "videos": args.videos,
                "probe_videos": args.probe_videos,
                "resolved": config.to_dict(),
            },
            f,
            indent=1,
        )
    open(os.path.join(args.out, "study.jsonl"), "w").close()
    dataset = videos.make_video_dataset("npz", args.videos, frame_stride=config.data.frame_stride)
    episodes = probe.read_npz_episodes(args.probe_videos)
    pretrain_eval.study(
        config,
        dataset,
        episodes,
        args.steps,
        args.eval_every,
        args.out,
        context=args.context,
        save_workdir=args.save_workdir or None,
    )


if __name__ == "__main__":
    main()
