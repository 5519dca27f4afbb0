"""APV's video-based intrinsic bonus (spec §5.4), as pure functions over an explicit state.

The bonus rewards transitions whose (time-averaged, randomly projected) features are far from
what the agent has recently seen: a kNN particle-based novelty estimate against a FIFO queue of
past projections, normalized by a running magnitude (DreamerV2 ``StreamNorm``). Everything that
changes between updates (the queue, its write pointer and fill count, the running magnitude)
lives in :class:`IntrinsicState`, a pytree that is checkpointed with the agent. The random
projection is drawn once and never trained.

Faithful to the original (``agents/expl.py::VideoIntrBonus``, see spec §12.5):

- the projection std is ``1 / queue_dim`` (not ``1 / sqrt(queue_dim)``);
- the whole batch is pushed into the queue *before* the distances are computed, so every query
  finds itself (distance 0) among its neighbours;
- only filled queue slots count; while fewer than ``k`` are filled the reward is the mean over the
  ``min(k, count)`` available ones (the original does ``topk(k=min(k, len(queue[:filled])))``
  on a zero-initialised queue that it slices to the filled part);
- StreamNorm updates the magnitude first and then divides by the *updated* magnitude.

One deliberate difference: the original queue is a shift register that breaks when a batch holds
more vectors than the queue; here a batch larger than the capacity leaves its last ``capacity``
vectors in the queue, in order. The set of queue entries (all that the kNN sees) is otherwise the
same; only their storage order differs (a ring buffer instead of a shift).

Data parallel: with ``axis_name`` the function runs per device inside ``jax.shard_map`` on a local
slice of the batch. The projected vectors are ``all_gather``-ed (device order = global batch
order) and pushed on every device, so the replicated queue stays identical everywhere and equals
the one-device queue; distances are computed for the local queries only and the StreamNorm
statistic is ``pmean``-ed (shards are equal-sized). The gathered queue is not typed as
device-invariant, so the enclosing ``shard_map`` needs ``check_vma=False`` (as in
``prelar_jax.runtime.parallel``) to return the state with ``out_specs=P()``.
"""

from __future__ import annotations

from typing import Literal

import chex
import flax.struct
import jax
import jax.numpy as jnp

from prelar_jax.errors import UserError

_HIGHEST = jax.lax.Precision.HIGHEST


class IntrinsicConfigError(UserError, ValueError):
    """An intrinsic-bonus setting or input shape that cannot work."""


@flax.struct.dataclass
class IntrinsicState:
    """Everything the bonus carries between updates (replicated over devices, checkpointed)."""

    projection: jax.Array  # [D, Q] float32, fixed random projection
    queue: jax.Array  # [capacity, Q] float32, ring buffer of past projections
    pointer: jax.Array  # [] int32, next write index
    count: jax.Array  # [] int32, filled slots (<= capacity); the filled slots are [0, count)
    magnitude: jax.Array  # [] float32, StreamNorm running mean of |raw reward|

    @property
    def capacity(self) -> int:
        return self.queue.shape[0]


def init_intrinsic(
    key: jax.Array,
    feature_dim: int,
    queue_dim: int = 128,
    capacity: int = 4096,
    projection_std: Literal["faithful", "sqrt"] = "faithful",
) -> IntrinsicState:
    """A fresh state: random projection, empty queue, magnitude 1.

    ``projection_std='faithful'`` draws ``W_ij ~ N(0, (1/queue_dim)^2)`` as the original does;
    ``'sqrt'`` uses the usual Johnson-Lindenstrauss scale ``1/sqrt(queue_dim)``. Since the reward is
    normalized by its running magnitude, the scale mostly matters for the first updates (the
    magnitude starts at 1) and for float precision.
    """
    if feature_dim < 1 or queue_dim < 1 or capacity < 1:
        raise IntrinsicConfigError(
            f"feature_dim, queue_dim and capacity must be positive, got {feature_dim}, {queue_dim}, {capacity}"
        )
    if projection_std == "faithful":
        std = 1.0 / queue_dim
    elif projection_std == "sqrt":
        std = 1.0 / queue_dim**0.5
    else:
        raise IntrinsicConfigError(
            f"projection_std must be 'faithful' (1/queue_dim, as in APV) or 'sqrt' "
            f"(1/sqrt(queue_dim)), got {projection_std!r}"
        )
    projection = std * jax.random.normal(key, (feature_dim, queue_dim), jnp.float32)
    return IntrinsicState(
        projection=projection,
        queue=jnp.zeros((capacity, queue_dim), jnp.float32),
        pointer=jnp.zeros((), jnp.int32),
        count=jnp.zeros((), jnp.int32),
        magnitude=jnp.ones((), jnp.float32),
    )


