"""The trivial baseline of every fine-tuning claim: a uniform random policy on the same tasks.

    python experiments/random_policy.py --tasks reach,drawer-open --episodes 20 \
        --time_limits 150,500 --out experiments/results/random_policy.json

Same environments as fine-tuning (``MetaWorldTask``: goals re-drawn at each reset, seeded), actions
uniform in [-1, 1]^4 as in the prefill. For each time limit: the success rate (success at any step
within the limit, the benchmark's metric) and the mean return over the first ``limit`` steps; the
episodes are the same for every limit (one episode of the longest limit, read at each prefix).
Frames are rendered only at reset: success and reward do not depend on them. With
``--action_repeat K`` each random action is held for K control steps, as fine-tuning at
``env.action_repeat=K`` applies them (limits stay in control steps).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("MUJOCO_GL", "egl")

import numpy as np  # noqa: E402


def random_policy_baseline(
    task: str, episodes: int, time_limits: list[int], seed: int = 0, action_repeat: int = 1
) -> dict:
    from prelar_jax.envs.metaworld import MetaWorldTask

    if action_repeat < 1:
        raise ValueError(f"action_repeat must be >= 1, got {action_repeat}")

    longest = max(time_limits)
    rng = np.random.default_rng(seed)
    first_success, rewards = [], []
    with MetaWorldTask(task, seed=seed, size=8, time_limit=longest) as env:
        for _ in range(episodes):
            env.reset()
            success_at, episode_rewards = None, []
            for t in range(longest):
                if t % action_repeat == 0:  # a new action every action_repeat control steps
                    action = rng.uniform(-1, 1, 4).astype(np.float32)
                _, reward, _, _, info = env.env.step(action)
                episode_rewards.append(float(reward))
                if success_at is None and info["success"] > 0:
                    success_at = t + 1
            first_success.append(success_at)
            rewards.append(episode_rewards)
    rewards = np.asarray(rewards)
    return {
        str(limit): {
            "success_rate": float(np.mean([s is not None and s <= limit for s in first_success])),
            "return": float(rewards[:, :limit].sum(axis=1).mean()),
            "episodes": episodes,
        }
        for limit in time_limits
    }


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tasks", required=True, help="comma-separated Meta-World task names")
    p.add_argument("--episodes", type=int, default=20)
    p.add_argument("--time_limits", default="500", help="comma-separated episode lengths to report")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--action_repeat", type=int, default=1, help="control steps per random action")
    p.add_argument("--out", default="", help="JSON file to write (default: print only)")
    args = p.parse_args(argv)
    limits = [int(x) for x in args.time_limits.split(",")]
    results = {}
    for task in args.tasks.split(","):
        start = time.perf_counter()
        results[task] = random_policy_baseline(task, args.episodes, limits, args.seed, args.action_repeat)
        shown = ", ".join(
            f"T={k}: success {v['success_rate']:.2f}, return {v['return']:.1f}" for k, v in results[task].items()
        )
        print(f"{task}: {shown} ({time.perf_counter() - start:.0f}s)", flush=True)
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(
                {
                    "command": " ".join(sys.argv),
                    "episodes": args.episodes,
                    "seed": args.seed,
                    "action_repeat": args.action_repeat,
                    "results": results,
                },
                f,
                indent=1,
            )


if __name__ == "__main__":
    main()
