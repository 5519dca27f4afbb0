"""A device-resident copy of the fine-tuning replay, sampled on the accelerator.

Why: the host replay (`prelar_jax.data.replay.Replay`) builds every [B, T, ...] batch in numpy
and copies it to the devices once per update (``parallel.put_batch``). On an accelerator that
copy and the host gather sit on the critical path of small, fast updates. Here the stored steps
live on the devices, each finished episode is copied there once, and batches are drawn by a
jitted function that never touches the host.

Storage. One ring of ``capacity`` steps per key (image uint8 [C, H, W, 3], action float32 [C, A],
reward float32 [C], flags bool [C]), replicated on every device of the mesh, plus an episode table
(start offset and length int32 [E], E = capacity // 2, the most episodes of >= 2 steps that fit).
Episodes are written one after another, wrapping around the end of the ring (step i of an episode
lives at ``(offset + i) % capacity``), so the ring holds exactly the newest episodes whose lengths
sum to at most ``capacity``: the host replay's eviction rule. An append is one jitted, donated
scatter (the episode padded to ``max_episode_length`` rows, padding rows dropped), so one compiled
append serves every episode length. Memory: ``capacity * bytes_per_step`` on *every* device (replicated: each
device samples its own rows locally, without communication); at 64x64 images that is ~12.3 kB per
step, 12.3 GB per device for the paper's 1e6 steps. ``replay.device_capacity`` sets a smaller ring
than the host replay's capacity (it then holds only the newest episodes, so the batch distribution
is the host's over a shorter history).

Sampling (the host replay's distribution, DreamerV2's rule, spec section 7): an episode uniformly
among the stored ones with at least ``length`` steps (shorter episodes are stored but never
sampled, as on the host); then, with ``prioritize_ends``, start = min(u, total - length) with u
uniform on {0, ..., total}, else uniform on the total - length + 1 windows; windows never cross an
episode's end and ``is_first[:, 0]`` is forced True. Each device draws its B / devices rows from its
own copy under ``shard_map`` with the key folded with its index, so the batch comes out sharded
along the data axis exactly like ``parallel.put_batch``'s. The random stream differs from the host
replay's (jax.random, not numpy): same distribution, other samples.

Bookkeeping (which episodes are held, where the next one goes) is mirrored on the host, so
appending and the "nothing long enough" check never wait for the device.
"""

from __future__ import annotations

import collections
import functools
from typing import Any, Callable, Mapping, NamedTuple, Sequence

import chex
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from prelar_jax.runtime import parallel
from prelar_jax.data.replay import SAMPLE_KEYS, ReplayError, ReplayTooSmallError

_DTYPES = {
    "image": np.uint8,
    "action": np.float32,
    "reward": np.float32,
    "is_first": np.bool_,
    "is_last": np.bool_,
    "is_terminal": np.bool_,
}


class DeviceReplayState(NamedTuple):
    """The device side: the step ring and the episode table (a pytree, replicated)."""

    data: dict[str, jax.Array]  # key -> [C, ...]
    ep_start: jax.Array  # int32 [E] ring offset of each slot's first step
    ep_len: jax.Array  # int32 [E] steps of each slot's episode; 0 = empty or evicted


def step_shapes(image_shape: Sequence[int], action_dim: int, keys: Sequence[str]) -> dict[str, tuple]:
    """Per-step shape of each stored key."""
    shapes = {"image": tuple(image_shape), "action": (int(action_dim),)}
    return {k: shapes.get(k, ()) for k in keys}


def bytes_per_step(image_shape: Sequence[int], action_dim: int, keys: Sequence[str] = SAMPLE_KEYS) -> int:
    """Device bytes one stored step costs (per device: the ring is replicated)."""
    return sum(
        int(np.prod(s, dtype=np.int64)) * np.dtype(_DTYPES[k]).itemsize
        for k, s in step_shapes(image_shape, action_dim, keys).items()
    )


