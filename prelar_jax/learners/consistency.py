"""PreLAR action-state consistency ("rank") loss, as pure JAX functions.

PreLAR asks the implicit-action encoder (VANet) to be rank-consistent with the world model: for
pairs i = (b, t), swapping in another sequence's implicit action should move the predicted next
state (d_s(i), a KL between priors, stop-gradient) more when the two implicit actions differ more
(d_a(i), a KL between VANet posteriors, differentiable). See spec sections 4.1 and 4.2.

The released code (``--rank_loss sign``) compares ``sgn`` of pairwise differences. Its gradient is
identically zero (``torch.sign`` has a zero derivative and d_s is detached), so the released
"PreLAR" trains exactly like "PreLAR w/o CL" (spec section 12, item 1). This module therefore keeps
that value as a metric-only variant and offers differentiable surrogates of the same intent, with
``'tanh'`` the default.

All variants take the pairs of the whole (global) batch: under data parallelism gather d_s and d_a
across devices first, since a ranking over one shard is a different loss. The N x N pairwise
matrices are cheap for N = B * (T - 1) = 384.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

VARIANTS = ("off", "sign", "tanh", "ranknet", "soft_spearman")

# Floor on the temperature so that all-equal action distances (tau = 0) do not divide by zero.
_TAU_EPS = 1e-8
# Floor on the Pearson denominator (product of the two sums of squares) for constant ranks.
_PEARSON_EPS = 1e-12


def _pairwise_diff(x: jax.Array) -> jax.Array:
    """``D[i, j] = x[i] - x[j]``."""  # [N] -> [N, N]
    return x[:, None] - x[None, :]


def _off_diagonal_mean(matrix: jax.Array) -> jax.Array:
    """Mean over i != j of an [N, N] matrix (0 when N < 2, where there are no such pairs)."""
    n = matrix.shape[0]
    off_diag = ~jnp.eye(n, dtype=bool)  # [N, N]
    return jnp.sum(jnp.where(off_diag, matrix, 0.0)) / max(n * (n - 1), 1)


def _temperature(delta_a: jax.Array, temperature_scale: float) -> jax.Array:
    """tau = c * sg(mean_{i != j} |delta_a|), floored at a tiny epsilon.

    Tying tau to the current spread of d_a makes every surrogate invariant to a global rescaling
    of d_a, so VANet cannot lower the loss by inflating action distances against its KL prior.
    """
    spread = jax.lax.stop_gradient(_off_diagonal_mean(jnp.abs(delta_a)))
    return jnp.maximum(temperature_scale * spread, _TAU_EPS)


def _sign_loss(delta_s: jax.Array, delta_a: jax.Array) -> jax.Array:
    """The released code's value: mean over ALL N x N pairs (diagonal included) of
    (sgn(ds_ij) - sgn(da_ij))^2, with an explicitly zero gradient."""
    delta_a = jax.lax.stop_gradient(delta_a)  # torch.sign's backward is zeros_like(grad)
    return jnp.mean(jnp.square(jnp.sign(delta_s) - jnp.sign(delta_a)))


def _tanh_loss(delta_s: jax.Array, delta_a: jax.Array, temperature_scale: float) -> jax.Array:
    """mean_{i != j} (sgn(ds_ij) - tanh(da_ij / tau))^2: the sign loss with sgn(da) smoothed."""
    tau = _temperature(delta_a, temperature_scale)
    return _off_diagonal_mean(jnp.square(jnp.sign(delta_s) - jnp.tanh(delta_a / tau)))


def _ranknet_loss(delta_s: jax.Array, delta_a: jax.Array, temperature_scale: float) -> jax.Array:
    """mean over pairs with ds_ij > 0 of softplus(-da_ij / tau); 0 when there is no such pair."""
    tau = _temperature(delta_a, temperature_scale)
    positive = delta_s > 0  # [N, N]; excludes i == j and ties
    count = jnp.sum(positive)
    total = jnp.sum(jnp.where(positive, jax.nn.softplus(-delta_a / tau), 0.0))
    return jnp.where(count > 0, total / jnp.maximum(count, 1), 0.0)


def _soft_spearman_loss(delta_s: jax.Array, delta_a: jax.Array, temperature_scale: float) -> jax.Array:
    """1 - Pearson(soft ranks of d_a, hard ranks of d_s)."""
    tau = _temperature(delta_a, temperature_scale)
    soft_rank_a = jnp.sum(jax.nn.sigmoid(delta_a / tau), axis=1)  # [N]
    # Hard average ranks of d_s (ties share the mean rank): the step-function limit of the above.
    hard_rank_s = jnp.sum(jnp.where(delta_s > 0, 1.0, 0.0) + jnp.where(delta_s == 0, 0.5, 0.0), axis=1)  # [N]
    centred_a = soft_rank_a - jnp.mean(soft_rank_a)
    centred_s = hard_rank_s - jnp.mean(hard_rank_s)
    denominator = jnp.sqrt(jnp.maximum(jnp.sum(centred_a**2) * jnp.sum(centred_s**2), _PEARSON_EPS))
    return 1.0 - jnp.sum(centred_a * centred_s) / denominator


def consistency_loss(
    state_distance: jax.Array, action_distance: jax.Array, variant: str = "tanh", temperature_scale: float = 0.2
) -> jax.Array:
    """Action-state consistency loss over N pairs; a float32 scalar.

    Args:
      state_distance: [N] d_s(i), KL(true-code prior || swapped-code prior). Always treated as
        stop-gradient (again, here), so the loss shapes only the action encoder.
      action_distance: [N] d_a(i), KL between the two implicit-action posteriors; differentiable.
      variant: one of ``VARIANTS`` (``variant`` and ``temperature_scale`` are static under jit):
        - ``'off'``: 0.0 with zero gradient ("PreLAR w/o CL").
        - ``'sign'``: the released code, mean over all N x N pairs (i = j included) of
          (sgn(ds_ij) - sgn(da_ij))^2, in [0, 4], about 2 when uncorrelated. Its gradient is exactly
          zero, as in the released code, so training with it equals 'off'. It exists only to log
          the original metric and to reproduce the released behaviour.
        - ``'tanh'`` (default): mean over i != j of (sgn(ds_ij) - tanh(da_ij / tau))^2, the
          closest differentiable surrogate of 'sign'; it recovers the i != j sign value as tau -> 0.
        - ``'ranknet'``: pairwise logistic loss, mean over pairs with ds_ij > 0 of
          softplus(-da_ij / tau); a standard learning-to-rank objective that only pushes
          mis-ordered or weakly ordered pairs.
        - ``'soft_spearman'``: 1 - Pearson(r_a, r_s) with soft ranks
          r_a(i) = sum_j sigmoid((d_a(i) - d_a(j)) / tau) and hard (tie-averaged) ranks r_s of d_s.
          This replaces the original dead ``sort_rank`` branch, which would have minimized
          max(rho, 0), i.e. pushed the correlation DOWN; here minimizing raises the correlation.
      temperature_scale: c in tau = c * sg(mean_{i != j} |d_a(i) - d_a(j)|). Tying tau to the spread
        of d_a makes 'tanh', 'ranknet' and 'soft_spearman' invariant to rescaling d_a.

    Returns:
      A float32 scalar, computed in float32 whatever the input dtype.
    """
    if variant not in VARIANTS:
        raise ValueError(f"Unknown consistency variant {variant!r}; use one of {VARIANTS}.")
    state_distance = jax.lax.stop_gradient(jnp.asarray(state_distance, jnp.float32))  # [N]
    action_distance = jnp.asarray(action_distance, jnp.float32)  # [N]
    if state_distance.ndim != 1 or state_distance.shape != action_distance.shape:
        raise ValueError(
            "consistency_loss expects state_distance and action_distance as 1-D arrays of the same "
            f"length N (one entry per pair); got shapes {state_distance.shape} and "
            f"{action_distance.shape}. Flatten the [B, T-1] pairs first."
        )
    if isinstance(temperature_scale, (int, float)) and temperature_scale <= 0:
        raise ValueError(f"temperature_scale must be > 0; got {temperature_scale}.")

    if variant == "off":
        return jnp.zeros((), jnp.float32)
    delta_s = _pairwise_diff(state_distance)  # [N, N]
    delta_a = _pairwise_diff(action_distance)  # [N, N]
    if variant == "sign":
        return _sign_loss(delta_s, delta_a)
    if variant == "tanh":
        return _tanh_loss(delta_s, delta_a, temperature_scale)
    if variant == "ranknet":
        return _ranknet_loss(delta_s, delta_a, temperature_scale)
    return _soft_spearman_loss(delta_s, delta_a, temperature_scale)
