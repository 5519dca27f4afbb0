"""Pre-train and measure learning as it happens: open-loop error against the mean-frame and
last-frame baselines, and the implicit-action probe R² against a random encoder, every few steps.

    python experiments/pretrain_study.py --config=configs/prelar_pretrain.py:cpu \
        --videos=data/videos --probe_videos=data/probe --steps=3000 --eval_every=500 --out=runs/study \
        --set loss.implicit_kl_scale=0.1 --set implicit_action.input=embed

Same model, loss and compiled step as ``experiments/pretrain.py`` (one device); it keeps no
checkpoints and writes one JSON line per evaluation to ``<out>/study.jsonl`` (plus ``config.json``).
``--probe_videos``: scripted episodes with their recorded actions, of tasks the pre-training videos
do not contain (``experiments/generate_videos.py --tasks ...``). Used to compare settings quickly
(README "Learning"); the learning regression test calls ``run`` on synthetic videos.
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("MUJOCO_GL", "egl")
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR",
                      os.path.join(os.path.expanduser("~"), ".cache", "prelar_jax", "xla"))


def parse_value(text: str):
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def run(config, dataset, probe_episodes, steps: int, eval_every: int, out: str | None = None,
        context: int = 3, length: int = 0, train_fraction: float = 0.7, log=print) -> list[dict]:
    """Trains ``config`` on ``dataset`` for ``steps`` updates; evaluates at step 0 (random init,
    the baseline), every ``eval_every`` steps and at the end. Returns the evaluation rows."""
    import jax
    import numpy as np

    from prelar_jax import parallel, pretrain
    from prelar_jax.evaluation import pretrain_eval, probe

    length = length or config.sequence_length
    model = pretrain.PretrainModel(config, bn_axis_name=parallel.AXIS)
    eval_model = pretrain.PretrainModel(config)
    optimizer = pretrain.make_optimizer(config)
    mesh = parallel.make_mesh(jax.devices()[:1])
    state = parallel.put_replicated(model.init_state(jax.random.key(config.seed), optimizer), mesh)
    step_fn = jax.jit(parallel.make_train_step(model.loss, optimizer, mesh, config.seed))

    open_loop = pretrain_eval.make_open_loop_fn(eval_model, context)
    code_fn = probe.make_code_fn(eval_model) if eval_model.implicit_action is not None else None
    windows = pretrain_eval.episode_windows(probe_episodes, length, per_episode=2)
    rng_split = np.random.default_rng(config.seed + 12345)
    train_eps, held_out = probe.split_episodes(len(probe_episodes), train_fraction, rng_split)
    # The mean-frame baseline: the mean of the pre-training frames (what the model was trained on).
    sample = dataset.sample(np.random.default_rng(config.seed + 999), 64, config.sequence_length)["image"]
    train_mean = sample.reshape((-1,) + sample.shape[2:]).astype(np.float64).mean(axis=0) / 255.0

    rows = []

    def evaluate(step: int, metrics: dict) -> None:
        params, stats = jax.device_get((state.params, state.batch_stats))
        row = {"step": step, **{k: float(v) for k, v in metrics.items()}}
        row.update(pretrain_eval.prediction_errors(open_loop, params, stats, probe_episodes, windows, length,
                                                   context, train_mean, jax.random.key(0)))
        row["open_loop_vs_mean_frame"] = row["open_loop_mse"] / row["mean_frame_mse"]
        if code_fn is not None:
            scores = pretrain_eval.probe_scores(code_fn, params, stats, probe_episodes, train_eps, held_out)
            row["probe_r2"], row["probe_r2_mean"] = scores["r2"], scores["r2_mean"]
            row["probe_train_r2"] = scores["train_r2"]
        rows.append(row)
        shown = {k: (round(v, 5) if isinstance(v, float) else v) for k, v in row.items()
                 if k in ("step", "loss", "image_loss", "kl", "implicit_kl", "consistency", "open_loop_mse",
                          "recon_mse", "mean_frame_mse", "last_frame_mse", "probe_r2_mean", "seconds")}
        log(json.dumps(shown))
        if out:
            with open(os.path.join(out, "study.jsonl"), "a") as f:
                f.write(json.dumps(row) + "\n")

    start = time.perf_counter()
    evaluate(0, {})
    metrics = {}
    for step in range(1, steps + 1):
        batch = dataset.sample(np.random.default_rng([config.seed, step]), config.batch_size, config.sequence_length)
        state, metrics = step_fn(state, parallel.put_batch(batch, mesh))
        if step % eval_every == 0 or step == steps:
            metrics = dict(jax.device_get(metrics), seconds=time.perf_counter() - start)
            evaluate(step, metrics)
    return rows


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
    args = p.parse_args(argv)

    from prelar_jax import config as config_lib
    from prelar_jax.data import videos
    from prelar_jax.evaluation import probe

    overrides = {"data.root": args.videos, **dict(item.split("=", 1) for item in args.set)}
    config = config_lib.load_config(args.config, {k: parse_value(v) for k, v in overrides.items()})
    config_lib.validate_pretrain_config(config)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "config.json"), "w") as f:
        json.dump({"config": args.config, "overrides": overrides, "steps": args.steps,
                   "videos": args.videos, "probe_videos": args.probe_videos, "resolved": config.to_dict()}, f, indent=1)
    open(os.path.join(args.out, "study.jsonl"), "w").close()
    dataset = videos.make_video_dataset("npz", args.videos)
    episodes = probe.read_npz_episodes(args.probe_videos)
    run(config, dataset, episodes, args.steps, args.eval_every, args.out, context=args.context)


if __name__ == "__main__":
    main()
