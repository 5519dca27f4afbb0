"""Small closed-form distribution helpers shared by the world model and the losses.

Categorical latents follow DreamerV2: 32 groups of 32 classes, sampled as one-hot with the
straight-through gradient, and every log-probability or KL is summed over the groups
(``Independent(OneHotCategorical, 1)``). KLs are always computed in float32.

Diagonal Gaussians follow the original ``sigmoid2`` std transform: ``std = 2 * sigmoid(raw / 2)``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def sigmoid2(raw_std: jax.Array) -> jax.Array:
    """The original code's std transform: maps a raw value to (0, 2); sigmoid2(0) = 1."""
    return 2.0 * jax.nn.sigmoid(raw_std / 2.0)


# ----------------------------------------------------------------------------------------------
# Categorical latents
# ----------------------------------------------------------------------------------------------


def straight_through_sample(key: jax.Array, logits: jax.Array) -> jax.Array:
    """One-hot sample of ``Cat(softmax(logits))`` over the last axis with straight-through gradient.

    The forward value is exactly one-hot; the gradient is that of the probabilities
    (``sample + (probs - stop_gradient(probs))``; the brackets keep the value exact).
    """
    logits = logits.astype(jnp.float32)
    index = jax.random.categorical(key, logits, axis=-1)
    sample = jax.nn.one_hot(index, logits.shape[-1], dtype=logits.dtype)
    probs = jax.nn.softmax(logits, axis=-1)
    return sample + (probs - jax.lax.stop_gradient(probs))  # exactly one-hot in the forward pass


def categorical_mode(logits: jax.Array) -> jax.Array:
    """Arg-max one-hot (the mode), with no gradient."""
    return jax.nn.one_hot(jnp.argmax(logits, axis=-1), logits.shape[-1], dtype=jnp.float32)


def categorical_kl(lhs_logits: jax.Array, rhs_logits: jax.Array) -> jax.Array:
    """KL(Cat(lhs) || Cat(rhs)) summed over the last two axes ``[..., groups, classes]``."""
    lhs = jax.nn.log_softmax(lhs_logits.astype(jnp.float32), axis=-1)
    rhs = jax.nn.log_softmax(rhs_logits.astype(jnp.float32), axis=-1)
    return jnp.sum(jnp.exp(lhs) * (lhs - rhs), axis=(-2, -1))


def categorical_entropy(logits: jax.Array) -> jax.Array:
    """Entropy of ``Cat(logits)`` summed over the last two axes ``[..., groups, classes]``."""
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    return -jnp.sum(jnp.exp(logp) * logp, axis=(-2, -1))


def balanced_kl_loss(
    post_logits: jax.Array, prior_logits: jax.Array, balance: float = 0.8, free: float = 0.0
) -> tuple[jax.Array, jax.Array]:
    """DreamerV2 KL balancing (``forward=False``, ``free_avg=True``).

    ``L = (1 - balance) * max(mean KL(q || sg p), free) + balance * max(mean KL(sg q || p), free)``

    The mean covers every leading axis (all B x T steps). Returns ``(loss, mean KL value)``.
    """
    sg = jax.lax.stop_gradient
    kl_post = categorical_kl(post_logits, sg(prior_logits)).mean()
    kl_prior = categorical_kl(sg(post_logits), prior_logits).mean()
    loss = (1.0 - balance) * jnp.maximum(kl_post, free) + balance * jnp.maximum(kl_prior, free)
    value = categorical_kl(post_logits, prior_logits).mean()
    return loss, sg(value)


# ----------------------------------------------------------------------------------------------
# Diagonal Gaussians
# ----------------------------------------------------------------------------------------------


def gaussian_kl(mean_a: jax.Array, std_a: jax.Array, mean_b: jax.Array, std_b: jax.Array) -> jax.Array:
    """KL(N(mean_a, std_a^2) || N(mean_b, std_b^2)) summed over the last axis."""
    mean_a, std_a = mean_a.astype(jnp.float32), std_a.astype(jnp.float32)
    mean_b, std_b = jnp.asarray(mean_b, jnp.float32), jnp.asarray(std_b, jnp.float32)
    var_ratio = jnp.square(std_a / std_b)
    mahalanobis = jnp.square((mean_a - mean_b) / std_b)
    per_dim = 0.5 * (var_ratio + mahalanobis - 1.0) - jnp.log(std_a / std_b)
    return jnp.sum(per_dim, axis=-1)


def gaussian_sample(key: jax.Array, mean: jax.Array, std: jax.Array) -> jax.Array:
    """Reparameterised sample ``mean + std * eps``."""
    return mean + std * jax.random.normal(key, mean.shape, mean.dtype)


# ----------------------------------------------------------------------------------------------
# Truncated normal (the DreamerV2 continuous actor, spec section 6)
# ----------------------------------------------------------------------------------------------
#
# ``TruncNormalDist(loc=tanh(mu_raw), scale=std, low=-1, high=1)``, ``Independent`` over the
# action dimensions: log-probabilities and entropies are summed over the last axis. Its *mode*,
# used for evaluation-time acting (spec 5.5), is the loc itself (the mean argument of the
# functions below), so no function is needed for it. All arithmetic is float32.

_LOG_SQRT_2PI = 0.9189385332046727  # 0.5 * log(2 pi)
_LOG_SQRT_2PI_E = 1.4189385332046727  # 0.5 * log(2 pi e) = 0.5 * log(2 pi) + 0.5
# torch's ``finfo(float32).eps``, which the original uses both as the floor of the normaliser Z
# and as the margin of the uniform draw of the inverse-CDF sampler.
_EPS = float(jnp.finfo(jnp.float32).eps)


