"""The APV intrinsic bonus against an independent float64 numpy reference (spec §5.4)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from prelar_jax.learners.intrinsic import IntrinsicConfigError, init_intrinsic, intrinsic_reward, knn_distances, push


class ReferenceBonus:
    """Brute-force float64 version of the same algorithm, with a plain list as the FIFO queue."""

    def __init__(self, projection: np.ndarray, capacity: int, window: int, k: int, momentum: float, eps: float):
        self.projection = np.asarray(projection, np.float64)
        self.capacity, self.window, self.k = capacity, window, k
        self.momentum, self.eps = momentum, eps
        self.entries: list[np.ndarray] = []  # oldest first
        self.magnitude = 1.0

    def __call__(self, features: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        features = np.asarray(features, np.float64)
        batch, length, _ = features.shape
        steps = length - self.window + 1
        smoothed = np.stack([features[:, t : t + self.window].mean(axis=1) for t in range(steps)], axis=1)
        vectors = (smoothed @ self.projection).reshape(batch * steps, -1)
        self.entries = (self.entries + list(vectors))[-self.capacity :]
        queue = np.stack(self.entries)
        distances = np.sort(np.linalg.norm(vectors[:, None] - queue[None], axis=-1), axis=1)
        nearest = distances[:, : min(self.k, len(queue))]
        raw = nearest.mean(axis=1)
        self.magnitude = self.momentum * self.magnitude + (1 - self.momentum) * np.abs(raw).mean()
        reward = raw / (self.magnitude + self.eps)
        return reward.reshape(batch, steps), raw, nearest


def logical_queue(state) -> np.ndarray:
    """The ring buffer's entries oldest first."""
    queue, pointer, count = np.asarray(state.queue), int(state.pointer), int(state.count)
    if count < queue.shape[0]:
        return queue[:count]
    return np.concatenate([queue[pointer:], queue[:pointer]])


def test_matches_reference_over_calls_with_partial_fill_wrap_and_overflow():
    feature_dim, queue_dim, capacity, window, k, length = 12, 6, 40, 3, 6, 5
    momentum, eps = 0.9, 1e-8
    state = init_intrinsic(jax.random.key(0), feature_dim, queue_dim, capacity)
    reference = ReferenceBonus(np.asarray(state.projection), capacity, window, k, momentum, eps)
    step = jax.jit(functools.partial(intrinsic_reward, window=window, k=k, momentum=momentum, eps=eps))
    rng = np.random.default_rng(1)
    # 3 vectors per row. Fill: 3 (< k), 9, 21, 40 (wraps: 21 + 24 > 40), 40 (a batch of 48 >
    # capacity keeps its last 40), 40 (pointer no longer 0).
    for batch in [1, 2, 4, 8, 16, 4]:
        features = rng.normal(size=(batch, length, feature_dim)).astype(np.float32)
        reward, state, metrics = step(state, jnp.asarray(features))
        expected, raw, _ = reference(features)
        assert reward.shape == (batch, length - window + 1) and reward.dtype == jnp.float32
        np.testing.assert_allclose(np.asarray(reward), expected, rtol=2e-5, atol=1e-6)
        np.testing.assert_allclose(logical_queue(state), np.stack(reference.entries), rtol=2e-5, atol=1e-6)
        assert int(state.count) == len(reference.entries)
        np.testing.assert_allclose(float(state.magnitude), reference.magnitude, rtol=2e-5)
        np.testing.assert_allclose(float(metrics["intr_mean"]), raw.mean(), rtol=2e-5)
        np.testing.assert_allclose(float(metrics["intr_std"]), raw.std(), rtol=1e-3)
        np.testing.assert_allclose(float(metrics["intr_mag"]), reference.magnitude, rtol=2e-5)
        np.testing.assert_allclose(float(metrics["intr_normed_mean"]), expected.mean(), rtol=2e-5)
        np.testing.assert_allclose(float(metrics["intr_queue_fill"]), len(reference.entries) / capacity)


def test_query_finds_itself_at_distance_zero():
    feature_dim, queue_dim, capacity = 10, 4, 32
    state = init_intrinsic(jax.random.key(2), feature_dim, queue_dim, capacity)
    features = jax.random.normal(jax.random.key(3), (3, 7, feature_dim))
    # k = 1: the nearest neighbour is the query itself, so the raw reward is exactly 0.
    step = jax.jit(functools.partial(intrinsic_reward, window=2, k=1))
    reward, _, metrics = step(state, features)
    assert float(jnp.max(jnp.abs(reward))) == 0.0 and float(metrics["intr_mean"]) == 0.0
    # With k > 1, the first of the sorted distances is the exact 0 and the rest are positive.
    vectors = jax.random.normal(jax.random.key(4), (12, queue_dim))
    pushed = jax.jit(push)(state, vectors)
    nearest = jax.jit(knn_distances, static_argnames="k")
    distances = np.asarray(nearest(vectors, pushed.queue, pushed.count, k=5))
    assert distances.shape == (12, 5)
    np.testing.assert_array_equal(distances[:, 0], 0.0)
    assert np.all(distances[:, 1:] > 0) and np.all(np.diff(distances, axis=1) >= 0)
    # Unfilled slots (zeros in the queue) are never neighbours: ask for more than are filled.
    distances = np.asarray(nearest(vectors[:3], pushed.queue, jnp.int32(3), k=5))
    assert np.all(np.isinf(distances[:, 3:])) and np.all(np.isfinite(distances[:, :3]))


