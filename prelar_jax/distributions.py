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


def balanced_kl_loss(post_logits: jax.Array, prior_logits: jax.Array, balance: float = 0.8,
                     free: float = 0.0) -> tuple[jax.Array, jax.Array]:
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
