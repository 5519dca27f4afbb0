"""Data parallelism over a ``('data',)`` device mesh, written the way current JAX wants it.

The batch is sharded along the mesh axis, the train state is replicated, and the per-device step
runs under ``jax.shard_map`` with an explicit ``pmean`` of gradients, metrics and (inside the
BatchNorm layers) batch statistics. One device is a mesh of size one: the same code path.

Random numbers never depend on the device count: each example's samples come from a key folded
with its global batch index, so a 4-device step equals the 1-device step up to float summation
order.
"""

from __future__ import annotations

import dataclasses
import os
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from prelar_jax.errors import UserError

AXIS = "data"


def initialize_distributed() -> None:
    """Multi-host start-up: ``jax.distributed.initialize()`` when a cluster environment says so.

    JAX detects SLURM, Open MPI and Cloud TPU environments by itself; for anything else set
    ``JAX_COORDINATOR_ADDRESS``, ``JAX_NUM_PROCESSES`` and ``JAX_PROCESS_ID``.
    """
    if jax.distributed.is_initialized() if hasattr(jax.distributed, "is_initialized") else False:
        return
    if os.environ.get("JAX_COORDINATOR_ADDRESS") or os.environ.get("SLURM_NTASKS", "1") != "1":
        jax.distributed.initialize()


def make_mesh(devices: list | None = None) -> Mesh:
    devices = jax.devices() if devices is None else devices
    return Mesh(np.asarray(devices), (AXIS,))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P(AXIS))


class DeviceCountError(UserError, ValueError):
    """The batch does not split evenly over the devices."""


def check_batch_divides(batch_size: int, mesh: Mesh) -> None:
    count = mesh.devices.size
    if batch_size % count:
        raise DeviceCountError(
            f"batch_size={batch_size} does not divide evenly over {count} devices; choose a batch "
            f"size that is a multiple of {count} (e.g. --config.batch_size={count * max(1, batch_size // count)})"
            f" or run on fewer devices (CUDA_VISIBLE_DEVICES / XLA_FLAGS).")


def put_batch(batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """The global host batch to a global array sharded along the data axis.

    Every process samples the same global batch (it is a function of the seed and step); with
    several processes each one hands over only its own contiguous block of rows.
    """
    sharding = batch_sharding(mesh)
    count, index = jax.process_count(), jax.process_index()

    def local(value):
        value = np.asarray(value)
        if count == 1:
            return value
        rows = value.shape[0] // count
        return value[index * rows:(index + 1) * rows]

    return {k: jax.make_array_from_process_local_data(sharding, local(v)) for k, v in batch.items()}


def put_replicated(tree: Any, mesh: Mesh) -> Any:
    return jax.device_put(tree, replicated(mesh))


LossFn = Callable[..., tuple[jax.Array, tuple[Any, dict[str, jax.Array]]]]


def local_example_index(local: int) -> jax.Array:
    """``[local]`` global batch indices of this device's rows (inside ``shard_map``)."""
    return jax.lax.axis_index(AXIS) * local + jnp.arange(local)


def data_parallel(per_device: Callable, mesh: Mesh) -> Callable:
    """``step(state, batch) -> (state, metrics)`` jitted over the mesh: the state replicated and
    donated, the batch split along the data axis, ``per_device`` seeing the local shard.

    ``check_vma=False``: collectives are explicit (``pmean`` of gradients, metrics and BatchNorm
    statistics, ``all_gather`` where a loss pairs examples across devices), so gradients are
    per-device until averaged.
    """
    sharded = jax.shard_map(per_device, mesh=mesh, in_specs=(P(), P(AXIS)), out_specs=(P(), P()),
                            check_vma=False)
    return jax.jit(sharded, donate_argnums=0)


def all_finite(*trees: Any) -> jax.Array:
    """True when every floating-point leaf of every tree is finite (a scalar bool)."""
    leaves = [x for tree in trees for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.inexact)]
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves])) if leaves else jnp.bool_(True)


def select_finite(finite: jax.Array, new: Any, old: Any) -> Any:
    """``new`` where the update was finite, else ``old``, leaf by leaf: a non-finite loss or
    gradient skips the update instead of writing NaN into parameters or optimiser moments."""
    return jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)


def make_train_step(loss_fn: LossFn, optimizer: optax.GradientTransformation, mesh: Mesh,
                    seed: int) -> Callable:
    """``step(state, batch) -> (state, metrics)``: one jitted, donated, data-parallel update.

    An update whose loss or gradient is not finite is skipped (parameters, statistics and
    optimiser state stay as they were, the step counter advances past the batch) and reported as
    ``metrics['nonfinite'] == 1``.

    ``loss_fn(params, batch_stats, batch, key, example_index) -> (loss, (new_batch_stats,
    metrics))`` sees the local shard. The state must have ``step``, ``params``, ``batch_stats``
    and ``opt_state`` fields (a ``flax.struct`` dataclass).
    """
    base_key = jax.random.key(seed)

    def per_device(state, batch):
        example_index = local_example_index(batch["image"].shape[0])
        key = jax.random.fold_in(base_key, state.step)
        grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
        (loss, (batch_stats, metrics)), grads = grad_fn(state.params, state.batch_stats, batch, key,
                                                        example_index)
        grads = jax.lax.pmean(grads, AXIS)
        metrics = jax.lax.pmean(metrics, AXIS)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        # Modules without BatchNorm keep their (empty) statistics.
        batch_stats = {**state.batch_stats, **batch_stats}
        # The same decision on every device: gradients are averaged, the loss is averaged here.
        finite = all_finite(jax.lax.pmean(loss, AXIS), grads)
        params, batch_stats, opt_state = select_finite(
            finite, (params, batch_stats, opt_state), (state.params, state.batch_stats, state.opt_state))
        metrics = dict(metrics, grad_norm=optax.tree.norm(grads),
                       nonfinite=1.0 - finite.astype(jnp.float32))
        new_state = state.replace(step=state.step + 1, params=params, batch_stats=batch_stats,
                                  opt_state=opt_state)
        return new_state, metrics

    return data_parallel(per_device, mesh)


@dataclasses.dataclass
class CompiledInfo:
    seconds: float
    flops: float | None
    memory: dict[str, int]

    def describe(self) -> str:
        mem = ", ".join(f"{k} {v / 2**20:.1f} MiB" for k, v in self.memory.items())
        flops = f"{self.flops / 1e9:.2f} GFLOP/step" if self.flops else "FLOPs unavailable"
        return f"compiled in {self.seconds:.1f}s; {flops}; {mem}"


def compile_ahead(step: Callable, *args) -> tuple[Callable, CompiledInfo]:
    """Lower and compile ``step`` for ``args`` now, so shape errors and OOMs surface at start-up,
    and read the cost and memory analysis of the executable."""
    start = time.perf_counter()
    compiled = step.lower(*args).compile()
    seconds = time.perf_counter() - start
    flops = None
    try:
        cost = compiled.cost_analysis()
        if isinstance(cost, (list, tuple)):
            cost = cost[0] if cost else {}
        flops = float(cost.get("flops", 0.0)) or None
    except Exception:  # cost analysis is best-effort on some backends
        pass
    memory = {}
    try:
        analysis = compiled.memory_analysis()
        for name in ("argument_size_in_bytes", "output_size_in_bytes", "temp_size_in_bytes",
                     "generated_code_size_in_bytes"):
            value = getattr(analysis, name, None)
            if value is not None:
                memory[name.replace("_size_in_bytes", "")] = int(value)
    except Exception:
        pass
    return compiled, CompiledInfo(seconds, flops, memory)
