"""Open-loop prediction error of fine-tuned world models on held-out episodes of their task.

    python experiments/world_model_error.py --workdir=runs/dv2_door_close --workdir=runs/prelar_door_close \
        --out=experiments/results/<name>/world_model_error.json

For each fine-tuning workdir (its latest checkpoint): ``--episodes`` new random-action episodes of
the run's task (seed ``--seed``, never the runs' own seeds; the run's camera and rendering), cut
into non-overlapping windows of the run's sequence length; ``log.media_context`` frames observed,
the rest imagined under the episodes' actions. Printed and written beside two model-free baselines
on the same frames: the mean frame of the run's replay (its training data) and the last observed
frame repeated; and the same windows imagined under another episode's actions (``action_effect``:
that error over the true actions' error, 1 where the model ignores its actions). The README's
learning criterion is ``mse <= 0.5 x`` the mean-frame baseline.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("MUJOCO_GL", "egl")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", action="append", required=True, help="fine-tuning workdir (repeatable)")
    p.add_argument("--episodes", type=int, default=6, help="held-out random-action episodes per task")
    p.add_argument("--seed", type=int, default=424242, help="seed of the held-out episodes")
    p.add_argument("--out", default="", help="JSON file for the results (default: print only)")
    args = p.parse_args(argv)

    import jax

    from prelar_jax.runtime import pretrained as pretrained_lib
    from prelar_jax.envs.metaworld import canonical_task_name
    from prelar_jax.errors import UserError
    from prelar_jax.analysis import transfer

    results, episodes_by_task = [], {}
    try:
        for workdir in args.workdir:
            config = pretrained_lib.read_finetune_config(workdir)
            task = canonical_task_name(config.task)
            if task not in episodes_by_task:
                print(
                    f"[wm-error] collecting {args.episodes} random-action episodes of {task} "
                    f"({config.env.time_limit} steps, seed {args.seed})",
                    flush=True,
                )
                episodes_by_task[task] = transfer.collect_random_episodes(
                    task,
                    args.episodes,
                    config.env.time_limit,
                    seed=args.seed,
                    size=config.image_size,
                    camera=config.env.camera,
                    render=config.env.render.to_dict(),
                )
            res = transfer.finetuned_prediction_error(workdir, episodes_by_task[task], jax.random.key(args.seed))
            results.append(res)
            print(
                f"[wm-error] {res['method']} {task} @ {res['env_step']} env steps: open-loop MSE "
                f"{res['mse']:.5f} = {res['ratio_to_mean_frame']:.2f} x mean frame ({res['baseline_mse']:.5f}); "
                f"last frame {res['last_frame_mse']:.5f}; reconstruction {res['context_mse']:.5f}; "
                f"under another episode's actions {res['mse_other_actions']:.5f} "
                f"(x{res['action_effect']:.3f}) "
                f"({res['eval_windows']} windows)",
                flush=True,
            )
    except UserError as error:
        print(f"Error: {error}", file=sys.stderr)
        return 2
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w", encoding="utf-8") as handle:
            json.dump({"episodes": args.episodes, "seed": args.seed, "results": results}, handle, indent=1)
        print(f"[wm-error] wrote {args.out}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
