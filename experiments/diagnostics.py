"""Two cheap diagnostics of pre-training quality, without RL: world-model transfer (K world-model
updates on random-action episodes of the target task from PreLAR, APV and no pre-training; open-loop
error before and after) and the implicit-action probe (codes -> true actions and hand motion, R²,
against a random model of the same config).

    python experiments/diagnostics.py --pretrained=runs/prelar_tiny --apv_pretrained=runs/apv_tiny \
        --task=drawer-open --out=runs/diagnostics_tiny

Writes <out>/diagnostics.json, diagnostics.md and, last, summary.json; probe videos are rendered
into <out>/probe_videos unless --probe_videos names them. README "Benchmark and sweeps" has more.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("MUJOCO_GL", "egl")
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(os.path.expanduser("~"), ".cache", "prelar_jax", "xla"))

from prelar_jax.analysis.diagnostics_report import format_markdown  # noqa: E402

# Non-benchmark tasks (pre-training videos may contain them; the probe's episodes are new ones,
# drawn with another seed) with varied motions: reaching, pushing, pressing, turning.
DEFAULT_PROBE_TASKS = "reach-wall,push,door-close,faucet-open"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--pretrained",
        required=True,
        help="pre-training workdir (experiments/pretrain.py): PreLAR (probe and transfer) or APV (transfer only)",
    )
    p.add_argument("--apv_pretrained", default="", help="APV pre-training workdir (optional)")
    p.add_argument(
        "--label",
        default="",
        help="the --pretrained run's name in the tables (e.g. a benchmark method such as prelar_wo_cl); "
        "default: PreLAR or APV",
    )
    p.add_argument(
        "--no_scratch",
        action="store_true",
        help="leave out the transfer from no pre-training (another diagnostics run of the benchmark has it)",
    )
    p.add_argument("--task", default="drawer-open", help="target Meta-World task of the transfer diagnostic")
    p.add_argument(
        "--preset",
        default="",
        help="fine-tuning preset (paper/small/tiny); default: the --pretrained workdir's pre-training preset",
    )
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--updates", type=int, default=50, help="world-model updates K of the transfer diagnostic")
    p.add_argument(
        "--pretrain_warmup",
        type=int,
        default=-1,
        help="updates with the pre-trained encoder/RSSM at learning rate 0 (the fine-tuning config's "
        "`pretrain`); -1 keeps the config's value",
    )
    p.add_argument("--train_episodes", type=int, default=10, help="random-action target episodes to update on")
    p.add_argument("--eval_episodes", type=int, default=4, help="random-action target episodes to evaluate on")
    p.add_argument(
        "--episode_length",
        type=int,
        default=0,
        help="control steps per target episode; default: the fine-tuning config's env.time_limit "
        "(rounded down to a multiple of the pre-training's data.frame_stride)",
    )
    p.add_argument(
        "--context",
        type=int,
        default=0,
        help="observed frames before open-loop prediction; default: the config's log.media_context",
    )
    p.add_argument(
        "--probe_videos",
        default="",
        help="directory of scripted .npz episodes (with actions); default: generate them into <out>/probe_videos",
    )
    p.add_argument("--probe_tasks", default=DEFAULT_PROBE_TASKS, help="tasks of the generated probe videos")
    p.add_argument("--probe_episodes", type=int, default=4, help="generated probe episodes per task")
    p.add_argument("--probe_steps", type=int, default=100, help="steps per generated probe episode")
    p.add_argument(
        "--probe_seed",
        type=int,
        default=1000,
        help="seed of the generated probe videos (not the pre-training videos' seed 0)",
    )
    p.add_argument("--train_fraction", type=float, default=0.7, help="probe episodes used to fit the regression")
    p.add_argument(
        "--probe_splits",
        type=int,
        default=20,
        help="random fit/held-out episode splits (by task) the probe's R² is averaged over; with the "
        "default 16 episodes one split's mean R² is off the average by ~0.03-0.06 (std over splits)",
    )
    p.add_argument("--skip_probe", action="store_true")
    p.add_argument("--skip_transfer", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def json_safe(value: Any) -> Any:
    """``value`` with NaN and infinities replaced by None (strict JSON has neither; an undefined R²
    of a constant action dimension is NaN)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def _probe_episodes(args, out: str):
    from prelar_jax.data.generate import generate_videos
    from prelar_jax.analysis import probe

    root = args.probe_videos or os.path.join(out, "probe_videos")
    if not args.probe_videos and not any(name.endswith(".npz") for _, _, files in os.walk(root) for name in files):
        tasks = [t.strip() for t in args.probe_tasks.split(",") if t.strip()]
        print(
            f"[diagnostics] generating {args.probe_episodes} scripted episodes x {len(tasks)} tasks into {root}",
            flush=True,
        )
        generate_videos(
            root,
            tasks=tasks,
            episodes_per_task=args.probe_episodes,
            max_steps=args.probe_steps,
            seed=args.probe_seed,
            verbose=False,
        )
    return probe.read_npz_episodes(root)


