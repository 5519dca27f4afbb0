"""Does a pre-trained world model predict, and do its implicit actions carry the true actions?

Two measurements of a pre-training state (params, BatchNorm statistics) on held-out episodes,
each beside its trivial baseline on the same frames:

* ``prediction_errors``: open-loop MSE (per pixel, in [0, 1]) of the frames the model imagines
  after ``context`` observed frames, under the codes it infers from the true frames (PreLAR) or
  zeros (APV); the reconstruction MSE of the observed frames; and two model-free baselines: the
  mean training frame everywhere, and the last observed frame repeated.
* ``probe_scores``: held-out R² of a linear map from the implicit-action codes of each frame pair
  to the action that produced the second frame (``prelar_jax.analysis.probe``), split by episode.

``experiments/pretrain_study.py`` logs both during a pre-training run; the learning regression
tests assert on them.
"""

from __future__ import annotations

from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from prelar_jax.runtime import config as config_lib
from prelar_jax.analysis import probe, transfer


def episode_windows(episodes: Sequence[dict[str, Any]], length: int, per_episode: int = 0) -> list[tuple[int, int]]:
    """The transfer diagnostic's non-overlapping ``(episode, start)`` windows of ``length`` frames
    (``transfer.evaluation_windows``); ``per_episode`` > 0 keeps at most that many per episode,
    spread evenly."""
    windows = []
    for e, episode in enumerate(episodes):
        starts = [start for _, start in transfer.evaluation_windows([episode], length)]
        if per_episode and len(starts) > per_episode:
            starts = [starts[i] for i in np.linspace(0, len(starts) - 1, per_episode).round().astype(int)]
        windows += [(e, s) for s in starts]
    if not windows:
        raise probe.ProbeError(f"no episode has {length} frames for an open-loop window")
    return windows


def make_open_loop_fn(model, context: int):
    """Jitted ``fn(params, batch_stats, batch, key) -> uint8 [B, T, H, W, 3]`` (BatchNorm in eval mode)."""
    return jax.jit(
        lambda params, batch_stats, batch, key: model.open_loop(params, batch_stats, batch, key, context=context)
    )


def prediction_errors(
    open_loop_fn,
    params,
    batch_stats,
    episodes: Sequence[dict[str, Any]],
    windows: Sequence[tuple[int, int]],
    length: int,
    context: int,
    train_mean_frame: np.ndarray,
    key: jax.Array,
    batch_size: int = 8,
) -> dict[str, float]:
    """Open-loop and reconstruction MSE over ``windows`` against the two model-free baselines.

    ``open_loop_mse``: frames ``context..length-1`` of each window, imagined; ``recon_mse``: frames
    ``0..context-1``, reconstructed from the posterior; ``mean_frame_mse``: ``train_mean_frame``
    for every imagined frame; ``last_frame_mse``: the last observed frame for every imagined frame.
    All are means of per-pixel squared errors in [0, 1] units over the same frames.
    """
    sums = {"open_loop_mse": 0.0, "recon_mse": 0.0, "mean_frame_mse": 0.0, "last_frame_mse": 0.0}
    count = 0
    for start in range(0, len(windows), batch_size):
        chunk = list(windows[start : start + batch_size])
        real = len(chunk)
        chunk += [chunk[-1]] * (batch_size - real)  # fixed shape: one compilation
        image = np.stack([episodes[e]["image"][s : s + length] for e, s in chunk])  # [B, T, H, W, 3]
        is_first = np.zeros(image.shape[:2], bool)
        is_first[:, 0] = True
        predicted = np.asarray(
            open_loop_fn(
                params,
                batch_stats,
                {"image": jnp.asarray(image), "is_first": jnp.asarray(is_first)},
                jax.random.fold_in(key, start),
            )
        )[:real]
        truth = image[:real].astype(np.float64) / 255.0
        predicted = predicted.astype(np.float64) / 255.0
        future = truth[:, context:]
        sums["open_loop_mse"] += np.square(predicted[:, context:] - future).mean(axis=(1, 2, 3, 4)).sum()
        sums["recon_mse"] += np.square(predicted[:, :context] - truth[:, :context]).mean(axis=(1, 2, 3, 4)).sum()
        sums["mean_frame_mse"] += np.square(future - train_mean_frame).mean(axis=(1, 2, 3, 4)).sum()
        sums["last_frame_mse"] += np.square(future - truth[:, context - 1 : context]).mean(axis=(1, 2, 3, 4)).sum()
        count += real
    return {k: float(v / count) for k, v in sums.items()}


