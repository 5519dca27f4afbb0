"""Measure Meta-World frames per second with 1, 2, 4, ... parallel environment workers and each
rendering setting (start-up and the first reset are timed apart and excluded from frames/s).

    python experiments/env_throughput.py --task drawer-open --workers 1,2,4 --steps 200 --out /tmp/env_fps.json
    python experiments/env_throughput.py --workers 1 --steps 200 --look-frames 20 \
        --render paper,lean,lean+shadows,paper-shadows

``--look-frames N`` also compares N rendered frames of each setting with ``paper``'s (README
"Rendering settings").
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

# Workers are spawned, so this module is re-imported in each of them: keep its imports light (no JAX).
from prelar_jax.envs.metaworld import MAX_EPISODE_STEPS, canonical_task_name  # noqa: E402
from prelar_jax.envs.rendering import PAPER, SETTING_NAMES, RenderSettings, parse_render_settings  # noqa: E402
from prelar_jax.envs.workers import benchmark_envs, make_metaworld_env  # noqa: E402


def _worker_counts(text: str) -> list[int]:
    try:
        counts = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise SystemExit(f"error: --workers must be comma-separated integers, got {text!r}") from None
    if not counts or min(counts) < 1:
        raise SystemExit(f"error: --workers needs positive worker counts, got {text!r}")
    return counts


def _look_differences(task: str, settings: list[RenderSettings], size: int, frames: int, seed: int) -> dict:
    """{spec: (mean, max) |frame - paper frame|} over `frames` frames of one seeded random-action episode.

    The same seed and actions give the same physics for every setting, so only rendering differs.
    """
    import numpy as np

    from prelar_jax.envs.metaworld import MetaWorldTask

    actions = np.random.default_rng(seed).uniform(-1.0, 1.0, size=(frames - 1, 4)).astype(np.float32)  # [N-1, 4]

    def episode(render: RenderSettings) -> np.ndarray:
        with MetaWorldTask(task, seed, size=size, render=render) as env:
            images = [env.reset()["image"]] + [env.step(a)["image"] for a in actions]
        return np.stack(images).astype(np.int16)  # [N, size, size, 3]

    reference = episode(PAPER)
    out = {}
    for render in settings:
        diff = np.abs(episode(render) - reference) if render != PAPER else np.zeros_like(reference)
        out[render.describe()] = (float(diff.mean()), int(diff.max()))
    return out


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", default="drawer-open", help="Meta-World task (with or without -v3)")
    p.add_argument("--workers", default="1,2,4", help="comma-separated worker counts to measure")
    p.add_argument("--steps", type=int, default=200, help="timed steps per env")
    p.add_argument("--size", type=int, default=64, help="frame size in pixels")
    p.add_argument("--time-limit", type=int, default=MAX_EPISODE_STEPS, help="episode length (auto-reset after)")
    p.add_argument(
        "--render",
        default="lean",
        help="comma-separated rendering settings to measure: 'paper', 'lean', or either with "
        f"+SETTING/-SETTING for SETTING in {', '.join(SETTING_NAMES)} (e.g. lean+shadows)",
    )
    p.add_argument("--full-rendering", action="store_true", help="the older name of --render=paper")
    p.add_argument(
        "--look-frames",
        type=int,
        default=0,
        help="also compare N frames of each setting with the paper frames (0: skip)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="", help="write the JSON record here")
    args = p.parse_args(argv)

    task = canonical_task_name(args.task)
    specs = ["paper"] if args.full_rendering else [s for s in args.render.split(",") if s.strip()]
    settings = list(dict.fromkeys(parse_render_settings(s) for s in specs))
    counts = _worker_counts(args.workers)
    rows = []
    print(
        f"{task}, {args.size}x{args.size}, {args.steps} steps per env, {os.cpu_count()} CPUs, "
        f"MUJOCO_GL={os.environ.get('MUJOCO_GL')}",
        flush=True,
    )
    print(f"{'render':>26} {'workers':>7} {'frames/s':>9} {'per worker':>10} {'start s':>8} {'reset s':>8}", flush=True)
    for render in settings:
        make_env = functools.partial(
            make_metaworld_env, task=task, size=args.size, time_limit=args.time_limit, render=render
        )
        for workers in counts:
            result = benchmark_envs(make_env, workers, args.steps, seed=args.seed)
            rows.append({"render": render.describe(), **render.to_dict(), "workers": workers, **result})
            print(
                f"{render.describe():>26} {workers:>7} {result['fps']:>9.1f} {result['fps_per_worker']:>10.1f} "
                f"{result['start_seconds']:>8.2f} {result['reset_seconds']:>8.2f}",
                flush=True,
            )
    look = {}
    if args.look_frames > 0:
        look = _look_differences(task, settings, args.size, args.look_frames, args.seed)
        print(f"{'render':>26} {'mean |diff| vs paper':>21} {'max':>5}  ({args.look_frames} frames, 0-255)")
        for spec, (mean, peak) in look.items():
            print(f"{spec:>26} {mean:>21.2f} {peak:>5}")
    record = {
        "task": task, "size": args.size, "steps": args.steps, "time_limit": args.time_limit,
        "mujoco_gl": os.environ.get("MUJOCO_GL"), "host": platform.node(), "cpu_count": os.cpu_count(),
        "command": " ".join(sys.argv), "results": rows,
        "look_vs_paper": {k: {"mean_abs_diff": m, "max_abs_diff": x} for k, (m, x) in look.items()},
    }  # fmt: skip
    if args.out:
        Path(args.out).write_text(json.dumps(record, indent=1) + "\n")
        print(f"wrote {args.out}")
    return record


if __name__ == "__main__":
    from prelar_jax.errors import exit_on_user_error

    exit_on_user_error(main)
