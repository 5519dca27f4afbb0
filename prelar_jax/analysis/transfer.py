"""World-model transfer: how much a pre-trained initialisation helps the world model on a new task.

The diagnostic runs K world-model updates of the fine-tuning agent (PreLAR, APV or DreamerV2 from
scratch, as configured) on a fixed set of target-task episodes and measures the open-loop
prediction error on other episodes of the same task, before and after: ``context`` frames are
observed, the rest is imagined under the real actions and decoded. It isolates the representation
part of pre-training from the RL part (exploration, the actor-critic, the intrinsic bonus's effect
on behaviour), so it is cheap and has little variance.

Choice: only the world-model half of ``FinetuneAgent.update`` runs (``value_and_grad`` of
``world_model_loss`` and ``model_optimizer``, with the same non-finite skip), on one device
without a mesh. The actor-critic half does not change the world model, so the result is the same
as K full updates, at a fraction of the cost. Everything else is the fine-tuning protocol of the
config: its optimiser groups (the pre-trained encoder and RSSM stay at learning rate 0 for the
first ``config.pretrain`` updates), batch size, sequence length, KL and reward losses (with APV's
intrinsic bonus in the reward target when ``intrinsic.beta > 0``).

Reading the numbers: the prediction is decoded with BatchNorm in evaluation mode (running
statistics, momentum 0.9), as fine-tuning's media are. For the ResNet models (PreLAR, APV) the
running statistics need a few dozen updates to match the data, and a decoder that outputs grey is
already a fair predictor of Meta-World frames, so over the first tens of updates the error can
rise above its initial value while the training loss falls (measured on the tiny preset: from
scratch, above the initial error after 20 updates at lr 1e-3, below it after 60). Use K in the
hundreds, and compare with ``baseline_mse`` (the mean training frame) and ``context_mse`` (the
reconstructions of the observed frames).
"""

from __future__ import annotations

import os
import time
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from prelar_jax.errors import UserError


class TransferError(UserError, ValueError):
    """Episodes or settings the transfer diagnostic cannot work with."""


# ----------------------------------------------------------------------------------------------
# Target-task episodes
# ----------------------------------------------------------------------------------------------


def collect_random_episodes(
    task: str,
    count: int,
    length: int,
    seed: int,
    size: int = 64,
    camera: str = "corner",
    render: Any = None,
    action_repeat: int = 1,
) -> list[dict[str, np.ndarray]]:
    """``count`` Meta-World episodes of ``length`` steps under uniform random actions in [-1, 1]
    (the fine-tuning prefill's behaviour), in the replay's layout: ``image`` ``[length+1, size,
    size, 3]`` uint8, ``action`` ``[length+1, 4]`` float32 (row 0 zeros: ``action[t]`` produced
    ``image[t]``), ``reward`` ``[length+1]`` float32 (row 0 zero), ``is_first`` ``[length+1]``.
    ``render``: ``MetaWorldTask``'s rendering settings (a ``RenderSettings``, spec or mapping; lean if None).
    ``action_repeat`` k: each action is held for k control steps (fine-tuning's
    ``env.action_repeat``), so an episode of ``length`` control steps has ``length / k + 1`` frames.
    A pure function of ``(task, count, length, seed, size, action_repeat)``: goals come from the env
    seeded with ``seed``, actions from ``np.random.default_rng(seed)``."""
    from prelar_jax.envs.metaworld import MAX_EPISODE_STEPS, MetaWorldTask

    if count < 1:
        raise TransferError(f"count must be >= 1, got {count}")
    if not 1 <= length <= MAX_EPISODE_STEPS:
        raise TransferError(f"length must be in [1, {MAX_EPISODE_STEPS}] (Meta-World's horizon), got {length}")
    if action_repeat < 1 or length % action_repeat:
        raise TransferError(f"action_repeat must be >= 1 and divide length={length}, got {action_repeat}")
    steps = length // action_repeat
    rng = np.random.default_rng(seed)
    episodes = []
    with MetaWorldTask(
        task, seed=seed, size=size, camera=camera, render=render, time_limit=length, action_repeat=action_repeat
    ) as env:
        for _ in range(count):
            obs = env.reset()
            images, actions, rewards = [obs["image"]], [np.zeros(4, np.float32)], [0.0]
            for _ in range(steps):
                action = rng.uniform(-1.0, 1.0, 4).astype(np.float32)
                obs = env.step(action)
                images.append(obs["image"])
                actions.append(action)
                rewards.append(obs["reward"])
            episodes.append(
                {
                    "image": np.stack(images),  # [L+1, size, size, 3] uint8
                    "action": np.stack(actions),  # [L+1, 4]
                    "reward": np.asarray(rewards, np.float32),  # [L+1]
                    "is_first": np.arange(steps + 1) == 0,  # [L+1]
                }
            )
    return episodes


