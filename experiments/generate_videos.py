"""Render Meta-World scripted-expert videos for action-free pre-training (DreamerV2 .npz episodes).

Examples:
  # default: the 40 non-benchmark tasks x 20 episodes x 500 steps on 2 processes (about 28 min, 225 MB)
  python experiments/generate_videos.py --out data/metaworld_videos --episodes 20 --workers 2
  # quick: 2 tasks, 1 episode of 50 steps each
  python experiments/generate_videos.py --out /tmp/vids --tasks reach-wall,push --episodes 1 --max-steps 50

The files load with `prelar_jax.data.videos.NpzEpisodeDataset(out)`; pre-train with `--kind npz`.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from prelar_jax.data.generate import DEFAULT_TASKS, generate_videos  # noqa: E402
from prelar_jax.envs.metaworld import BENCHMARK_TASKS, TASK_NAMES, canonical_task_name  # noqa: E402
from prelar_jax.envs.rendering import SETTING_NAMES, parse_render_settings  # noqa: E402


def _task_list(text: str) -> list[str]:
    if text == "default":
        return list(DEFAULT_TASKS)
    if text == "all":
        return list(TASK_NAMES)
    return [t for t in (s.strip() for s in text.split(",")) if t]


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="output directory; episodes go to <out>/<task>/*.npz")
    p.add_argument(
        "--tasks",
        default="default",
        help="comma-separated task names (with or without -v3), 'all' (50 tasks), or 'default' "
        f"(all minus the fine-tuning benchmark: {', '.join(BENCHMARK_TASKS)})",
    )
    p.add_argument("--exclude", default="", help="comma-separated task names to drop from --tasks")
    p.add_argument("--episodes", type=int, default=10, help="episodes per task")
    p.add_argument("--max-steps", type=int, default=500, help="steps per episode (<= 500)")
    p.add_argument(
        "--cut-after-success",
        type=int,
        default=None,
        metavar="K",
        help="end an episode K steps after its first success",
    )
    p.add_argument(
        "--noise-std", type=float, default=0.0, help="Gaussian action noise std (actions clipped to [-1, 1])"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, default=1, help="rendering processes (one env each)")
    p.add_argument("--camera", default="corner")
    p.add_argument(
        "--render",
        default="lean",
        help="rendering settings: 'lean' (default, ~10x faster in software OpenGL), 'paper' (the model's "
        "shadows, reflections and 4x multisampling, the fine-tuning config's default look), or either "
        f"with +SETTING/-SETTING for SETTING in {', '.join(SETTING_NAMES)} (e.g. 'lean+shadows')",
    )
    p.add_argument("--default-rendering", action="store_true", help="the older name of --render=paper")
    p.add_argument("--quiet", action="store_true", help="no per-episode progress lines")
    args = p.parse_args(argv)
    render = parse_render_settings("paper" if args.default_rendering else args.render)

    exclude = {canonical_task_name(t) for t in _task_list(args.exclude)} if args.exclude else set()
    tasks = [t for t in map(canonical_task_name, _task_list(args.tasks)) if t not in exclude]
    summary = generate_videos(
        args.out,
        tasks=tasks,
        episodes_per_task=args.episodes,
        max_steps=args.max_steps,
        noise_std=args.noise_std,
        seed=args.seed,
        workers=args.workers,
        cut_after_success=args.cut_after_success,
        camera=args.camera,
        render=render,
        verbose=not args.quiet,
    )
    brief = {k: v for k, v in summary.items() if k != "files"}
    print(json.dumps(brief, indent=1))
    return summary


if __name__ == "__main__":
    from prelar_jax.errors import exit_on_user_error

    exit_on_user_error(main)