def _truncation(mean: jax.Array, std: jax.Array, low: float, high: float):
    """Standardised bounds ``alpha, beta`` and the normaliser ``Z = Phi(beta) - Phi(alpha)``.

    Z is taken from the tail in which it does not cancel: when both bounds lie above the mean
    (``alpha > 0``), ``Phi(beta) - Phi(alpha)`` is a difference of two numbers near 1, so the
    mirrored ``Phi(-alpha) - Phi(-beta)`` is used instead. Z is clamped to ``>= eps`` as in the
    original.
    """
    mean = jnp.asarray(mean, jnp.float32)
    std = jnp.asarray(std, jnp.float32)
    alpha = (low - mean) / std
    beta = (high - mean) / std
    ndtr = jax.scipy.special.ndtr
    z = jnp.where(alpha > 0, ndtr(-alpha) - ndtr(-beta), ndtr(beta) - ndtr(alpha))
    return mean, std, alpha, beta, jnp.maximum(z, _EPS)


def _std_normal_pdf(x: jax.Array) -> jax.Array:
    return jnp.exp(-0.5 * jnp.square(x) - _LOG_SQRT_2PI)


def truncated_normal_icdf(
    u: jax.Array, mean: jax.Array, std: jax.Array, low: float = -1.0, high: float = 1.0
) -> jax.Array:
    """Inverse CDF ``mean + std * Phi^{-1}(Phi(alpha) + u Z)`` per element (no clipping).

    Differentiable in ``mean`` and ``std`` (the reparameterisation of the sampler). The argument
    of ``Phi^{-1}`` is formed in whichever tail keeps float32 precision: below the median as
    ``Phi(alpha) + u Z``, above it as ``1 - p = Phi(-beta) + (1 - u) Z`` with
    ``x = -Phi^{-1}(1 - p)``.
    """
    mean, std, alpha, beta, z = _truncation(mean, std, low, high)
    ndtr, ndtri = jax.scipy.special.ndtr, jax.scipy.special.ndtri
    u = jnp.asarray(u, jnp.float32)
    lower = ndtr(alpha) + u * z  # P(X <= x)
    upper = ndtr(-beta) + (1.0 - u) * z  # P(X > x)
    use_lower = lower < 0.5
    # One Phi^{-1} of the smaller tail probability (at least the smallest normal float, so
    # neither the value nor the gradient is ever infinite), mirrored for the upper tail.
    tail = jnp.maximum(jnp.where(use_lower, lower, upper), jnp.finfo(jnp.float32).tiny)
    standard = jnp.where(use_lower, 1.0, -1.0) * ndtri(tail)
    return mean + std * standard


def straight_through_clip(x: jax.Array, low: float, high: float) -> jax.Array:
    """The clipped value in the forward pass with the gradient of the unclipped ``x``."""
    return x + jax.lax.stop_gradient(jnp.clip(x, low, high) - x)


def truncated_normal_sample(
    key: jax.Array, mean: jax.Array, std: jax.Array, low: float = -1.0, high: float = 1.0, clip: float = 1e-6
) -> jax.Array:
    """Reparameterised sample of ``TruncNormal(mean, std, [low, high])``, float32, with the
    broadcast shape of ``mean`` and ``std``.

    As the original ``TruncNormalDist.sample``: ``u ~ U(eps, 1 - eps)`` (float32 eps), the
    inverse CDF, then a straight-through clip to ``[low + clip, high - clip]`` so that a
    later ``atanh`` or log-prob never sees the boundary while gradients still reach ``mean``
    and ``std`` unchanged. ``key`` is one key for the whole array; vmap it for per-row keys.
    """
    shape = jnp.broadcast_shapes(jnp.shape(mean), jnp.shape(std))
    u = jax.random.uniform(key, shape, jnp.float32, minval=_EPS, maxval=1.0 - _EPS)
    x = truncated_normal_icdf(u, mean, std, low, high)
    return straight_through_clip(x, low + clip, high - clip)


def truncated_normal_log_prob(
    x: jax.Array, mean: jax.Array, std: jax.Array, low: float = -1.0, high: float = 1.0
) -> jax.Array:
    """``log N(x; mean, std) - log Z`` summed over the last (action) axis.

    Like the original, it does not check the support: values outside ``[low, high]`` get the
    same formula rather than ``-inf`` (samples are always inside).
    """
    mean, std, _, _, z = _truncation(mean, std, low, high)
    standard = (jnp.asarray(x, jnp.float32) - mean) / std
    per_dim = -_LOG_SQRT_2PI - jnp.log(z) - 0.5 * jnp.square(standard) - jnp.log(std)
    return jnp.sum(per_dim, axis=-1)


def truncated_normal_entropy(mean: jax.Array, std: jax.Array, low: float = -1.0, high: float = 1.0) -> jax.Array:
    """Closed-form entropy summed over the last axis (spec 6):

    ``log(sqrt(2 pi e) std Z) - (beta phi(beta) - alpha phi(alpha)) / (2 Z)``.
    """
    mean, std, alpha, beta, z = _truncation(mean, std, low, high)
    # An infinite bound contributes 0 (x phi(x) -> 0); guard the inf * 0 product.
    tail_beta = jnp.where(jnp.isfinite(beta), beta * _std_normal_pdf(beta), 0.0)
    tail_alpha = jnp.where(jnp.isfinite(alpha), alpha * _std_normal_pdf(alpha), 0.0)
    per_dim = _LOG_SQRT_2PI_E + jnp.log(std) + jnp.log(z) - 0.5 * (tail_beta - tail_alpha) / z
    return jnp.sum(per_dim, axis=-1)