def init_state(
    capacity: int, image_shape: Sequence[int], action_dim: int, keys: Sequence[str] = SAMPLE_KEYS
) -> DeviceReplayState:
    """An empty ring of ``capacity`` steps (host zeros; put it on the devices with the mesh)."""
    shapes = step_shapes(image_shape, action_dim, keys)
    slots = max(1, capacity // 2)
    return DeviceReplayState(
        data={k: jnp.zeros((capacity,) + shapes[k], _DTYPES[k]) for k in keys},
        ep_start=jnp.zeros((slots,), jnp.int32),
        ep_len=jnp.zeros((slots,), jnp.int32),
    )


def append(
    state: DeviceReplayState,
    episode: Mapping[str, jax.Array],
    length: jax.Array,
    offset: jax.Array,
    slot: jax.Array,
    oldest: jax.Array,
    evicted: jax.Array,
) -> DeviceReplayState:
    """Writes the first ``length`` rows of ``episode`` (each [Lmax, ...]) at ring rows
    ``(offset + i) % C`` into table slot ``slot``, after emptying the ``evicted`` slots that start
    at ``oldest`` (mod E). Pure; the caller (``DeviceReplay``) keeps these scalars consistent."""
    capacity = next(iter(state.data.values())).shape[0]
    slots = state.ep_start.shape[0]
    rows = jnp.arange(next(iter(episode.values())).shape[0])  # [Lmax]
    index = jnp.where(rows < length, (offset + rows) % capacity, capacity)  # padding -> dropped
    data = {k: v.at[index].set(episode[k].astype(v.dtype), mode="drop") for k, v in state.data.items()}
    gone = ((jnp.arange(slots) - oldest) % slots) < evicted  # [E]
    ep_len = jnp.where(gone, 0, state.ep_len).at[slot].set(length)
    ep_start = state.ep_start.at[slot].set(offset)
    return DeviceReplayState(data, ep_start, ep_len)


def sample_rows(
    state: DeviceReplayState, key: jax.Array, rows: int, length: int, prioritize_ends: bool
) -> dict[str, jax.Array]:
    """``rows`` windows of ``length`` steps ([rows, T, ...] per key), DreamerV2's distribution.

    Needs at least one stored episode of >= ``length`` steps (checked by the caller: with none,
    the rows are garbage, not an error, since a jitted function cannot raise)."""
    capacity = next(iter(state.data.values())).shape[0]
    k_episode, k_start = jax.random.split(key)
    eligible = (state.ep_len >= length).astype(jnp.int32)  # [E]
    cumulative = jnp.cumsum(eligible)  # [E]
    u = jax.random.randint(k_episode, (rows,), 0, jnp.maximum(cumulative[-1], 1))  # [R]
    slot = jnp.searchsorted(cumulative, u, side="right")  # [R] the (u+1)-th eligible slot
    total = state.ep_len[slot]  # [R]
    upper = total - length + 1 + (length if prioritize_ends else 0)  # [R] exclusive bounds
    start = jnp.minimum(jax.random.randint(k_start, (rows,), 0, upper), total - length)  # [R]
    position = (state.ep_start[slot] + start)[:, None] + jnp.arange(length)  # [R, T]
    batch = {k: v[position % capacity] for k, v in state.data.items()}
    if "is_first" in batch:
        batch["is_first"] = batch["is_first"].at[:, 0].set(True)
    return batch


def make_sampler(mesh: Mesh, batch_size: int, length: int, prioritize_ends: bool) -> Callable:
    """Jitted ``sample(state, key) -> batch``: [B, T, ...] arrays sharded over the data axis
    (``parallel.batch_sharding``); each device draws its own B / devices rows from its replica."""
    parallel.check_batch_divides(batch_size, mesh)
    local = batch_size // mesh.devices.size

    def per_device(state, key):
        key = jax.random.fold_in(key, jax.lax.axis_index(parallel.AXIS))
        return sample_rows(state, key, local, length, prioritize_ends)

    sharded = jax.shard_map(per_device, mesh=mesh, in_specs=(P(), P()), out_specs=P(parallel.AXIS), check_vma=False)
    return jax.jit(sharded, out_shardings=parallel.batch_sharding(mesh))


class DeviceReplay:
    """Complete episodes on the devices; ``add_episode`` as they finish, ``sample`` per update.

    Args:
      capacity: steps the ring holds (per device); the oldest episodes are overwritten.
      max_episode_length: the longest episode accepted (appends are padded to it: one compile).
      image_shape, action_dim: per-step sizes ([H, W, 3] uint8 and [A] float32).
      mesh: the data-parallel mesh; the ring is replicated on it, batches are sharded over it.
      prioritize_ends: DreamerV2's start rule (as ``Replay``).
      keys: the keys stored and sampled (the update reads image, action, reward, is_first).
    """

    def __init__(
        self,
        capacity: int,
        max_episode_length: int,
        image_shape: Sequence[int],
        action_dim: int,
        mesh: Mesh,
        prioritize_ends: bool = True,
        keys: Sequence[str] = SAMPLE_KEYS,
    ):
        unknown = [k for k in keys if k not in _DTYPES]
        if unknown:
            raise ReplayError(f"device replay keys {unknown} are not sample keys {list(_DTYPES)}")
        if int(capacity) < 2 or not 2 <= int(max_episode_length) <= int(capacity):
            raise ReplayError(
                f"device replay needs 2 <= max_episode_length ({max_episode_length}) <= capacity ({capacity}) steps"
            )
        self.capacity, self.max_episode_length = int(capacity), int(max_episode_length)
        self.mesh, self.prioritize_ends, self.keys = mesh, bool(prioritize_ends), tuple(keys)
        self.shapes = step_shapes(image_shape, action_dim, self.keys)
        self._slots = max(1, self.capacity // 2)
        replicated = parallel.replicated(mesh)
        self.state: DeviceReplayState = jax.jit(
            functools.partial(init_state, self.capacity, tuple(image_shape), int(action_dim), self.keys),
            out_shardings=replicated,
        )()
        self._append = jax.jit(append, donate_argnums=0, out_shardings=replicated)
        self._samplers: dict[tuple[int, int], Callable] = {}
        self._held: collections.deque[tuple[int, int]] = collections.deque()  # (slot, length), oldest first
        self._offset = 0  # ring row of the next episode's first step
        self._next_slot = 0
        self._num_steps = 0

    @property
    def num_episodes(self) -> int:
        return len(self._held)

    @property
    def num_steps(self) -> int:
        return self._num_steps

    def lengths(self) -> list[int]:
        """Lengths of the held episodes, oldest first."""
        return [n for _, n in self._held]

    def add_episode(self, episode: Mapping[str, Any]) -> None:
        """Copies one complete episode ([L, ...] arrays with at least ``keys``; extra keys ignored)
        to the devices in one transfer, overwriting the oldest episodes when the ring is full."""
        missing = [k for k in self.keys if k not in episode]
        if missing:
            raise ReplayError(f"device replay: episode is missing key(s) {missing}")
        length = len(episode[self.keys[0]])
        if not 2 <= length <= self.max_episode_length:
            raise ReplayError(
                f"device replay: an episode of {length} steps is outside [2, "
                f"max_episode_length={self.max_episode_length}]"
            )
        padded = {}
        for k in self.keys:
            value = np.asarray(episode[k])
            if value.shape != (length,) + self.shapes[k]:
                raise ReplayError(f"device replay: {k} has shape {value.shape}, expected {(length,) + self.shapes[k]}")
            if k == "image" and value.dtype != np.uint8:
                raise ReplayError(f"device replay: image must be uint8, got {value.dtype}")
            rows = np.zeros((self.max_episode_length,) + self.shapes[k], _DTYPES[k])  # [Lmax, ...]
            rows[:length] = value
            padded[k] = rows
        evicted, oldest = 0, self._held[0][0] if self._held else 0
        while self._num_steps + length > self.capacity:
            _, gone = self._held.popleft()
            self._num_steps -= gone
            evicted += 1
        scalars = [np.int32(x) for x in (length, self._offset, self._next_slot, oldest, evicted)]
        self.state = self._append(self.state, padded, *scalars)
        self._held.append((self._next_slot, length))
        self._num_steps += length
        self._offset = (self._offset + length) % self.capacity
        self._next_slot = (self._next_slot + 1) % self._slots

    def sample(self, key: jax.Array, batch_size: int, length: int) -> dict[str, jax.Array]:
        """[B, T, ...] arrays of ``keys`` on the devices, sharded over the data axis; raises
        ``ReplayTooSmallError`` (before any device work) when no held episode has ``length`` steps."""
        if batch_size < 1 or length < 1:
            raise ValueError(f"batch_size and length must be positive, got {batch_size} and {length}")
        if not any(n >= length for _, n in self._held):
            counts = collections.Counter(self.lengths())
            shown = ", ".join(f"{c} x {n}" for n, c in sorted(counts.items())) or "none"
            raise ReplayTooSmallError(
                f"cannot sample sequences of length {length}: the device replay holds {len(self._held)} "
                f"episode(s) (count x steps: {shown}) and none has at least {length} steps. Collect more "
                "data first (prefill) or use a shorter sequence length."
            )
        sampler = self._samplers.get((batch_size, length))
        if sampler is None:
            sampler = make_sampler(self.mesh, batch_size, length, self.prioritize_ends)
            self._samplers[(batch_size, length)] = sampler
        batch = sampler(self.state, key)
        chex.assert_shape(batch[self.keys[0]], (batch_size, length) + self.shapes[self.keys[0]])
        return batch
