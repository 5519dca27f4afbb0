"""Implicit-action probe: how linearly the pre-trained implicit-action codes encode the true actions.

PreLAR's claim is that the implicit-action encoder, trained on action-free video, infers codes that
carry the information of the real actions. This diagnostic measures it without any RL: for every
adjacent frame pair ``(o_{t-1}, o_t)`` of scripted Meta-World videos (whose real actions were
recorded but never used in pre-training) it computes the code (its mean for stochastic codes, the
deterministic part for ``deter``, ``[deter; mean]`` for ``mix``; BatchNorm in evaluation mode),
pairs it with the action ``a_t`` that produced ``o_t``, fits a least-squares linear map (with
intercept, float64) on the pairs of some episodes and reports R² per action dimension on the pairs
of the other episodes. The same probe on a randomly initialised encoder of the same configuration
is the baseline: random convolutional features already carry some motion information, so only the
difference says what pre-training added.

Splitting by episode (never by pair) keeps the evaluation honest: adjacent pairs of one episode are
nearly identical, so a pair-level split would measure memorisation.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence

import chex
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from prelar_jax.runtime import config as config_lib
from prelar_jax.runtime.pretrained import read_pretrain_config, restore_pretrain_state  # noqa: F401 (re-exported)
from prelar_jax.errors import UserError
from prelar_jax.types import Params


# Below this total sum of squares (per held-out pair) an action dimension counts as constant and its
# R² is undefined (reported as NaN, left out of the mean).
_CONSTANT_SST = 1e-12


class ProbeError(UserError, ValueError):
    """Input the probe cannot work with (no implicit-action encoder, too few episodes, bad arrays)."""


# ----------------------------------------------------------------------------------------------
# The linear probe (pure numpy, float64)
# ----------------------------------------------------------------------------------------------


def fit_linear_probe(features: np.ndarray, targets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Least squares ``targets ~ features @ W + b`` in float64.

    ``features`` ``[N, D]``, ``targets`` ``[N, K]``. Returns ``(W [D, K], b [K])``. With fewer
    pairs than ``D + 1`` the minimum-norm solution is returned (``np.linalg.lstsq``), which fits the
    training pairs exactly and usually generalises badly: the held-out R² then says so.
    """
    x = np.asarray(features, np.float64)
    y = np.asarray(targets, np.float64)
    if x.ndim != 2 or y.ndim != 2 or x.shape[0] != y.shape[0]:
        raise ProbeError(
            f"fit_linear_probe needs features [N, D] and targets [N, K] with the same N, got {x.shape} and {y.shape}"
        )
    design = np.concatenate([x, np.ones((x.shape[0], 1))], axis=1)  # [N, D + 1]
    solution, *_ = np.linalg.lstsq(design, y, rcond=None)  # [D + 1, K]
    return solution[:-1], solution[-1]


def predict_linear_probe(weights: np.ndarray, bias: np.ndarray, features: np.ndarray) -> np.ndarray:
    """``features @ W + b`` in float64: ``[N, D] -> [N, K]``."""
    return np.asarray(features, np.float64) @ weights + bias


def r2_scores(targets: np.ndarray, predictions: np.ndarray) -> np.ndarray:
    """Coefficient of determination per column, ``1 - SSE / SST``, ``[N, K] -> [K]`` float64.

    ``SST`` is taken around the mean of ``targets`` themselves (the held-out pairs), so predicting
    the held-out mean scores 0 and anything worse is negative. A column with (numerically) constant
    targets has no defined R² and gets NaN.
    """
    y = np.asarray(targets, np.float64)
    p = np.asarray(predictions, np.float64)
    if y.shape != p.shape or y.ndim != 2:
        raise ProbeError(
            f"r2_scores needs targets and predictions of the same shape [N, K], got {y.shape} and {p.shape}"
        )
    sse = np.sum(np.square(y - p), axis=0)
    sst = np.sum(np.square(y - y.mean(axis=0)), axis=0)
    constant = sst <= _CONSTANT_SST * max(len(y), 1)
    return np.where(constant, np.nan, 1.0 - sse / np.where(constant, 1.0, sst))