def run(args: argparse.Namespace) -> dict[str, Any]:
    from prelar_jax.runtime import config as config_lib, workdir_lock
    from prelar_jax.envs.metaworld import canonical_task_name, check_rendering_backend
    from prelar_jax.analysis import probe

    if args.updates < 0:
        raise config_lib.ConfigError(f"--updates must be >= 0, got {args.updates}")
    pre = probe.read_pretrain_config(args.pretrained)  # fails early on a bad workdir
    apv_pre = probe.read_pretrain_config(args.apv_pretrained) if args.apv_pretrained else None
    if apv_pre is not None and pre.get("method") == "apv":
        raise config_lib.ConfigError(
            f"--pretrained={args.pretrained} is an APV pre-training and so is --apv_pretrained: pass one APV "
            "run as --pretrained (transfer only), or a PreLAR run as --pretrained beside it"
        )
    task = canonical_task_name(args.task)
    preset = args.preset or pre.get("preset", "tiny")
    check_rendering_backend()
    with workdir_lock.hold(args.out, "diagnostics") as out:  # one diagnostics run per --out
        return _measure(args, out, task, preset, pre, apv_pre)


def _measure(
    args: argparse.Namespace,
    out: str,
    task: str,
    preset: str,
    pre: dict[str, Any],
    apv_pre: dict[str, Any] | None,
) -> dict[str, Any]:
    import jax

    from prelar_jax.runtime import config as config_lib
    from prelar_jax.analysis import probe, transfer
    from prelar_jax.runtime.logger import atomic_write_json

    key = jax.random.key(args.seed)
    results: dict[str, Any] = {"task": task, "preset": preset, "args": vars(args)}
    start = time.perf_counter()

    apv = pre.get("method") == "apv"  # no implicit actions to probe
    label = args.label or ("APV" if apv else "PreLAR")
    if not args.skip_probe and not apv:
        episodes = _probe_episodes(args, out)
        probe_key = jax.random.fold_in(key, 0)  # the same episode split for both models
        results["probe"] = {}
        for name, workdir, config in (
            (f"{label} pre-trained", args.pretrained, None),
            ("random init", None, pre),
        ):
            res = probe.implicit_action_probe(
                workdir, config, episodes, probe_key, args.train_fraction, splits=args.probe_splits
            )
            hand = f"; hand displacement R² mean {res['hand']['r2_mean']:.3f}" if "hand" in res else ""
            spread = f" ± {res['r2_mean_std']:.3f} over {args.probe_splits} splits" if "r2_mean_std" in res else ""
            print(
                f"[diagnostics] probe {name}: R² {[round(v, 3) for v in res['r2']]}, "
                f"mean {res['r2_mean']:.3f}{spread}{hand}",
                flush=True,
            )
            results["probe"][name] = res

    if not args.skip_transfer:
        runs = [(label, f"configs/{'apv' if apv else 'prelar'}_finetune.py:{preset}", args.pretrained)]
        if apv_pre is not None:
            runs.append(("APV", f"configs/apv_finetune.py:{apv_pre.get('preset', preset)}", args.apv_pretrained))
        if not args.no_scratch:
            runs.append(("scratch (DreamerV2)", f"configs/dreamerv2.py:{preset}", None))
        configs = []
        for name, spec, workdir in runs:
            overrides = {"task": task, "log.wandb_mode": "disabled"}
            if args.pretrain_warmup >= 0:
                overrides["pretrain"] = args.pretrain_warmup
            configs.append((name, spec, workdir, config_lib.load_config(spec, overrides)))
        base = configs[0][3]
        # A pre-training on every k-th frame: its dynamics step spans k control steps, so the
        # random actions are held for k (fine-tuning's env.action_repeat=k); the default episode
        # is the longest whole number of actions within env.time_limit.
        repeat = config_lib.frame_stride(pre)
        length = args.episode_length or base.env.time_limit // repeat * repeat
        context = args.context or None
        print(
            f"[diagnostics] collecting {args.train_episodes} + {args.eval_episodes} random-action episodes of "
            f"{task} ({length} steps" + (f", each action held for {repeat}" if repeat > 1 else "") + ")",
            flush=True,
        )
        train = transfer.collect_random_episodes(
            task, args.train_episodes, length, seed=args.seed, size=base.image_size, action_repeat=repeat
        )
        evaluation = transfer.collect_random_episodes(
            task, args.eval_episodes, length, seed=args.seed + 1, size=base.image_size, action_repeat=repeat
        )
        transfer_key = jax.random.fold_in(key, 1)  # the same batches and evaluation samples for every run
        results["transfer"] = {}
        for name, spec, workdir, config in configs:
            res = transfer.world_model_transfer(
                config, workdir, train, evaluation, args.updates, transfer_key, context=context
            )
            res["config"] = spec
            print(
                f"[diagnostics] transfer {name}: MSE {res['initial_mse']:.5f} -> {res['mse']:.5f} "
                f"({res['seconds']:.0f} s)",
                flush=True,
            )
            results["transfer"][name] = res

    results["seconds"] = time.perf_counter() - start
    with open(os.path.join(out, "diagnostics.json"), "w", encoding="utf-8") as handle:
        json.dump(json_safe(results), handle, indent=1)
    with open(os.path.join(out, "diagnostics.md"), "w", encoding="utf-8") as handle:
        handle.write(format_markdown(results))
    # For the benchmark runner (prelar_jax.launch.runner): this output is complete.
    atomic_write_json(os.path.join(out, "summary.json"), {"finished": True, "seconds": results["seconds"]})
    print(f"[diagnostics] wrote {out}/diagnostics.json and diagnostics.md", flush=True)
    return results


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    from prelar_jax import errors

    return errors.exit_on_user_error(lambda: run(args))


if __name__ == "__main__":
    main()