def _check_episodes(
    episodes: Sequence[dict[str, Any]], config: ml_collections.ConfigDict, length: int, label: str
) -> None:
    if not episodes:
        raise TransferError(f"no {label} episodes")
    size, action_dim = config.image_size, config.action_dim
    for index, episode in enumerate(episodes):
        image, action = np.asarray(episode["image"]), np.asarray(episode["action"])
        if image.dtype != np.uint8 or image.ndim != 4 or image.shape[1:] != (size, size, 3):
            raise TransferError(
                f"{label} episode {index}: image must be uint8 [L, {size}, {size}, 3], got {image.dtype} {image.shape}"
            )
        if action.shape != (len(image), action_dim):
            raise TransferError(
                f"{label} episode {index}: action must be [{len(image)}, {action_dim}], got {action.shape}"
            )
        if len(image) < length:
            raise TransferError(
                f"{label} episode {index} has {len(image)} frames, fewer than the {length} "
                "a sequence needs; collect longer episodes or lower the sequence length"
            )


def _window(episode: dict[str, Any], start: int, length: int) -> dict[str, np.ndarray]:
    stop = start + length
    image = np.asarray(episode["image"])[start:stop]
    reward = episode.get("reward")
    is_first = np.zeros(length, bool)
    is_first[0] = True  # as the replay does: every sequence starts from a fresh latent
    return {
        "image": image,
        "action": np.asarray(episode["action"], np.float32)[start:stop],
        "reward": (np.zeros(length, np.float32) if reward is None else np.asarray(reward, np.float32)[start:stop]),
        "is_first": is_first,
    }