def test_projection_statistics():
    feature_dim, queue_dim = 256, 64
    faithful = np.asarray(init_intrinsic(jax.random.key(5), feature_dim, queue_dim, 8).projection)
    assert faithful.shape == (feature_dim, queue_dim) and faithful.dtype == np.float32
    assert abs(faithful.std() / (1.0 / queue_dim) - 1.0) < 0.03
    assert abs(faithful.mean()) < 4 * (1.0 / queue_dim) / np.sqrt(faithful.size)
    scaled = np.asarray(init_intrinsic(jax.random.key(5), feature_dim, queue_dim, 8, projection_std="sqrt").projection)
    assert abs(scaled.std() / (1.0 / np.sqrt(queue_dim)) - 1.0) < 0.03
    state = init_intrinsic(jax.random.key(5), feature_dim, queue_dim, 8)
    assert int(state.count) == 0 and int(state.pointer) == 0 and float(state.magnitude) == 1.0
    with pytest.raises(IntrinsicConfigError, match="projection_std"):
        init_intrinsic(jax.random.key(5), feature_dim, queue_dim, 8, projection_std="unit")


def test_data_parallel_equals_one_device():
    devices = jax.devices()[:4]
    assert len(devices) == 4, "conftest sets 4 fake CPU devices"
    mesh = Mesh(np.array(devices), ("data",))
    feature_dim, queue_dim, capacity, window, k = 16, 8, 50, 2, 7
    kwargs = dict(window=window, k=k, momentum=0.9)
    single = jax.jit(functools.partial(intrinsic_reward, **kwargs))
    sharded = jax.jit(
        jax.shard_map(
            functools.partial(intrinsic_reward, axis_name="data", **kwargs),
            mesh=mesh,
            in_specs=(P(), P("data")),
            out_specs=(P("data"), P(), P()),
            check_vma=False,
        )
    )
    state_one = state_many = init_intrinsic(jax.random.key(6), feature_dim, queue_dim, capacity)
    rng = np.random.default_rng(7)
    for _ in range(3):  # 8 * 5 = 40 vectors a call: the queue wraps on the second call
        features = jnp.asarray(rng.normal(size=(8, 6, feature_dim)).astype(np.float32))
        reward_one, state_one, metrics_one = single(state_one, features)
        reward_many, state_many, metrics_many = sharded(state_many, features)
        np.testing.assert_allclose(np.asarray(reward_many), np.asarray(reward_one), rtol=1e-6, atol=1e-7)
        # The pushed vectors are the same rows of the same matmul, gathered: bitwise equal.
        np.testing.assert_array_equal(np.asarray(state_many.queue), np.asarray(state_one.queue))
        assert int(state_many.pointer) == int(state_one.pointer)
        assert int(state_many.count) == int(state_one.count)
        np.testing.assert_allclose(float(state_many.magnitude), float(state_one.magnitude), rtol=1e-6)
        for name, value in metrics_one.items():
            np.testing.assert_allclose(float(metrics_many[name]), float(value), rtol=1e-5, err_msg=name)
    assert int(state_one.count) == capacity and int(state_one.pointer) == 3 * 40 % capacity


def test_jit_and_no_gradient_into_features():
    state = init_intrinsic(jax.random.key(8), 10, 4, 16)
    features = jax.random.normal(jax.random.key(9), (2, 6, 10))

    def total(feats):
        return jnp.sum(intrinsic_reward(state, feats, window=3, k=4)[0])

    gradient = jax.jit(jax.grad(total))(features)
    assert gradient.shape == features.shape
    np.testing.assert_array_equal(np.asarray(gradient), 0.0)
    np.testing.assert_allclose(float(jax.jit(total)(features)), float(total(features)), rtol=1e-6)


def test_bad_inputs_raise_user_errors():
    state = init_intrinsic(jax.random.key(10), 10, 4, 16)
    with pytest.raises(IntrinsicConfigError, match="window"):
        intrinsic_reward(state, jnp.zeros((2, 4, 10)), window=5)
    with pytest.raises(IntrinsicConfigError, match="dimension 9"):
        intrinsic_reward(state, jnp.zeros((2, 6, 9)), window=5)
    with pytest.raises(IntrinsicConfigError, match=r"\[batch, time"):
        intrinsic_reward(state, jnp.zeros((6, 10)), window=5)
