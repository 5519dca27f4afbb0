"""RSSM unrolls: reset masking, scan == Python loop of single steps, per-example random keys.

A small RSSM with non-square latents (4 groups x 5 classes) keeps axis mix-ups visible and the
compiles short.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from prelar_jax.model import world_model
from prelar_jax.model.distributions import straight_through_sample
from prelar_jax.model.nets.rssm import RSSM

B, T, A, E = 4, 6, 3, 7  # batch, length, action dim, embed dim
RSSM_MODULE = RSSM(deter=16, hidden=12, stoch=4, classes=5)


@pytest.fixture(scope="module")
def params():
    state = RSSM_MODULE.initial(B)
    key = jax.random.key(0, impl="unsafe_rbg")  # initialisation only (fast to compile)
    variables = jax.jit(RSSM_MODULE.init)(key, state, jnp.zeros((B, A)), jnp.zeros((B, E)), jnp.ones((B,), bool))
    # Random biases too, so that a zero state with a zero action is not a trivial fixed point.
    rng = np.random.default_rng(0)
    return jax.tree.map(lambda p: jnp.asarray(p + 0.3 * rng.standard_normal(p.shape), jnp.float32), variables["params"])


@jax.jit
def _obs_step(params, state, action, embed, is_first, keys):
    return RSSM_MODULE.apply({"params": params}, state, action, embed, is_first, keys, method=RSSM.obs_step)


@jax.jit
def _img_step(params, state, action, keys):
    return RSSM_MODULE.apply({"params": params}, state, action, keys, method=RSSM.img_step)


@jax.jit
def _observe(params, embed, action, is_first, keys):
    return world_model.observe(RSSM_MODULE, params, embed, action, is_first, keys)


@jax.jit
def _imagine(params, action, state, keys):
    return world_model.imagine(RSSM_MODULE, params, action, state, keys)


def _inputs(seed: int, batch: int = B, length: int = T):
    rng = np.random.default_rng(seed)
    embed = jnp.asarray(rng.standard_normal((batch, length, E)), jnp.float32)
    action = jnp.asarray(rng.standard_normal((batch, length, A)), jnp.float32)
    is_first = np.zeros((batch, length), bool)
    is_first[:, 0] = True
    return embed, action, jnp.asarray(is_first)


def _random_state(seed: int, batch: int = B):
    rng = np.random.default_rng(seed)
    stoch = np.eye(5, dtype=np.float32)[rng.integers(0, 5, (batch, 4))]
    return {
        "logit": jnp.asarray(rng.standard_normal((batch, 4, 5)), jnp.float32),
        "stoch": jnp.asarray(stoch),
        "deter": jnp.asarray(rng.uniform(-1, 1, (batch, 16)), jnp.float32),
    }


def _rows(tree, rows):
    return jax.tree.map(lambda v: np.asarray(v)[rows], tree)


def _assert_trees_equal(a, b):
    jax.tree.map(np.testing.assert_array_equal, a, b)


def _assert_trees_close(a, b, rtol=1e-5, atol=1e-6):
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=rtol, atol=atol), a, b)


def _max_abs_diff(a, b) -> float:
    return max(
        float(np.abs(np.asarray(x) - np.asarray(y)).max()) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b))
    )


# ----------------------------------------------------------------------------------------------
# Reset masking
# ----------------------------------------------------------------------------------------------


def test_obs_step_reset_equals_zero_state_and_zero_action(params):
    embed, action, _ = _inputs(1)
    embed, action = embed[:, 0], action[:, 0]
    state = _random_state(2)
    keys = jax.random.split(jax.random.key(3), B)
    is_first = jnp.asarray([True, False, True, False])
    post, prior = _obs_step(params, state, action, embed, is_first, keys)
    zero_post, zero_prior = _obs_step(
        params, RSSM_MODULE.initial(B), jnp.zeros_like(action), embed, jnp.zeros((B,), bool), keys
    )
    reset, carried = np.asarray([0, 2]), np.asarray([1, 3])
    # Rows with is_first: the previous state AND the action are zeroed, with the same samples.
    _assert_trees_equal(_rows((post, prior), reset), _rows((zero_post, zero_prior), reset))
    # Rows without: the random state and the action matter.
    for name in ("logit", "deter"):
        assert np.abs(np.asarray(post[name])[carried] - np.asarray(zero_post[name])[carried]).min() > 0
        assert np.abs(np.asarray(prior[name])[carried] - np.asarray(zero_prior[name])[carried]).min() > 0
    # The posterior shares the prior's deterministic state (spec 1.3).
    np.testing.assert_array_equal(post["deter"], prior["deter"])


def test_obs_step_reset_ignores_action(params):
    """Only the action differs: with is_first the outputs are identical, without they are not."""
    embed, action, _ = _inputs(4)
    embed, action = embed[:, 0], action[:, 0]
    state = _random_state(5)
    keys = jax.random.split(jax.random.key(6), B)
    first = jnp.ones((B,), bool)
    a = _obs_step(params, state, action, embed, first, keys)
    b = _obs_step(params, state, 10.0 * action + 1.0, embed, first, keys)
    _assert_trees_equal(a, b)
    c = _obs_step(params, state, 10.0 * action + 1.0, embed, ~first, keys)
    assert _max_abs_diff(a[1]["deter"], c[1]["deter"]) > 1e-3


# ----------------------------------------------------------------------------------------------
# Unrolls equal loops of single steps
# ----------------------------------------------------------------------------------------------


def _loop_observe(params, embed, action, is_first, keys):
    state = RSSM_MODULE.initial(embed.shape[0])
    posts, priors = [], []
    for t in range(embed.shape[1]):
        state, prior = _obs_step(params, state, action[:, t], embed[:, t], is_first[:, t], keys[:, t])
        posts.append(state)
        priors.append(prior)
    stack = lambda steps: jax.tree.map(lambda *v: jnp.stack(v, 1), *steps)
    return stack(posts), stack(priors)


def test_observe_equals_loop_of_obs_steps(params):
    embed, action, is_first = _inputs(7)
    keys = world_model.example_keys(jax.random.key(8), jnp.arange(B), T)
    assert keys.shape == (B, T)
    post, prior = _observe(params, embed, action, is_first, keys)
    assert post["stoch"].shape == (B, T, 4, 5) and post["deter"].shape == (B, T, 16)
    loop_post, loop_prior = _loop_observe(params, embed, action, is_first, keys)
    _assert_trees_close((post, prior), (loop_post, loop_prior))
    # The samples (one-hot up to straight-through rounding) are the same categories.
    np.testing.assert_array_equal(np.argmax(post["stoch"], -1), np.argmax(loop_post["stoch"], -1))
    np.testing.assert_allclose(np.asarray(post["stoch"]).sum(-1), 1.0, atol=1e-6)


def test_observe_reset_mid_sequence_cuts_dependence_on_the_past(params):
    embed, action, is_first = _inputs(9)
    is_first = np.asarray(is_first).copy()
    is_first[:2, 3] = True  # rows 0, 1 restart at t = 3; rows 2, 3 carry on
    keys = world_model.example_keys(jax.random.key(10), jnp.arange(B), T)
    out = _observe(params, embed, action, jnp.asarray(is_first), keys)
    other_embed, other_action, _ = _inputs(11)
    new_embed = embed.at[:, :3].set(other_embed[:, :3])  # change every input before t = 3
    new_action = action.at[:, :3].set(other_action[:, :3])
    new_out = _observe(params, new_embed, new_action, jnp.asarray(is_first), keys)
    later = lambda tree, rows: jax.tree.map(lambda v: np.asarray(v)[rows, 3:], tree)
    _assert_trees_close(later(out, slice(0, 2)), later(new_out, slice(0, 2)), rtol=1e-6, atol=1e-7)
    assert _max_abs_diff(later(out, slice(2, 4)), later(new_out, slice(2, 4))) > 1e-3
    # And a reset sequence equals the same suffix observed from scratch.
    suffix = _observe(params, embed[:, 3:], action[:, 3:], jnp.asarray(is_first[:, 3:]), keys[:, 3:])
    _assert_trees_close(later(out, slice(0, 2)), _rows(suffix, slice(0, 2)))


def test_imagine_equals_loop_of_img_steps(params):
    start = _random_state(12)
    action = jnp.asarray(np.random.default_rng(13).standard_normal((B, 5, A)), jnp.float32)
    keys = world_model.example_keys(jax.random.key(14), jnp.arange(B), 5)
    prior = _imagine(params, action, start, keys)
    assert prior["logit"].shape == (B, 5, 4, 5)
    state, steps = start, []
    for t in range(5):
        state = _img_step(params, state, action[:, t], keys[:, t])
        steps.append(state)
    loop = jax.tree.map(lambda *v: jnp.stack(v, 1), *steps)
    _assert_trees_close(prior, loop)
    np.testing.assert_array_equal(np.argmax(prior["stoch"], -1), np.argmax(loop["stoch"], -1))


# ----------------------------------------------------------------------------------------------
# Per-example keys: samples do not depend on how the batch is split
# ----------------------------------------------------------------------------------------------


def test_samples_do_not_depend_on_batch_split(params):
    embed, action, is_first = _inputs(15)
    key = jax.random.key(16)
    full = _observe(params, embed, action, is_first, world_model.example_keys(key, jnp.arange(B), T))
    half = B // 2
    for rows in (np.arange(half), np.arange(half, B)):
        part = _observe(
            params, embed[rows], action[rows], is_first[rows], world_model.example_keys(key, jnp.asarray(rows), T)
        )
        _assert_trees_close(part, _rows(full, rows))
        np.testing.assert_array_equal(
            np.argmax(part[0]["stoch"], -1), np.argmax(np.asarray(full[0]["stoch"])[rows], -1)
        )


def test_examples_draw_different_samples():
    """Identical inputs in every row still give each row its own sample stream."""
    logits = jnp.zeros((B, T, 4, 5))  # uniform: any shared key would give identical rows
    keys = world_model.example_keys(jax.random.key(17), jnp.arange(B), T)
    samples = jax.vmap(jax.vmap(straight_through_sample))(keys, logits)
    index = np.argmax(np.asarray(samples), -1).reshape(B, -1)  # [B, T * 4]
    assert len({tuple(row) for row in index}) == B
    # Folding in the global index: example 2's stream is the same wherever it sits in a batch.
    again = world_model.example_keys(jax.random.key(17), jnp.asarray([2]), T)
    np.testing.assert_array_equal(jax.random.key_data(again[0]), jax.random.key_data(keys[2]))


def test_image_log_likelihood_is_unit_gaussian_sum():
    rng = np.random.default_rng(18)
    mean = rng.standard_normal((2, 3, 4, 4, 3)).astype(np.float32)
    target = rng.standard_normal((2, 3, 4, 4, 3)).astype(np.float32)
    out = world_model.image_log_likelihood(mean, target)
    expected = -0.5 * ((mean.astype(np.float64) - target) ** 2).sum((-3, -2, -1))
    assert out.shape == (2, 3)
    np.testing.assert_allclose(out, expected, rtol=1e-5)
