"""Shared helpers for the model-numerics tests: config loading, parameters and random batches.

``configs/`` is not a package, so the config file is loaded from its path. Model initialisation
is cached per configuration because compiling Flax's random initialisers costs seconds on CPU.
"""

from __future__ import annotations

import functools
import os
import pathlib

import jax
import ml_collections
import numpy as np

from prelar_jax.runtime.config import config_module
from prelar_jax.learners.pretrain import PretrainModel

REPO = pathlib.Path(__file__).resolve().parents[1]
CONFIG_PATH = REPO / "configs" / "prelar_pretrain.py"


@functools.lru_cache(maxsize=None)
def _config_module():
    return config_module(str(CONFIG_PATH))


def benchmark_modules():
    """(``prelar_jax.launch.benchmark``, configs/benchmark.py as a module: presets and methods table)."""
    from prelar_jax.launch import benchmark

    return benchmark, config_module(str(REPO / "configs" / "benchmark.py"))


def load_config(preset: str = "tiny", **overrides) -> ml_collections.ConfigDict:
    """A fresh config of ``preset`` with dotted leaves overridden, e.g.
    ``load_config('tiny', **{'loss.consistency': 'sign'})``."""
    config = _config_module().get_config(preset)
    for dotted, value in overrides.items():
        node = config
        *parents, leaf = dotted.split(".")
        for name in parents:
            node = node[name]
        node[leaf] = value
    return config


def random_batch(seed: int, batch_size: int, length: int, image_size: int = 64) -> dict[str, np.ndarray]:
    """Random uint8 frames ``[B, T, H, W, 3]`` and ``is_first`` ``[B, T]`` (True at t = 0 only)."""
    rng = np.random.default_rng(seed)
    image = rng.integers(0, 256, (batch_size, length, image_size, image_size, 3), dtype=np.uint8)
    is_first = np.zeros((batch_size, length), bool)
    is_first[:, 0] = True
    return {"image": image, "is_first": is_first}


@functools.lru_cache(maxsize=None)
def _init_cached(preset: str, overrides: tuple[tuple[str, object], ...], seed: int):
    model = PretrainModel(load_config(preset, **dict(overrides)))
    # A counter-based RBG key: the same initialisers (uniform bits), but compiling it takes a
    # fraction of the time threefry's does on CPU. The initial values themselves do not matter.
    key = jax.random.key(seed, impl="unsafe_rbg")
    params, stats = jax.jit(model.init)(key)
    return jax.tree.map(np.asarray, (params, stats))


def init_params(preset: str = "tiny", seed: int = 0, **overrides):
    """``(params, batch_stats)`` of ``PretrainModel.init`` as host numpy trees (safe to donate copies of)."""
    return _init_cached(preset, tuple(sorted(overrides.items())), seed)


def glorot_params(model: PretrainModel, seed: int = 0):
    """``(params, batch_stats)`` with ``model.init``'s shapes filled on the host, without compiling
    any initialiser: Glorot-uniform kernels and small random biases/norm parameters so that
    every parameter influences the output. For tests that only need *some* valid parameters."""
    rng = np.random.default_rng(seed)
    shapes = jax.eval_shape(model.init, jax.random.key(0))

    def fill(path, leaf):
        name = path[-1].key
        if name == "kernel":
            fan_in = int(np.prod(leaf.shape[:-1]))
            fan_out = int(np.prod(leaf.shape[:-2])) * leaf.shape[-1]
            bound = np.sqrt(6.0 / (fan_in + fan_out))
            return rng.uniform(-bound, bound, leaf.shape).astype(leaf.dtype)
        if name == "scale":
            return (1.0 + 0.1 * rng.standard_normal(leaf.shape)).astype(leaf.dtype)
        if name == "var":
            return (1.0 + 0.1 * rng.random(leaf.shape)).astype(leaf.dtype)
        return (0.1 * rng.standard_normal(leaf.shape)).astype(leaf.dtype)  # bias, mean

    return jax.tree_util.tree_map_with_path(fill, shapes)


def write_pretrain_checkpoint(workdir, config: ml_collections.ConfigDict, seed: int, step: int):
    """A pre-training workdir as ``experiments/pretrain.py`` leaves it (``config.json`` and one
    checkpoint at ``step``), holding ``glorot_params`` of ``config``'s model without compiling
    anything; returns ``(params, batch_stats)``."""
    from prelar_jax.runtime import checkpoint, logger as logger_lib
    from prelar_jax.learners.pretrain import TrainState, make_optimizer

    params, stats = glorot_params(PretrainModel(config), seed=seed)
    state = TrainState(
        step=np.int32(step),
        params=params,
        batch_stats=stats,
        opt_state=jax.tree.map(np.asarray, make_optimizer(config).init(params)),
    )
    logger_lib.write_config(workdir, config.to_dict())
    with checkpoint.Checkpointer(os.path.join(os.fspath(workdir), "checkpoints")) as ckpt:
        ckpt.save(step, state, {"step": step})
    return params, stats