def knn_probe(
    codes: Sequence[np.ndarray],
    targets: Sequence[np.ndarray],
    train: Sequence[int],
    held_out: Sequence[int],
    k: int = 10,
) -> float:
    """Mean held-out R² of a k-nearest-neighbour regression (features standardised on the fitting
    pairs, float64): whether the codes carry the targets at all, linearly or not. The linear probe
    is the claim; this says whether a failing linear probe means no information or a non-linear code."""
    fit_x = np.concatenate([codes[i] for i in train]).astype(np.float64)
    fit_y = np.concatenate([targets[i] for i in train]).astype(np.float64)
    eval_x = np.concatenate([codes[i] for i in held_out]).astype(np.float64)
    eval_y = np.concatenate([targets[i] for i in held_out]).astype(np.float64)
    mean, std = fit_x.mean(0), fit_x.std(0) + 1e-8
    fit_x, eval_x = (fit_x - mean) / std, (eval_x - mean) / std
    predictions = []
    for start in range(0, len(eval_x), 256):
        d = np.square(eval_x[start : start + 256, None, :] - fit_x[None]).sum(-1)  # [n, N_fit]
        nearest = np.argpartition(d, min(k, len(fit_x) - 1), axis=1)[:, :k]
        predictions.append(fit_y[nearest].mean(axis=1))
    r2 = probe.r2_scores(eval_y, np.concatenate(predictions))
    return float(np.nanmean(r2))


def probe_scores(
    code_fn,
    params,
    batch_stats,
    episodes: Sequence[dict[str, Any]],
    train: Sequence[int],
    held_out: Sequence[int],
    action_dims: int = 3,
) -> dict[str, Any]:
    """Held-out R² of codes -> the first ``action_dims`` action dimensions (Meta-World: dx, dy, dz;
    the gripper effort often has no visible effect), fit on the pairs of ``train`` episodes.

    Where episodes carry ``position`` (synthetic videos) the result also has ``position``: the
    same probe to the object's position in the pair's second frame. A code that scores there but
    not on the action carries the frame, not the change between frames.

    Where episodes carry ``hand`` (Meta-World videos generated with it) the result also has
    ``hand``: the same probe to the hand's measured displacement between the pair's frames
    (``hand[t] - hand[t-1]``), the motion the frames show, as against the commanded action (which
    the arm's controller lag, contacts and clipping separate from it)."""
    codes = probe.episode_codes(code_fn, params, batch_stats, episodes)
    actions = [np.asarray(ep["action"], np.float64)[1:, :action_dims] for ep in episodes]
    result = probe.linear_probe(codes, actions, train, held_out)
    result["knn_r2_mean"] = knn_probe(codes, actions, train, held_out)
    if all("position" in ep for ep in episodes):
        positions = [np.asarray(ep["position"], np.float64)[1:] for ep in episodes]
        result["position"] = probe.linear_probe(codes, positions, train, held_out)
        result["position"]["knn_r2_mean"] = knn_probe(codes, positions, train, held_out)
    moves = probe.hand_displacements(episodes)
    if moves is not None:
        result["hand"] = probe.linear_probe(codes, moves, train, held_out)
        result["hand"]["knn_r2_mean"] = knn_probe(codes, moves, train, held_out)
    return result


def random_encoder_probe(config, probe_episodes, train: Sequence[int], held_out: Sequence[int]) -> dict[str, Any]:
    """``probe_scores`` of a randomly initialised model of ``config`` whose code network has its
    original initialisation (``probe.random_features_config``): the random-features baseline."""
    from prelar_jax.learners import pretrain

    model = pretrain.PretrainModel(probe.random_features_config(config))
    params, batch_stats = jax.device_get(jax.jit(model.init)(jax.random.key(config.seed)))
    return probe_scores(probe.make_code_fn(model), params, batch_stats, probe_episodes, train, held_out)