def _stack(windows: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    return {k: np.stack([w[k] for w in windows]) for k in windows[0]}


def sample_batch(
    episodes: Sequence[dict[str, Any]], batch_size: int, length: int, rng: np.random.Generator
) -> dict[str, np.ndarray]:
    """``batch_size`` sequences of ``length`` steps, each from a uniformly drawn episode at a
    uniformly drawn start: ``image`` ``[B, T, H, W, 3]``, ``action`` ``[B, T, A]``, ``reward``
    ``[B, T]`` (zeros for episodes without rewards), ``is_first`` ``[B, T]`` (True at t = 0)."""
    windows = []
    for _ in range(batch_size):
        episode = episodes[rng.integers(len(episodes))]
        start = int(rng.integers(len(episode["image"]) - length + 1))
        windows.append(_window(episode, start, length))
    return _stack(windows)


def evaluation_windows(episodes: Sequence[dict[str, Any]], length: int) -> list[tuple[int, int]]:
    """``(episode, start)`` of every non-overlapping ``length``-step window, from each episode's
    first frame: a fixed evaluation set, the same before and after the updates."""
    return [
        (e, start)
        for e, episode in enumerate(episodes)
        for start in range(0, len(episode["image"]) - length + 1, length)
    ]


# ----------------------------------------------------------------------------------------------
# The diagnostic
# ----------------------------------------------------------------------------------------------


def make_world_model_step(agent):
    """``step(state, batch, key) -> (state, metrics)``: the world-model half of
    ``FinetuneAgent.update`` (``update_world_model``) on one device (no mesh, no ``pmean``), jitted
    with the state donated; advances the step counter. A non-finite loss or gradient keeps the
    state (the step counter still advances), as the full update does."""

    def step(state, batch, key):
        example_index = jnp.arange(batch["image"].shape[0])
        state, metrics, _ = agent.update_world_model(
            state, batch, jax.random.fold_in(key, state.step), example_index, axis_name=None
        )
        return state.replace(step=state.step + 1), metrics

    return jax.jit(step, donate_argnums=0)


def make_prediction_error_fn(agent, context: int):
    """``errors(params, batch_stats, batch, key) -> [B, T]``: the mean squared error per pixel (in
    [0, 1] units) of each frame of ``agent.open_loop``: posterior reconstructions of the first
    ``context`` frames, then frames imagined under the batch's actions."""

    def errors(params, batch_stats, batch, key):
        predicted = agent.open_loop(params, batch_stats, batch, key, context)  # [B, T, H, W, 3] uint8
        diff = (predicted.astype(jnp.float32) - batch["image"].astype(jnp.float32)) / 255.0
        return jnp.mean(jnp.square(diff), axis=(-3, -2, -1))  # [B, T]

    return jax.jit(errors)


def psnr(mse: float) -> float:
    """Peak signal-to-noise ratio in dB for images in [0, 1]: ``10 log10(1 / mse)``."""
    return float(10.0 * np.log10(1.0 / mse)) if mse > 0 else float("inf")


def _prediction_error(error_fn, params, batch_stats, episodes, windows, length, batch_size, key) -> np.ndarray:
    """``[N_windows, T]`` errors, the windows taken in fixed-size chunks (one
    compilation; the last chunk padded by repeating its first window, padded rows dropped).
    The latent samples of a window depend on ``key``, its chunk and its row, so the same windows
    get the same samples before and after the updates."""
    rows = []
    for start in range(0, len(windows), batch_size):
        chunk = windows[start : start + batch_size]
        padded = chunk + [chunk[0]] * (batch_size - len(chunk))
        batch = _stack([_window(episodes[e], s, length) for e, s in padded])
        # open_loop draws per-row samples from one key; folding in the chunk start makes chunks differ.
        out = np.asarray(error_fn(params, batch_stats, batch, jax.random.fold_in(key, start)))
        rows.append(out[: len(chunk)])
    return np.concatenate(rows)


def with_other_actions(
    episodes: Sequence[dict[str, Any]], windows: Sequence[tuple[int, int]], length: int, context: int
) -> list[dict[str, Any]]:
    """``episodes`` with, inside every window ``(e, s)``, the actions that drive the imagined
    frames (window positions ``context .. length - 1``) replaced by those at the same positions of
    the next episode (cyclically); the observed context is untouched. The same windows imagined
    under these actions measure how much a world model's predictions follow its action input: a
    model that ignores the actions predicts as well with them as with the true ones."""
    if len(episodes) < 2:
        raise TransferError("the action test needs at least 2 evaluation episodes")
    out = [{**episode, "action": np.array(episode["action"], copy=True)} for episode in episodes]
    for e, s in windows:
        other = np.asarray(episodes[(e + 1) % len(episodes)]["action"])
        if len(other) < s + length:
            raise TransferError("the action test needs evaluation episodes of equal length")
        out[e]["action"][s + context : s + length] = other[s + context : s + length]
    return out


def mean_frame_mse(
    train_episodes: Sequence[dict[str, Any]],
    eval_episodes: Sequence[dict[str, Any]],
    windows: Sequence[tuple[int, int]],
    length: int,
    context: int,
) -> float:
    """The error of a model-free baseline: predicting the per-pixel mean of all training frames
    for every predicted frame of every window (same units and frames as the diagnostic). A world
    model that does not beat it has learned nothing about the task's dynamics or appearance."""
    total, count = 0.0, 0
    for episode in train_episodes:
        total = total + np.asarray(episode["image"], np.float64).sum(axis=0)
        count += len(episode["image"])
    mean = total / count / 255.0  # [H, W, 3]
    errors = [
        np.mean(np.square(np.asarray(eval_episodes[e]["image"][s + context : s + length], np.float64) / 255.0 - mean))
        for e, s in windows
    ]
    return float(np.mean(errors))


def world_model_transfer(
    finetune_config: ml_collections.ConfigDict,
    pretrained_workdir: str | None,
    train_episodes: Sequence[dict[str, Any]],
    eval_episodes: Sequence[dict[str, Any]],
    updates: int,
    key: jax.Array,
    context: int | None = None,
    eval_length: int | None = None,
    eval_batch: int | None = None,
) -> dict[str, Any]:
    """Open-loop prediction error of a fine-tuning world model before and after ``updates``
    world-model updates on ``train_episodes``.

    ``finetune_config``: a fine-tuning config (``configs/prelar_finetune.py``, ``apv_finetune.py``
    or ``dreamerv2.py``); its ``pretrained`` key is ignored in favour of ``pretrained_workdir`` (a
    pre-training workdir whose encoder, decoder and RSSM are loaded as fine-tuning loads them, or
    None for a fresh initialisation). Updates use the config's ``batch_size`` x
    ``sequence_length`` batches drawn uniformly from ``train_episodes`` (dicts with ``image``,
    ``action`` and optionally ``reward``). The error is measured on every non-overlapping window
    of ``eval_length`` (default ``sequence_length``) frames of ``eval_episodes``, observing
    ``context`` (default ``log.media_context``) frames and averaging the per-pixel squared error
    in [0, 1] units over the predicted frames only.

    Returns ``mse``, ``psnr`` (dB, from ``mse``), ``initial_mse``/``initial_psnr`` (before any
    update), ``mse_by_step``/``initial_mse_by_step`` (per prediction step 1..T-context),
    ``context_mse``/``initial_context_mse`` (the error of the posterior reconstructions of the
    observed frames, which separates decoding from predicting), ``baseline_mse`` (predicting the
    mean training frame; ``mean_frame_mse``), ``updates``, ``loss_first``/``loss_last`` (the
    world-model loss of the first and last update), ``nonfinite_updates``, ``pretrained`` (the
    workdir or None), ``loaded`` (number of arrays loaded from it), ``method``, ``context``,
    ``eval_windows`` and ``seconds``.
    """
    from prelar_jax.learners import finetune as agent_lib
    from prelar_jax.runtime import pretrained as pretrained_lib

    if updates < 0:
        raise TransferError(f"updates must be >= 0, got {updates}")
    config = finetune_config
    length = config.sequence_length
    eval_length = length if eval_length is None else eval_length
    context = config.log.media_context if context is None else context
    eval_batch = config.batch_size if eval_batch is None else eval_batch
    if not 1 <= context < eval_length:
        raise TransferError(f"context must be in [1, eval_length) = [1, {eval_length}), got {context}")
    _check_episodes(train_episodes, config, length, "training")
    _check_episodes(eval_episodes, config, eval_length, "evaluation")
    start_time = time.perf_counter()

    agent = agent_lib.FinetuneAgent(config)
    init_key, state_key, data_key, update_key, eval_key = jax.random.split(key, 5)
    params, batch_stats = jax.tree.map(np.asarray, jax.jit(agent.init)(init_key))
    loaded = 0
    if pretrained_workdir:
        params, batch_stats, report = pretrained_lib.load_pretrained(
            pretrained_workdir, params, batch_stats, config.model, agent_lib.pretrained_module_map(config)
        )
        loaded = len(report["loaded"])
    state = agent.init_state(state_key, params, batch_stats)

    error_fn = make_prediction_error_fn(agent, context)
    windows = evaluation_windows(eval_episodes, eval_length)

    def evaluate(state):
        return _prediction_error(
            error_fn, state.params, state.batch_stats, eval_episodes, windows, eval_length, eval_batch, eval_key
        )

    initial = evaluate(state)
    step = make_world_model_step(agent)
    rng = np.random.default_rng(np.asarray(jax.random.key_data(data_key)).ravel().tolist())
    losses, nonfinite = [], 0
    for _ in range(updates):
        state, metrics = step(state, sample_batch(train_episodes, config.batch_size, length, rng), update_key)
        losses.append(float(metrics["model_loss"]))
        nonfinite += int(metrics["nonfinite"] > 0)
    final = evaluate(state)
    predicted, initial_predicted = final[:, context:], initial[:, context:]  # [N_windows, T - context]
    mse, initial_mse = float(predicted.mean()), float(initial_predicted.mean())
    return {
        "mse": mse,
        "psnr": psnr(mse),
        "initial_mse": initial_mse,
        "initial_psnr": psnr(initial_mse),
        "mse_by_step": [float(v) for v in predicted.mean(axis=0)],
        "initial_mse_by_step": [float(v) for v in initial_predicted.mean(axis=0)],
        "context_mse": float(final[:, :context].mean()),
        "initial_context_mse": float(initial[:, :context].mean()),
        "baseline_mse": mean_frame_mse(train_episodes, eval_episodes, windows, eval_length, context),
        "updates": int(updates),
        "loss_first": losses[0] if losses else None,
        "loss_last": losses[-1] if losses else None,
        "nonfinite_updates": nonfinite,
        "pretrained": os.path.abspath(pretrained_workdir) if pretrained_workdir else None,
        "loaded": loaded,
        "method": config.method,
        "context": int(context),
        "eval_windows": len(windows),
        "seconds": time.perf_counter() - start_time,
    }


# ----------------------------------------------------------------------------------------------
# A fine-tuned world model on held-out episodes
# ----------------------------------------------------------------------------------------------


def replay_mean_frame(replay_dir: str) -> tuple[np.ndarray, int]:
    """``(mean, frames)``: the per-pixel mean ``[H, W, 3]`` in [0, 1] of every frame of the
    ``*.npz`` episodes in a fine-tuning run's replay directory (the frames its world model was
    trained on), read one episode at a time."""
    names = sorted(n for n in os.listdir(replay_dir) if n.endswith(".npz")) if os.path.isdir(replay_dir) else []
    if not names:
        raise TransferError(
            f"no replay episodes (*.npz) in {replay_dir}; the mean-frame baseline needs the run's replay directory"
        )
    total, count = 0.0, 0
    for name in names:
        path = os.path.join(replay_dir, name)
        with np.load(path, allow_pickle=False) as data:
            image = np.asarray(data["image"], np.float64)
        total = total + image.sum(axis=0)
        count += len(image)
    return total / count / 255.0, count


def finetuned_prediction_error(
    workdir: str,
    eval_episodes: Sequence[dict[str, Any]],
    key: jax.Array,
    context: int | None = None,
    eval_length: int | None = None,
) -> dict[str, Any]:
    """Open-loop prediction error of a fine-tuning run's world model (its latest checkpoint) on
    held-out episodes, beside two model-free baselines on the same frames.

    Windows: every non-overlapping ``eval_length``-frame window (default the run's
    ``sequence_length``) of ``eval_episodes``; ``context`` frames (default ``log.media_context``)
    are observed, the rest imagined under the episodes' actions. Returns ``mse`` (predicted
    frames, per pixel in [0, 1]), ``context_mse`` (posterior reconstructions of the observed
    frames), ``baseline_mse`` (predicting the mean frame of the run's replay, i.e. its training
    data), ``last_frame_mse`` (repeating the last observed frame), ``ratio_to_mean_frame``,
    ``mse_other_actions`` (the same windows imagined under another episode's actions,
    ``with_other_actions``) and ``action_effect`` (its ratio to ``mse``: 1 for a model that
    ignores its actions),
    ``mse_by_step``, ``env_step`` (of the checkpoint), ``replay_frames``, ``method``, ``task``,
    ``eval_windows``, ``context``, ``eval_length``."""
    from prelar_jax.learners import finetune as agent_lib
    from prelar_jax.runtime import pretrained as pretrained_lib

    config, params, batch_stats, env_step = pretrained_lib.restore_finetune_state(workdir)
    eval_length = config.sequence_length if eval_length is None else eval_length
    context = config.log.media_context if context is None else context
    if not 1 <= context < eval_length:
        raise TransferError(f"context must be in [1, eval_length) = [1, {eval_length}), got {context}")
    _check_episodes(eval_episodes, config, eval_length, "evaluation")
    agent = agent_lib.FinetuneAgent(config)
    windows = evaluation_windows(eval_episodes, eval_length)
    error_fn = make_prediction_error_fn(agent, context)  # compiled once, used for both action sets
    errors = _prediction_error(
        error_fn,
        params,
        batch_stats,
        eval_episodes,
        windows,
        eval_length,
        config.batch_size,
        key,
    )
    # The same windows imagined under another episode's actions (same observed context).
    other_errors = _prediction_error(
        error_fn,
        params,
        batch_stats,
        with_other_actions(eval_episodes, windows, eval_length, context),
        windows,
        eval_length,
        config.batch_size,
        key,
    )
    mean, frames = replay_mean_frame(os.path.join(workdir, "replay"))
    baseline, last = [], []
    for e, s in windows:
        image = np.asarray(eval_episodes[e]["image"], np.float64)[s : s + eval_length] / 255.0
        baseline.append(np.mean(np.square(image[context:] - mean)))
        last.append(np.mean(np.square(image[context:] - image[context - 1])))
    predicted = errors[:, context:]
    mse, baseline_mse = float(predicted.mean()), float(np.mean(baseline))
    return {
        "mse": mse,
        "context_mse": float(errors[:, :context].mean()),
        "baseline_mse": baseline_mse,
        "last_frame_mse": float(np.mean(last)),
        "ratio_to_mean_frame": mse / baseline_mse,
        "mse_other_actions": float(other_errors[:, context:].mean()),
        "action_effect": float(other_errors[:, context:].mean()) / mse,
        "mse_by_step": [float(v) for v in predicted.mean(axis=0)],
        "env_step": env_step,
        "replay_frames": frames,
        "method": config.method,
        "task": config.task,
        "eval_windows": len(windows),
        "context": int(context),
        "eval_length": int(eval_length),
        "workdir": os.path.abspath(workdir),
    }
