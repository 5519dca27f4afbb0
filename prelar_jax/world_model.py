"""Pure-functional RSSM unrolls and world-model losses shared by every method.

``observe`` and ``imagine`` are ``jax.lax.scan`` loops over the RSSM's single-step methods, called
through ``module.apply`` with explicit parameters; resets are masks (``is_first``), never Python
branches. Every random draw comes from per-example keys so that sharding the batch does not change
the samples.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from prelar_jax.nets.rssm import RSSM, State


def _time_major(tree):
    return jax.tree.map(lambda x: jnp.swapaxes(x, 0, 1), tree)


def observe(rssm: RSSM, params, embed: jax.Array, action: jax.Array, is_first: jax.Array,
            keys: jax.Array, state: State | None = None) -> tuple[State, State]:
    """Posterior unroll. ``embed`` ``[B, T, E]``, ``action`` ``[B, T, A]``, ``is_first`` ``[B, T]``,
    ``keys`` ``[B, T]`` key array. Returns ``(post, prior)`` dicts of ``[B, T, ...]`` arrays."""
    batch = embed.shape[0]
    if state is None:
        state = rssm.initial(batch)

    def step(carry, inputs):
        emb, act, first, key = inputs
        post, prior = rssm.apply({"params": params}, carry, act, emb, first, key,
                                 method=RSSM.obs_step)
        return post, (post, prior)

    _, (post, prior) = jax.lax.scan(step, state, _time_major((embed, action, is_first, keys)))
    return _time_major(post), _time_major(prior)


def imagine(rssm: RSSM, params, action: jax.Array, state: State, keys: jax.Array) -> State:
    """Prior unroll from ``state`` under a given action sequence ``[B, H, A]`` (no reset masks)."""

    def step(carry, inputs):
        act, key = inputs
        prior = rssm.apply({"params": params}, carry, act, key, method=RSSM.img_step)
        return prior, prior

    _, prior = jax.lax.scan(step, state, _time_major((action, keys)))
    return _time_major(prior)


def image_log_likelihood(mean: jax.Array, target: jax.Array) -> jax.Array:
    """Unit-variance Gaussian log-likelihood without the constant, summed over H, W, C."""
    diff = mean.astype(jnp.float32) - target.astype(jnp.float32)
    return -0.5 * jnp.sum(jnp.square(diff), axis=(-3, -2, -1))


def example_keys(key: jax.Array, example_index: jax.Array, steps: int) -> jax.Array:
    """``[B, steps]`` keys, one stream per example, from its *global* index in the batch."""
    return jax.vmap(lambda i: jax.random.split(jax.random.fold_in(key, i), steps))(example_index)
