"""Measure Meta-World frames per second with 1, 2, 4, ... parallel environment workers.

Example:
  python experiments/env_throughput.py --task drawer-open --workers 1,2,4 --steps 200 --out /tmp/env_fps.json

Each worker count builds a fresh `ParallelEnvs` (spawned processes), resets, then times `--steps`
random-action steps of every env (uniform in [-1, 1]; auto-resets count as frames). Start-up (spawn,
imports, env construction) and the first reset are timed separately and excluded from frames/s.
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
from prelar_jax.envs.workers import benchmark_envs, make_metaworld_env  # noqa: E402


def _worker_counts(text: str) -> list[int]:
    try:
        counts = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise SystemExit(f"error: --workers must be comma-separated integers, got {text!r}")
    if not counts or min(counts) < 1:
        raise SystemExit(f"error: --workers needs positive worker counts, got {text!r}")
    return counts


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", default="drawer-open", help="Meta-World task (with or without -v3)")
    p.add_argument("--workers", default="1,2,4", help="comma-separated worker counts to measure")
    p.add_argument("--steps", type=int, default=200, help="timed steps per env")
    p.add_argument("--size", type=int, default=64, help="frame size in pixels")
    p.add_argument("--time-limit", type=int, default=MAX_EPISODE_STEPS, help="episode length (auto-reset after)")
    p.add_argument("--full-rendering", action="store_true", help="the paper's MSAA/shadows (slower) instead of lean")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="", help="write the JSON record here")
    args = p.parse_args(argv)

    task = canonical_task_name(args.task)
    make_env = functools.partial(
        make_metaworld_env,
        task=task,
        size=args.size,
        time_limit=args.time_limit,
        lean_rendering=not args.full_rendering,
    )
    rows = []
    print(f"{task}, {args.size}x{args.size}, {'full' if args.full_rendering else 'lean'} rendering, "
          f"{args.steps} steps per env, {os.cpu_count()} CPUs", flush=True)
    print(f"{'workers':>7} {'frames/s':>9} {'per worker':>10} {'start s':>8} {'reset s':>8}", flush=True)
    for workers in _worker_counts(args.workers):
        result = benchmark_envs(make_env, workers, args.steps, seed=args.seed)
        rows.append({"workers": workers, **result})
        print(f"{workers:>7} {result['fps']:>9.1f} {result['fps_per_worker']:>10.1f} "
              f"{result['start_seconds']:>8.2f} {result['reset_seconds']:>8.2f}", flush=True)
    record = {
        "task": task, "size": args.size, "steps": args.steps, "time_limit": args.time_limit,
        "lean_rendering": not args.full_rendering, "mujoco_gl": os.environ.get("MUJOCO_GL"),
        "host": platform.node(), "cpu_count": os.cpu_count(), "command": " ".join(sys.argv),
        "results": rows,
    }  # fmt: skip
    if args.out:
        Path(args.out).write_text(json.dumps(record, indent=1) + "\n")
        print(f"wrote {args.out}")
    return record


if __name__ == "__main__":
    from prelar_jax.errors import exit_on_user_error

    exit_on_user_error(main)