def split_episodes(
    count: int, train_fraction: float, rng: np.random.Generator, groups: Sequence[Any] | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """A random split of ``range(count)`` into (train, held-out) episode indices, each sorted and
    non-empty: ``round(train_fraction * n)`` clipped to ``[1, n - 1]`` for training. With
    ``groups`` (a label per episode, e.g. its task) where every group has two or more episodes,
    each group is split so (stratified): every split then fits on and holds out episodes of every
    task, where a plain split can hold out a few tasks only, whose held-out actions may barely vary
    in some dimension and make its R² swing far below zero."""
    if count < 2:
        raise ProbeError(f"the probe needs at least 2 episodes (one to fit, one to evaluate), got {count}")
    if not 0.0 < train_fraction < 1.0:
        raise ProbeError(f"train_fraction must be in (0, 1), got {train_fraction}")
    labels = list(groups) if groups is not None else [None] * count
    members = [np.array([i for i in range(count) if labels[i] == g]) for g in dict.fromkeys(labels)]
    if len(members) == 1 or min(len(m) for m in members) < 2:
        members = [np.arange(count)]
    train, held_out = [], []
    for group in members:
        order = rng.permutation(group)
        n_train = int(np.clip(round(train_fraction * len(group)), 1, len(group) - 1))
        train.extend(order[:n_train])
        held_out.extend(order[n_train:])
    return np.sort(np.array(train, int)), np.sort(np.array(held_out, int))


def linear_probe(
    codes: Sequence[np.ndarray], actions: Sequence[np.ndarray], train: Sequence[int], held_out: Sequence[int]
) -> dict[str, Any]:
    """Fits on the pairs of episodes ``train``, scores R² on the pairs of ``held_out``.

    ``codes[e]`` ``[N_e, D]`` and ``actions[e]`` ``[N_e, K]`` are the pairs of episode ``e``.
    Returns ``r2`` (list of K floats, NaN for a constant dimension), ``r2_mean`` (mean over the
    defined dimensions), ``train_r2`` (the same on the fitting pairs), ``train_pairs``,
    ``eval_pairs`` and ``constant_dims``.
    """
    fit_x = np.concatenate([codes[i] for i in train])
    fit_y = np.concatenate([actions[i] for i in train])
    eval_x = np.concatenate([codes[i] for i in held_out])
    eval_y = np.concatenate([actions[i] for i in held_out])
    weights, bias = fit_linear_probe(fit_x, fit_y)
    r2 = r2_scores(eval_y, predict_linear_probe(weights, bias, eval_x))
    train_r2 = r2_scores(fit_y, predict_linear_probe(weights, bias, fit_x))
    defined = np.isfinite(r2)
    return {
        "r2": [float(v) for v in r2],
        "r2_mean": float(np.mean(r2[defined])) if defined.any() else float("nan"),
        "train_r2": [float(v) for v in train_r2],
        "train_pairs": int(len(fit_x)),
        "eval_pairs": int(len(eval_x)),
        "constant_dims": [int(i) for i in np.flatnonzero(~defined)],
    }


def average_splits(results: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """``linear_probe`` results of several episode splits as one: ``r2`` and ``train_r2`` the mean
    per dimension over the splits (NaN where a dimension was constant in every split), ``r2_mean``
    the mean of the splits' ``r2_mean``, ``r2_mean_std`` their standard deviation (ddof=1),
    ``split_r2_mean`` each split's; the pair counts are the first split's. One result is returned
    as it is."""
    if len(results) == 1:
        return dict(results[0])

    def mean(values) -> list[float]:
        values = np.asarray(values, np.float64)  # [splits, K]
        defined = np.isfinite(values)
        total = np.where(defined, values, 0.0).sum(0)
        return [float(v) for v in np.where(defined.any(0), total / np.maximum(defined.sum(0), 1), np.nan)]

    per_split = np.array([r["r2_mean"] for r in results], np.float64)
    defined = per_split[np.isfinite(per_split)]
    return {
        **results[0],
        "r2": mean([r["r2"] for r in results]),
        "train_r2": mean([r["train_r2"] for r in results]),
        "r2_mean": float(defined.mean()) if len(defined) else float("nan"),
        "r2_mean_std": float(defined.std(ddof=1)) if len(defined) > 1 else float("nan"),
        "split_r2_mean": [float(v) for v in per_split],
    }


# ----------------------------------------------------------------------------------------------
# Episodes
# ----------------------------------------------------------------------------------------------


def read_npz_episodes(root: str | os.PathLike, max_per_task: int | None = None) -> list[dict[str, Any]]:
    """Every ``*.npz`` episode under ``root`` (recursively, sorted by path), as dicts with
    ``image`` ``[L, H, W, 3]`` uint8, ``action`` ``[L, A]`` float32 (``action[t]`` produced
    ``image[t]``, row 0 zeros) and ``task`` (the parent directory's name, as
    ``generate_videos`` writes them). ``max_per_task`` keeps the first episodes of each task."""
    root = Path(root)
    paths = sorted(root.rglob("*.npz"))
    if not paths:
        raise ProbeError(
            f"no .npz episodes under {root}; generate scripted videos with "
            "`python experiments/generate_videos.py --out DIR` or let experiments/diagnostics.py do it"
        )
    episodes, per_task = [], {}
    for path in paths:
        task = path.parent.name
        if max_per_task is not None and per_task.get(task, 0) >= max_per_task:
            continue
        try:
            with np.load(path, allow_pickle=False) as data:
                if "action" not in data or "image" not in data:
                    raise ProbeError(
                        f"{path} has no 'image' and 'action' arrays (keys: {sorted(data.keys())}); "
                        "the probe needs videos with their recorded actions"
                    )
                episode = {"image": data["image"], "action": data["action"].astype(np.float32), "task": task}
                if "position" in data:  # synthetic videos: the object's position in each frame
                    episode["position"] = data["position"].astype(np.float32)
                if "hand" in data:  # Meta-World videos: the hand's measured position in each frame
                    episode["hand"] = data["hand"].astype(np.float32)
        except (OSError, ValueError) as error:
            if isinstance(error, ProbeError):
                raise
            raise ProbeError(f"cannot read episode {path}: {error}") from error
        episodes.append(episode)
        per_task[task] = per_task.get(task, 0) + 1
    return episodes


def stride_episodes(episodes: Sequence[dict[str, Any]], stride: int) -> list[dict[str, Any]]:
    """The episodes at 1/``stride`` of their frame rate, as pre-training with
    ``data.frame_stride`` = ``stride`` sees videos: frames 0, k, 2k, ... and, for each kept frame
    after the first, the sum of the k actions that led to it from the previous kept frame (row 0
    zeros), so that a probe of pair ``(o_{(j-1)k}, o_{jk})`` targets the whole motion between them.
    ``position`` (synthetic videos) and ``hand`` (Meta-World) are kept at the same frames.
    ``stride`` 1 returns the episodes."""
    stride = int(stride)
    if stride < 1:
        raise ProbeError(f"frame stride must be >= 1, got {stride}")
    if stride == 1:
        return list(episodes)
    out = []
    for episode in episodes:
        action = np.asarray(episode["action"], np.float32)
        kept = np.arange(0, len(action), stride)  # [L']
        summed = np.zeros((len(kept), action.shape[1]), np.float32)  # [L', A]
        for j in range(1, len(kept)):
            summed[j] = action[kept[j - 1] + 1 : kept[j] + 1].sum(axis=0)
        strided = {**episode, "image": np.asarray(episode["image"])[kept], "action": summed}
        for key in ("position", "hand"):
            if key in episode:
                strided[key] = np.asarray(episode[key])[kept]
        out.append(strided)
    return out


def hand_displacements(episodes: Sequence[dict[str, Any]]) -> list[np.ndarray] | None:
    """Per episode, the hand's measured displacement between consecutive frames,
    ``hand[t] - hand[t-1]`` ``[L-1, 3]`` float64 (paired like the actions: with the frame pair
    ``(o_{t-1}, o_t)``), or None unless every episode has ``hand``."""
    if not all("hand" in episode for episode in episodes):
        return None
    return [np.diff(np.asarray(episode["hand"], np.float64), axis=0) for episode in episodes]


def _check_episodes(episodes: Sequence[dict[str, Any]], image_size: int) -> None:
    for index, episode in enumerate(episodes):
        image, action = np.asarray(episode["image"]), np.asarray(episode["action"])
        if image.dtype != np.uint8 or image.ndim != 4 or image.shape[1:] != (image_size, image_size, 3):
            raise ProbeError(
                f"episode {index}: image must be uint8 [L, {image_size}, {image_size}, 3], got "
                f"{image.dtype} {image.shape}"
            )
        if action.ndim != 2 or len(action) != len(image):
            raise ProbeError(f"episode {index}: action must be [L, A] with L = {len(image)} frames, got {action.shape}")
        if len(image) < 2:
            raise ProbeError(f"episode {index} has {len(image)} frame(s); a frame pair needs at least 2")
        if not np.all(np.isfinite(action)):
            raise ProbeError(f"episode {index}: actions contain NaN or inf")


# ----------------------------------------------------------------------------------------------
# The pre-trained model and its codes
# ----------------------------------------------------------------------------------------------


def code_features(code_params: dict[str, jax.Array]) -> jax.Array:
    """The deterministic summary of a code the probe reads: ``[deter; mean]`` (whichever parts
    exist), ``[..., D]``. The stochastic code's std is left out: it says how sure the encoder is,
    not which action it inferred."""
    parts = [code_params[name] for name in ("deter", "mean") if name in code_params]
    return jnp.concatenate(parts, axis=-1)


def make_code_fn(model):
    """``codes(params, batch_stats, pairs) -> [N, D]`` for frame pairs ``[N, 2, H, W, 3]`` uint8, jitted;
    BatchNorm in evaluation mode (running statistics), so each pair's code is independent of
    the others in its chunk (padding rows change nothing)."""
    from prelar_jax.model.nets.common import preprocess_image

    def codes(params, batch_stats, pairs):
        chex.assert_rank(pairs, 5)
        if model.implicit_action.input == "pixels":  # the pair network reads pixels: skip the encoder
            frames = preprocess_image(pairs)
            embed = jnp.zeros(pairs.shape[:2] + (0,), jnp.float32)
        else:
            frames, embed = model._encode_frames(params, batch_stats, {}, pairs, train=False)
        code_params, _ = model._codes(params, batch_stats, {}, frames, embed, None, False)
        return code_features(code_params)[:, 0]  # [N, D]

    return jax.jit(codes)


def episode_codes(
    code_fn, params: Params, batch_stats: Params, episodes: Sequence[dict[str, Any]], chunk: int = 256
) -> list[np.ndarray]:
    """Codes of every adjacent pair of every episode, ``[L_e - 1, D]`` float32 each (pair ``t-1``
    is ``(o_{t-1}, o_t)``). Pairs go through ``code_fn`` in fixed chunks of ``chunk`` (the last one
    zero-padded), so memory stays bounded and one compilation serves every chunk."""
    index = [(e, t) for e, episode in enumerate(episodes) for t in range(1, len(episode["image"]))]
    shape = np.asarray(episodes[0]["image"]).shape[1:]
    out: list[np.ndarray] = []
    for start in range(0, len(index), chunk):
        rows = index[start : start + chunk]
        pairs = np.zeros((chunk, 2) + shape, np.uint8)  # [chunk, 2, H, W, 3]
        for row, (e, t) in enumerate(rows):
            pairs[row] = episodes[e]["image"][t - 1 : t + 1]
        out.append(np.asarray(code_fn(params, batch_stats, pairs))[: len(rows)])
    flat = np.concatenate(out)
    bounds = np.cumsum([0] + [len(ep["image"]) - 1 for ep in episodes])
    return [flat[bounds[i] : bounds[i + 1]] for i in range(len(episodes))]


def _probe_config(pretrain_workdir, config):
    """The model config and (params, batch_stats, step) when restoring; a random init needs ``config``."""
    if pretrain_workdir:
        saved, params, batch_stats, step = restore_pretrain_state(pretrain_workdir)
        if config is not None:
            differing = [
                f"{block}.{k}"
                for block in ("model", "implicit_action")
                for k in saved[block]
                if k in config[block] and k != "compute_dtype" and saved[block][k] != config[block][k]
            ]
            if differing:
                raise ProbeError(
                    f"the config passed to the probe differs from the one {pretrain_workdir} was "
                    f"pre-trained with in {differing}; pass config=None to use the saved one"
                )
        return saved, (params, batch_stats, step)
    if config is None:
        raise ProbeError("implicit_action_probe: pass a pre-training workdir or a config to initialise randomly")
    return config, None


def random_features_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """``config`` with the code network's original output initialisation
    (``implicit_action.head_init_scale`` = 1), for the random-features baseline of the probe: with
    a smaller scale a random network's codes are (near) zero and score ~0 by construction."""
    if config.implicit_action.get("head_init_scale", 1.0) == 1.0:
        return config
    config = config.copy_and_resolve_references()
    config.implicit_action.head_init_scale = 1.0
    return config


def implicit_action_probe(
    pretrain_workdir: str | None,
    config: ml_collections.ConfigDict | None,
    episodes: Sequence[dict[str, Any]],
    key: jax.Array,
    train_fraction: float = 0.7,
    chunk: int = 256,
    splits: int = 1,
) -> dict[str, Any]:
    """R² of a linear probe from implicit-action codes to the true actions, on held-out episodes,
    averaged over ``splits`` random episode splits (``average_splits``; the first split is the one a
    single split draws).

    ``pretrain_workdir``: a pre-training workdir (config.json + checkpoints/; the latest step is
    used), or None for a random initialisation of ``config`` (a pre-training config; with a
    workdir it may be None, and otherwise must agree with the saved one). A random
    initialisation always uses the code network's original output initialisation
    (``random_features_config``). ``episodes``: dicts with
    ``image`` ``[L, H, W, 3]`` uint8 and ``action`` ``[L, A]`` (``action[t]`` produced
    ``image[t]``), at their own frame rate: they are strided like the pre-training videos
    (``data.frame_stride`` of the config, ``stride_episodes``). ``key`` seeds the episode split
    (``fold_in(key, 0)``; the same key gives the pre-trained and the random model the same split)
    and the random init (``fold_in(key, 1)``).

    Returns ``r2`` (per action dimension, NaN where the held-out actions are constant),
    ``hand`` (where every episode has ``hand``: the same probe to the hand's measured displacement),
    ``r2_mean``, ``train_r2``, ``train_pairs``/``eval_pairs``, ``train_episodes``/``eval_episodes``
    (indices into ``episodes``; of the first split), ``splits`` (``[[train, held-out], ...]`` of
    every split; with more than one, ``r2_mean_std`` and ``split_r2_mean`` too), ``code_type``,
    ``code_dim``, ``source`` ('pretrained' or 'random_init'), ``workdir`` and ``step`` (the
    checkpoint step; None for a random init).
    """
    from prelar_jax.learners.pretrain import PretrainModel

    config, restored = _probe_config(pretrain_workdir, config)
    implicit_cfg = config.implicit_action
    if implicit_cfg.code_type not in ("stoch", "deter", "mix"):
        raise ProbeError(
            f"implicit_action.code_type={implicit_cfg.code_type!r} has no implicit-action encoder to "
            "probe "
            "(APV and the random-code ablation feed the RSSM codes that do not depend on the frames)"
        )
    episodes = list(episodes)
    if len(episodes) < 2:
        raise ProbeError(f"the probe needs at least 2 episodes (one to fit, one to evaluate), got {len(episodes)}")
    _check_episodes(episodes, config.image_size)
    stride = config_lib.frame_stride(config)
    episodes = stride_episodes(episodes, stride)
    short = [i for i, episode in enumerate(episodes) if len(episode["image"]) < 2]
    if short:
        raise ProbeError(
            f"episodes {short} have fewer than 2 frames at the model's frame stride {stride} "
            f"(data.frame_stride): probe with episodes longer than {stride} frames"
        )
    split_key, init_key = jax.random.fold_in(key, 0), jax.random.fold_in(key, 1)
    rng = np.random.default_rng(np.asarray(jax.random.key_data(split_key)).ravel().tolist())
    if splits < 1:
        raise ProbeError(f"splits must be >= 1, got {splits}")
    tasks = [episode.get("task") for episode in episodes]  # stratified where every task has 2+ episodes
    drawn = [split_episodes(len(episodes), train_fraction, rng, tasks) for _ in range(splits)]

    model = PretrainModel(config if restored is not None else random_features_config(config))
    if restored is None:
        params, batch_stats = jax.jit(model.init)(init_key)
        step = None
    else:
        params, batch_stats, step = restored
    codes = episode_codes(make_code_fn(model), params, batch_stats, episodes, chunk)
    actions = [np.asarray(episode["action"], np.float64)[1:] for episode in episodes]  # a_t for (o_{t-1}, o_t)
    if not all(np.all(np.isfinite(c)) for c in codes):
        raise ProbeError("the implicit-action codes contain NaN or inf: the model's parameters are not finite")
    result = average_splits([linear_probe(codes, actions, train, held_out) for train, held_out in drawn])
    moves = hand_displacements(episodes)
    if moves is not None:
        result["hand"] = average_splits([linear_probe(codes, moves, train, held_out) for train, held_out in drawn])
    result.update(
        {
            "train_episodes": [int(i) for i in drawn[0][0]],
            "eval_episodes": [int(i) for i in drawn[0][1]],
            "splits": [[[int(i) for i in train], [int(i) for i in held_out]] for train, held_out in drawn],
            "code_type": implicit_cfg.code_type,
            "code_dim": int(codes[0].shape[-1]),
            "code_std": float(np.concatenate(codes).std(axis=0).mean()),
            "source": "random_init" if restored is None else "pretrained",
            "workdir": os.path.abspath(pretrain_workdir) if pretrain_workdir else None,
            "step": step,
        }
    )
    return result