def study(
    config,
    dataset,
    probe_episodes,
    steps: int,
    eval_every: int,
    out: str | None = None,
    context: int = 3,
    length: int = 0,
    train_fraction: float = 0.7,
    log=print,
    save_workdir: str | None = None,
) -> list[dict]:
    """Trains ``config`` on ``dataset`` for ``steps`` updates; evaluates at step 0 (random init,
    the baseline), every ``eval_every`` steps and at the end. Returns the evaluation rows.

    The step-0 row also has ``probe_r2_random_encoder_mean``: the probe of a randomly initialised
    network of the same config with the code network's original initialisation
    (``implicit_action.head_init_scale`` = 1). With a smaller scale the step-0 codes are (near)
    zero and score ~0 by construction; random features are the trivial baseline to beat.

    ``save_workdir``: at the end, also writes the trained state there as a pre-training workdir
    (``config.json`` + ``checkpoints/<steps>``, as ``experiments/pretrain.py`` writes them), so
    that ``experiments/finetune.py --config.pretrained=<save_workdir>`` can fine-tune from it.

    ``probe_episodes`` are at their own frame rate; with ``data.frame_stride`` k > 1 they are
    evaluated (prediction and probe) at 1/k of it, as the model sees its videos
    (``probe.stride_episodes``: each pair's target is the sum of the k actions between its frames)."""
    import json
    import os
    import time

    from prelar_jax.runtime import parallel, steps as steps_lib
    from prelar_jax.learners import pretrain

    length = length or config.sequence_length
    probe_episodes = probe.stride_episodes(probe_episodes, config_lib.frame_stride(config))
    model = pretrain.PretrainModel(config, bn_axis_name=parallel.AXIS)
    eval_model = pretrain.PretrainModel(config)
    optimizer = pretrain.make_optimizer(config)
    mesh = parallel.make_mesh(jax.devices()[:1])
    state = parallel.put_replicated(model.init_state(jax.random.key(config.seed), optimizer), mesh)
    step_fn = jax.jit(steps_lib.make_pretrain_step(model.loss, optimizer, mesh, config.seed))

    open_loop = make_open_loop_fn(eval_model, context)
    code_fn = probe.make_code_fn(eval_model) if eval_model.implicit_action is not None else None
    windows = episode_windows(probe_episodes, length, per_episode=2)
    rng_split = np.random.default_rng(config.seed + 12345)
    tasks = [episode.get("task") for episode in probe_episodes]  # stratified by task where it can be
    train_eps, held_out = probe.split_episodes(len(probe_episodes), train_fraction, rng_split, tasks)
    # The mean-frame baseline: the mean of the pre-training frames (what the model was trained on).
    sample = dataset.sample(np.random.default_rng(config.seed + 999), 64, config.sequence_length)["image"]
    train_mean = sample.reshape((-1,) + sample.shape[2:]).astype(np.float64).mean(axis=0) / 255.0

    rows = []

    def evaluate(step: int, metrics: dict) -> None:
        params, batch_stats = jax.device_get((state.params, state.batch_stats))
        row = {"step": step, **{k: float(v) for k, v in metrics.items()}}
        row.update(
            prediction_errors(
                open_loop, params, batch_stats, probe_episodes, windows, length, context, train_mean, jax.random.key(0)
            )
        )
        row["open_loop_vs_mean_frame"] = row["open_loop_mse"] / row["mean_frame_mse"]
        if code_fn is not None:
            scores = probe_scores(code_fn, params, batch_stats, probe_episodes, train_eps, held_out)
            row["probe_r2"], row["probe_r2_mean"] = scores["r2"], scores["r2_mean"]
            row["probe_train_r2"] = scores["train_r2"]
            row["probe_knn_r2_mean"] = scores["knn_r2_mean"]
            if "position" in scores:
                row["probe_position_r2_mean"] = scores["position"]["r2_mean"]
                row["probe_position_knn_r2_mean"] = scores["position"]["knn_r2_mean"]
            if "hand" in scores:
                row["probe_hand_r2"] = scores["hand"]["r2"]
                row["probe_hand_r2_mean"] = scores["hand"]["r2_mean"]
        rows.append(row)
        shown = {
            k: (round(v, 5) if isinstance(v, float) else v)
            for k, v in row.items()
            if k
            in (
                "step",
                "loss",
                "image_loss",
                "kl",
                "implicit_kl",
                "consistency",
                "code_forward_loss",
                "open_loop_mse",
                "recon_mse",
                "mean_frame_mse",
                "last_frame_mse",
                "probe_r2_mean",
                "probe_r2_random_encoder_mean",
                "probe_hand_r2_random_encoder_mean",
                "probe_knn_r2_mean",
                "probe_position_r2_mean",
                "probe_hand_r2_mean",
                "seconds",
            )
        }
        log(json.dumps(shown))
        if out:
            with open(os.path.join(out, "study.jsonl"), "a") as f:
                f.write(json.dumps(row) + "\n")

    start = time.perf_counter()
    baseline = {}
    if code_fn is not None:
        random_scores = random_encoder_probe(config, probe_episodes, train_eps, held_out)
        baseline["probe_r2_random_encoder_mean"] = random_scores["r2_mean"]
        if "hand" in random_scores:
            baseline["probe_hand_r2_random_encoder_mean"] = random_scores["hand"]["r2_mean"]
    evaluate(0, baseline)
    metrics = {}
    for step in range(1, steps + 1):
        batch = dataset.sample(np.random.default_rng([config.seed, step]), config.batch_size, config.sequence_length)
        state, metrics = step_fn(state, parallel.put_batch(batch, mesh))
        if step % eval_every == 0 or step == steps:
            metrics = dict(jax.device_get(metrics), seconds=time.perf_counter() - start)
            evaluate(step, metrics)
    if save_workdir:
        from prelar_jax.runtime import checkpoint
        from prelar_jax.runtime import logger as logger_lib

        logger_lib.write_config(save_workdir, config.to_dict())
        ckpt = checkpoint.Checkpointer(os.path.join(save_workdir, "checkpoints"), async_save=False)
        try:
            ckpt.save(steps, state, {"step": steps, "method": config.method, "preset": config.preset}, force=True)
        finally:
            ckpt.close()
        log(f"saved the trained state as a pre-training workdir: {save_workdir}")
    return rows