def sliding_mean(features: jax.Array, window: int) -> jax.Array:
    """``out[:, t] = mean_{j < window} features[:, t + j]`` for ``t = 0 .. T - window``.

    A sum of ``window`` shifted slices (``window`` is small), which keeps float32 accuracy better
    than a cumulative sum over the whole sequence.
    """
    length = features.shape[1]
    steps = length - window + 1
    total = features[:, 0:steps]
    for offset in range(1, window):
        total = total + features[:, offset : offset + steps]
    return total / window  # [B, T - window + 1, D]


def push(state: IntrinsicState, vectors: jax.Array) -> IntrinsicState:
    """Appends ``vectors [N, Q]`` to the FIFO ring buffer, oldest entries overwritten first.

    With ``N > capacity`` only the last ``capacity`` vectors remain (older ones in the same batch
    would be overwritten anyway); writing just those keeps the scatter indices unique, so the
    result never depends on the order XLA applies duplicate writes in.
    """
    capacity = state.capacity
    total = vectors.shape[0]
    start = state.pointer
    if total > capacity:  # static shapes: a trace-time branch
        start = (start + (total - capacity)) % capacity
        vectors = vectors[total - capacity :]
    index = (start + jnp.arange(vectors.shape[0], dtype=jnp.int32)) % capacity  # [n]
    queue = state.queue.at[index].set(vectors.astype(state.queue.dtype), unique_indices=True)
    pointer = ((state.pointer + total) % capacity).astype(jnp.int32)
    count = jnp.minimum(state.count + total, capacity).astype(jnp.int32)
    return state.replace(queue=queue, pointer=pointer, count=count)


def knn_distances(queries: jax.Array, queue: jax.Array, count: jax.Array, k: int) -> jax.Array:
    """The ``min(k, capacity)`` smallest L2 distances from each query to the filled queue slots.

    ``queries [N, Q]``, ``queue [C, Q]`` whose filled slots are ``[0, count)``. Returns
    ``[N, min(k, C)]`` sorted ascending; entries beyond ``count`` are ``+inf``.

    Neighbours are chosen from ``|y|^2 + |q|^2 - 2 y.q`` (one matmul, unfilled slots masked with
    +inf), then the chosen distances are recomputed as ``|y - q|`` from the differences. That
    recomputation is cheap (``N * k * Q``) and avoids the cancellation error of the expanded form,
    so a query's distance to itself is exactly 0 and small distances keep their relative accuracy.
    """
    capacity = queue.shape[0]
    k = min(k, capacity)
    cross = jnp.matmul(queries, queue.T, precision=_HIGHEST)  # [N, C]
    squared = (
        jnp.sum(queries * queries, axis=-1)[:, None] + jnp.sum(queue * queue, axis=-1)[None, :] - 2.0 * cross
    )  # [N, C]
    filled = jnp.arange(capacity) < count  # [C]
    squared = jnp.where(filled[None, :], squared, jnp.inf)
    _, index = jax.lax.top_k(-squared, k)  # [N, k]
    difference = queries[:, None, :] - queue[index]  # [N, k, Q]
    distance = jnp.sqrt(jnp.sum(difference * difference, axis=-1))  # [N, k]
    distance = jnp.where(jnp.arange(k)[None, :] < count, distance, jnp.inf)
    return jnp.sort(distance, axis=-1)


