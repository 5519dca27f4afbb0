"""Does a pre-trained world model predict, and do its implicit actions carry the true actions?

Two measurements of a pre-training state (params, BatchNorm statistics) on held-out episodes,
each beside its trivial baseline on the same frames:

* ``prediction_errors``: open-loop MSE (per pixel, in [0, 1]) of the frames the model imagines
  after ``context`` observed frames, under the codes it infers from the true frames (PreLAR) or
  zeros (APV); the reconstruction MSE of the observed frames; and two model-free baselines: the
  mean training frame everywhere, and the last observed frame repeated.
* ``probe_scores``: held-out R² of a linear map from the implicit-action codes of each frame pair
  to the action that produced the second frame (``prelar_jax.evaluation.probe``), split by episode.

``experiments/pretrain_study.py`` logs both during a pre-training run; the learning regression
tests assert on them.
"""

from __future__ import annotations

from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from prelar_jax.evaluation import probe


def episode_windows(episodes: Sequence[dict[str, Any]], length: int, per_episode: int = 0) -> list[tuple[int, int]]:
    """Non-overlapping ``(episode, start)`` windows of ``length`` frames (``per_episode`` > 0 keeps
    at most that many per episode, spread evenly)."""
    windows = []
    for e, episode in enumerate(episodes):
        starts = list(range(0, len(episode["image"]) - length + 1, length))
        if per_episode and len(starts) > per_episode:
            starts = [starts[i] for i in np.linspace(0, len(starts) - 1, per_episode).round().astype(int)]
        windows += [(e, s) for s in starts]
    if not windows:
        raise probe.ProbeError(f"no episode has {length} frames for an open-loop window")
    return windows


def mean_frame(episodes: Sequence[dict[str, Any]]) -> np.ndarray:
    """Per-pixel mean of every frame, ``[H, W, 3]`` float64 in [0, 1]."""
    total = sum(np.asarray(ep["image"], np.float64).sum(axis=0) for ep in episodes)
    return total / sum(len(ep["image"]) for ep in episodes) / 255.0


def make_open_loop_fn(model, context: int):
    """Jitted ``fn(params, stats, batch, key) -> uint8 [B, T, H, W, 3]`` (BatchNorm in eval mode)."""
    return jax.jit(lambda params, stats, batch, key: model.open_loop(params, stats, batch, key, context=context))


def prediction_errors(open_loop_fn, params, stats, episodes: Sequence[dict[str, Any]],
                      windows: Sequence[tuple[int, int]], length: int, context: int,
                      train_mean_frame: np.ndarray, key: jax.Array, batch_size: int = 8) -> dict[str, float]:
    """Open-loop and reconstruction MSE over ``windows`` against the two model-free baselines.

    ``open_loop_mse``: frames ``context..length-1`` of each window, imagined; ``recon_mse``: frames
    ``0..context-1``, reconstructed from the posterior; ``mean_frame_mse``: ``train_mean_frame``
    for every imagined frame; ``last_frame_mse``: the last observed frame for every imagined frame.
    All are means of per-pixel squared errors in [0, 1] units over the same frames.
    """
    sums = {"open_loop_mse": 0.0, "recon_mse": 0.0, "mean_frame_mse": 0.0, "last_frame_mse": 0.0}
    count = 0
    for start in range(0, len(windows), batch_size):
        chunk = list(windows[start:start + batch_size])
        real = len(chunk)
        chunk += [chunk[-1]] * (batch_size - real)  # fixed shape: one compilation
        image = np.stack([episodes[e]["image"][s:s + length] for e, s in chunk])  # [B, T, H, W, 3]
        is_first = np.zeros(image.shape[:2], bool)
        is_first[:, 0] = True
        predicted = np.asarray(open_loop_fn(params, stats, {"image": jnp.asarray(image),
                                                            "is_first": jnp.asarray(is_first)},
                                            jax.random.fold_in(key, start)))[:real]
        truth = image[:real].astype(np.float64) / 255.0
        predicted = predicted.astype(np.float64) / 255.0
        future = truth[:, context:]
        sums["open_loop_mse"] += np.square(predicted[:, context:] - future).mean(axis=(1, 2, 3, 4)).sum()
        sums["recon_mse"] += np.square(predicted[:, :context] - truth[:, :context]).mean(axis=(1, 2, 3, 4)).sum()
        sums["mean_frame_mse"] += np.square(future - train_mean_frame).mean(axis=(1, 2, 3, 4)).sum()
        sums["last_frame_mse"] += np.square(future - truth[:, context - 1:context]).mean(axis=(1, 2, 3, 4)).sum()
        count += real
    return {k: float(v / count) for k, v in sums.items()}


def probe_scores(code_fn, params, stats, episodes: Sequence[dict[str, Any]], train: Sequence[int],
                 held_out: Sequence[int], action_dims: int = 3) -> dict[str, Any]:
    """Held-out R² of codes -> the first ``action_dims`` action dimensions (Meta-World: dx, dy, dz;
    the gripper effort often has no visible effect), fit on the pairs of ``train`` episodes."""
    codes = probe.episode_codes(code_fn, params, stats, episodes)
    actions = [np.asarray(ep["action"], np.float64)[1:, :action_dims] for ep in episodes]
    return probe.linear_probe(codes, actions, train, held_out)
