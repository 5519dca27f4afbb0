"""Tests for the action-state consistency loss against float64 numpy references and its intent."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.stats

from prelar_jax.learners.consistency import VARIANTS, consistency_loss

DIFFERENTIABLE = ("tanh", "ranknet", "soft_spearman")


# ----------------------------------------------------------------------------------------------
# float64 numpy references, written as explicit double loops
# ----------------------------------------------------------------------------------------------


def _ref_tau(d_a: np.ndarray, c: float, tau: float | None = None) -> float:
    if tau is not None:  # frozen temperature, for finite differences of the stop-gradient tau
        return tau
    n = len(d_a)
    spread = sum(abs(d_a[i] - d_a[j]) for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
    return max(c * spread, 1e-8)


def ref_sign(d_s: np.ndarray, d_a: np.ndarray) -> float:
    n = len(d_s)
    total = 0.0
    for i in range(n):
        for j in range(n):
            total += (np.sign(d_s[i] - d_s[j]) - np.sign(d_a[i] - d_a[j])) ** 2
    return total / n**2


def ref_tanh(d_s: np.ndarray, d_a: np.ndarray, c: float, tau: float | None = None) -> float:
    n, tau = len(d_s), _ref_tau(d_a, c, tau)
    total = 0.0
    for i in range(n):
        for j in range(n):
            if i != j:
                total += (np.sign(d_s[i] - d_s[j]) - np.tanh((d_a[i] - d_a[j]) / tau)) ** 2
    return total / (n * (n - 1))


def ref_ranknet(d_s: np.ndarray, d_a: np.ndarray, c: float, tau: float | None = None) -> float:
    n, tau = len(d_s), _ref_tau(d_a, c, tau)
    terms = [np.log1p(np.exp(-(d_a[i] - d_a[j]) / tau)) for i in range(n) for j in range(n) if d_s[i] - d_s[j] > 0]
    return float(np.mean(terms)) if terms else 0.0


def ref_soft_spearman(d_s: np.ndarray, d_a: np.ndarray, c: float, tau: float | None = None) -> float:
    n, tau = len(d_s), _ref_tau(d_a, c, tau)
    soft_rank = np.array([sum(1.0 / (1.0 + np.exp(-(d_a[i] - d_a[j]) / tau)) for j in range(n)) for i in range(n)])
    hard_rank = scipy.stats.rankdata(d_s)  # average ranks for ties
    return 1.0 - float(np.corrcoef(soft_rank, hard_rank)[0, 1])


def _random_case(seed: int, n: int = 7) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.gamma(2.0, 1.0, n), rng.gamma(2.0, 1.0, n)


# ----------------------------------------------------------------------------------------------
# 'sign': the released metric
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_sign_matches_double_loop_with_ties(seed):
    rng = np.random.default_rng(seed)
    d_s = rng.integers(0, 3, 7).astype(np.float64)  # few distinct values, so ties in both
    d_a = rng.integers(0, 3, 7).astype(np.float64)
    assert len(np.unique(d_s)) < 7 and len(np.unique(d_a)) < 7
    got = consistency_loss(jnp.asarray(d_s), jnp.asarray(d_a), "sign")
    np.testing.assert_allclose(float(got), ref_sign(d_s, d_a), rtol=1e-6)


def test_sign_extremes():
    n = 9
    d_s = jnp.arange(n, dtype=jnp.float32) * 0.7 + 0.1
    assert float(consistency_loss(d_s, 3.0 * d_s + 2.0, "sign")) == 0.0
    reversed_value = float(consistency_loss(d_s, -d_s, "sign"))
    np.testing.assert_allclose(reversed_value, 4.0 * (n * n - n) / (n * n), rtol=1e-6)


def test_sign_gradient_is_exactly_zero():
    d_s, d_a = _random_case(3)
    grad = jax.grad(functools.partial(consistency_loss, variant="sign"), argnums=1)(
        jnp.asarray(d_s, jnp.float32), jnp.asarray(d_a, jnp.float32)
    )
    assert grad.shape == (7,)
    assert np.all(np.asarray(grad) == 0.0)


# ----------------------------------------------------------------------------------------------
# differentiable variants
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 4])
@pytest.mark.parametrize("c", [0.2, 1.0])
@pytest.mark.parametrize(
    "variant,reference", [("tanh", ref_tanh), ("ranknet", ref_ranknet), ("soft_spearman", ref_soft_spearman)]
)
def test_matches_float64_reference(variant, reference, c, seed):
    d_s, d_a = _random_case(seed)
    got = consistency_loss(jnp.asarray(d_s), jnp.asarray(d_a), variant, temperature_scale=c)
    np.testing.assert_allclose(float(got), reference(d_s, d_a, c), rtol=2e-5, atol=1e-6)


@pytest.mark.parametrize(
    "variant,reference", [("tanh", ref_tanh), ("ranknet", ref_ranknet), ("soft_spearman", ref_soft_spearman)]
)
def test_gradient_matches_finite_differences_with_frozen_temperature(variant, reference):
    """tau is stop-gradient: the gradient is that of the loss with tau held at its current value."""
    d_s, d_a = _random_case(15)
    c = 0.5
    tau = _ref_tau(d_a, c)
    step = 1e-6
    expected = np.zeros_like(d_a)
    for k in range(len(d_a)):
        bump = np.zeros_like(d_a)
        bump[k] = step
        plus, minus = reference(d_s, d_a + bump, c, tau), reference(d_s, d_a - bump, c, tau)
        expected[k] = (plus - minus) / (2 * step)
    grad = jax.grad(functools.partial(consistency_loss, variant=variant, temperature_scale=c), argnums=1)(
        jnp.asarray(d_s, jnp.float32), jnp.asarray(d_a, jnp.float32)
    )
    np.testing.assert_allclose(np.asarray(grad), expected, rtol=2e-3, atol=1e-4 * np.abs(expected).max())


def test_soft_spearman_reference_with_tied_state_distances():
    d_s = np.array([1.0, 2.0, 2.0, 0.5, 3.0, 1.0, 2.0])
    _, d_a = _random_case(5)
    got = consistency_loss(jnp.asarray(d_s), jnp.asarray(d_a), "soft_spearman")
    np.testing.assert_allclose(float(got), ref_soft_spearman(d_s, d_a, 0.2), rtol=2e-5, atol=1e-6)


@pytest.mark.parametrize("variant", DIFFERENTIABLE)
def test_gradient_is_finite_and_nonzero(variant):
    d_s, d_a = _random_case(6, n=12)
    grad = jax.grad(functools.partial(consistency_loss, variant=variant), argnums=1)(
        jnp.asarray(d_s, jnp.float32), jnp.asarray(d_a, jnp.float32)
    )
    assert np.all(np.isfinite(grad))
    assert np.max(np.abs(grad)) > 1e-6


@pytest.mark.parametrize("variant", VARIANTS)
def test_no_gradient_into_state_distance(variant):
    d_s, d_a = _random_case(7, n=10)
    grad = jax.grad(functools.partial(consistency_loss, variant=variant), argnums=0)(
        jnp.asarray(d_s, jnp.float32), jnp.asarray(d_a, jnp.float32)
    )
    assert np.all(np.asarray(grad) == 0.0)


@pytest.mark.parametrize("variant", DIFFERENTIABLE + ("sign",))
def test_agreeing_order_scores_lower_than_reversed(variant):
    d_s, _ = _random_case(8, n=16)
    agree = np.log1p(d_s) * 2.0 + 0.3  # monotone increasing in d_s, different shape
    reverse = agree.max() + 0.3 - agree
    loss_agree = consistency_loss(jnp.asarray(d_s), jnp.asarray(agree), variant)
    loss_reverse = consistency_loss(jnp.asarray(d_s), jnp.asarray(reverse), variant)
    assert float(loss_agree) < float(loss_reverse) - 0.1


@pytest.mark.parametrize("variant", DIFFERENTIABLE)
def test_invariant_to_scaling_action_distance(variant):
    d_s, d_a = _random_case(9, n=12)
    base = consistency_loss(jnp.asarray(d_s), jnp.asarray(d_a), variant)
    scaled = consistency_loss(jnp.asarray(d_s), jnp.asarray(10.0 * d_a), variant)
    np.testing.assert_allclose(float(scaled), float(base), rtol=1e-5)


def test_tanh_tends_to_sign_over_off_diagonal_pairs():
    n = 8
    rng = np.random.default_rng(10)
    d_s = rng.permutation(n).astype(np.float64)
    d_s[3] = d_s[5]  # a tie in d_s: sgn is 0 on both sides of the limit
    d_a = rng.permutation(n).astype(np.float64) * 1.5  # well separated, distinct
    sign_all_pairs = float(consistency_loss(jnp.asarray(d_s), jnp.asarray(d_a), "sign"))
    sign_off_diagonal = sign_all_pairs * n * n / (n * (n - 1))  # diagonal pairs contribute 0
    tanh_sharp = float(consistency_loss(jnp.asarray(d_s), jnp.asarray(d_a), "tanh", temperature_scale=1e-4))
    tanh_soft = float(consistency_loss(jnp.asarray(d_s), jnp.asarray(d_a), "tanh"))
    np.testing.assert_allclose(tanh_sharp, sign_off_diagonal, rtol=1e-5)
    assert abs(tanh_soft - sign_off_diagonal) > 1e-3  # the default temperature really smooths


@pytest.mark.parametrize("variant", DIFFERENTIABLE)
def test_gradient_descent_increases_rank_correlation(variant):
    n = 24
    rng = np.random.default_rng(11)
    d_s = jnp.asarray(rng.gamma(2.0, 1.0, n), jnp.float32)
    d_a0 = jnp.asarray(rng.gamma(2.0, 1.0, n), jnp.float32)
    grad_fn = jax.jit(jax.grad(functools.partial(consistency_loss, variant=variant), argnums=1))

    def body(_, d_a):
        return d_a - 1.0 * grad_fn(d_s, d_a)

    d_a = jax.lax.fori_loop(0, 300, body, d_a0)
    rho_before = scipy.stats.spearmanr(np.asarray(d_a0), np.asarray(d_s)).statistic
    rho_after = scipy.stats.spearmanr(np.asarray(d_a), np.asarray(d_s)).statistic
    assert rho_after > rho_before + 0.3
    assert rho_after > 0.9
    assert float(consistency_loss(d_s, d_a, variant)) < float(consistency_loss(d_s, d_a0, variant))


# ----------------------------------------------------------------------------------------------
# 'off', bad input, dtypes, jit
# ----------------------------------------------------------------------------------------------


def test_off_is_zero_with_zero_gradient():
    d_s, d_a = _random_case(12)
    d_s, d_a = jnp.asarray(d_s, jnp.float32), jnp.asarray(d_a, jnp.float32)
    value = consistency_loss(d_s, d_a, "off")
    assert value.shape == () and value.dtype == jnp.float32 and float(value) == 0.0
    grad = jax.grad(functools.partial(consistency_loss, variant="off"), argnums=1)(d_s, d_a)
    assert np.all(np.asarray(grad) == 0.0)


def test_unknown_variant_raises():
    with pytest.raises(ValueError, match="sort_rank.*tanh"):
        consistency_loss(jnp.ones(4), jnp.ones(4), "sort_rank")


def test_shape_mismatch_raises():
    with pytest.raises(ValueError, match="same"):
        consistency_loss(jnp.ones(4), jnp.ones(5))
    with pytest.raises(ValueError, match="1-D"):
        consistency_loss(jnp.ones((2, 3)), jnp.ones((2, 3)))


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_output_is_float32_for_low_precision_input(variant, dtype):
    d_s, d_a = _random_case(13)
    value = consistency_loss(jnp.asarray(d_s, dtype), jnp.asarray(d_a, dtype), variant)
    assert value.dtype == jnp.float32 and value.shape == ()
    expected = consistency_loss(
        jnp.asarray(d_s, dtype).astype(jnp.float32), jnp.asarray(d_a, dtype).astype(jnp.float32), variant
    )
    np.testing.assert_allclose(float(value), float(expected), rtol=1e-6)


@pytest.mark.parametrize("variant", VARIANTS)
def test_jit_matches_eager(variant):
    d_s, d_a = _random_case(14, n=20)
    d_s, d_a = jnp.asarray(d_s, jnp.float32), jnp.asarray(d_a, jnp.float32)
    jitted = jax.jit(consistency_loss, static_argnames=("variant", "temperature_scale"))
    np.testing.assert_allclose(
        float(jitted(d_s, d_a, variant=variant)), float(consistency_loss(d_s, d_a, variant)), rtol=1e-5, atol=1e-7
    )
    value_and_grad = jax.jit(jax.value_and_grad(functools.partial(consistency_loss, variant=variant), argnums=1))
    value, grad = value_and_grad(d_s, d_a)
    assert np.isfinite(float(value)) and np.all(np.isfinite(grad))


def test_paper_size_batch_is_finite():
    n = 16 * 24  # B * (T - 1)
    rng = np.random.default_rng(15)
    d_s = jnp.asarray(rng.gamma(2.0, 1.0, n), jnp.float32)
    d_a = jnp.asarray(rng.gamma(2.0, 5.0, n), jnp.float32)
    for variant in VARIANTS:
        value, grad = jax.jit(jax.value_and_grad(functools.partial(consistency_loss, variant=variant), argnums=1))(
            d_s, d_a
        )
        assert np.isfinite(float(value)) and np.all(np.isfinite(grad)), variant
    # an uncorrelated batch sits near the middle of the sign metric's [0, 4] range
    assert 1.5 < float(consistency_loss(d_s, d_a, "sign")) < 2.5


def test_degenerate_inputs_are_finite():
    equal = jnp.full((5,), 2.0, jnp.float32)
    d_a = jnp.asarray([0.1, 0.4, 0.2, 0.9, 0.5], jnp.float32)
    for variant in VARIANTS:
        value_and_grad = jax.jit(jax.value_and_grad(functools.partial(consistency_loss, variant=variant), argnums=1))
        for d_s_, d_a_ in [(equal, d_a), (d_a, equal), (equal, equal), (d_a[:1], d_a[:1])]:
            value, grad = value_and_grad(d_s_, d_a_)
            assert np.isfinite(float(value)) and np.all(np.isfinite(grad)), (variant, d_s_, d_a_)
    # all-equal state distances leave RankNet without a positive pair: 0 by definition
    assert float(consistency_loss(equal, d_a, "ranknet")) == 0.0