def _check_inputs(state: IntrinsicState, features: jax.Array, window: int, k: int, momentum: float) -> None:
    if features.ndim != 3:
        raise IntrinsicConfigError(f"features must be [batch, time, feature_dim], got shape {features.shape}")
    if features.shape[-1] != state.projection.shape[0]:
        raise IntrinsicConfigError(
            f"features have dimension {features.shape[-1]} but the intrinsic state's projection "
            f"expects {state.projection.shape[0]} (init_intrinsic(feature_dim=...))"
        )
    if not 1 <= window <= features.shape[1]:
        raise IntrinsicConfigError(
            f"window (intr_seq_length) must be in [1, sequence length {features.shape[1]}], got {window}"
        )
    if k < 1:
        raise IntrinsicConfigError(f"k must be at least 1, got {k}")
    if not 0.0 <= momentum <= 1.0:
        raise IntrinsicConfigError(f"momentum must be in [0, 1], got {momentum}")


def intrinsic_reward(
    state: IntrinsicState,
    features: jax.Array,
    window: int = 5,
    k: int = 16,
    momentum: float = 0.99,
    eps: float = 1e-8,
    axis_name: str | None = None,
) -> tuple[jax.Array, IntrinsicState, dict[str, jax.Array]]:
    """The normalized bonus ``[B, T - window + 1]``, the updated state and metrics.

    ``features [B, T, D]`` (the local shard when ``axis_name`` is given) are the encoder
    embeddings (PreLAR) or action-free RSSM features (APV); no gradient flows back into them.
    ``window``, ``k``, ``momentum``, ``eps`` and ``axis_name`` are static. Metrics (identical on
    every device): ``intr_mean`` / ``intr_std`` of the raw reward, ``intr_normed_mean``,
    ``intr_mag`` (the updated magnitude) and ``intr_queue_fill`` (``count / capacity``).
    """
    _check_inputs(state, features, window, k, momentum)
    features = jax.lax.stop_gradient(features).astype(jnp.float32)  # [b, T, D]
    batch, steps = features.shape[0], features.shape[1] - window + 1

    smoothed = sliding_mean(features, window)  # [b, T', D]
    projected = jnp.matmul(smoothed, state.projection, precision=_HIGHEST)  # [b, T', Q]
    queries = projected.reshape(batch * steps, -1)  # [b*T', Q], batch-major like the original

    # Push first (the global batch, in global order), then query: each query sees itself.
    pushed = queries if axis_name is None else jax.lax.all_gather(queries, axis_name, axis=0, tiled=True)  # [B*T', Q]
    state = push(state, pushed)

    distance = knn_distances(queries, state.queue, state.count, k)  # [b*T', k']
    used = jnp.minimum(distance.shape[-1], state.count).astype(jnp.float32)
    valid = jnp.arange(distance.shape[-1])[None, :] < state.count
    raw = jnp.sum(jnp.where(valid, distance, 0.0), axis=-1) / used  # [b*T']

    def global_mean(value: jax.Array) -> jax.Array:
        value = jnp.mean(value)
        return value if axis_name is None else jax.lax.pmean(value, axis_name)

    # StreamNorm: update the magnitude with this batch, then divide by the updated magnitude.
    magnitude = momentum * state.magnitude + (1.0 - momentum) * global_mean(jnp.abs(raw))
    magnitude = magnitude.astype(jnp.float32)
    reward = raw / (magnitude + eps)  # [b*T']
    state = state.replace(magnitude=magnitude)

    raw_mean = global_mean(raw)
    metrics = {
        "intr_mean": raw_mean,
        "intr_std": jnp.sqrt(jnp.maximum(global_mean(raw * raw) - raw_mean**2, 0.0)),
        "intr_normed_mean": global_mean(reward),
        "intr_mag": magnitude,
        "intr_queue_fill": state.count.astype(jnp.float32) / state.capacity,
    }
    reward = reward.reshape(batch, steps)
    chex.assert_shape(reward, (batch, steps))
    return reward, state, metrics
