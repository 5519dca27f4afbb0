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
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from prelar_jax.errors import UserError
from prelar_jax.model.nets import onednn

AXIS = "data"


class DistributedSetupError(UserError, ValueError):
    """The multi-host environment variables are incomplete or inconsistent."""


@dataclasses.dataclass(frozen=True)
class DistributedSettings:
    """What ``jax.distributed.initialize`` is called with. ``None`` fields are left to JAX's own
    cluster detection (SLURM fills them from ``SLURM_*``)."""

    coordinator_address: str | None
    num_processes: int
    process_id: int | None
    cluster_detection_method: str | None  # 'slurm' or None (everything given explicitly)


# The variables JAX's SLURM detection (jax/_src/clusters/slurm_cluster.py) needs; srun sets them
# for every task of a job step, an sbatch script outside srun lacks the step ones.
_SLURM_VARS = ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID", "SLURM_LOCALID")
_EXPLICIT_VARS = ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID")


def _int_var(environ: Mapping[str, str], name: str) -> int | None:
    text = environ.get(name, "").strip()
    if not text:
        return None
    try:
        return int(text)
    except ValueError:
        raise DistributedSetupError(f"{name}={text!r} is not an integer.") from None


def distributed_settings(environ: Mapping[str, str] | None = None) -> DistributedSettings | None:
    """The multi-host settings the environment asks for, or None for a single-process run.

    Two ways to start several processes (see the README's Multi-host section):

    - explicitly, any launcher: ``JAX_COORDINATOR_ADDRESS=host:port``, ``JAX_NUM_PROCESSES`` and
      ``JAX_PROCESS_ID`` in every process. jax 0.10 reads only the first of these itself, so they
      are read here and passed on.
    - ``srun`` under SLURM with more than one task: JAX's SLURM detection derives all three (the
      coordinator is the first node of the step, the port comes from the job id unless
      ``JAX_COORDINATOR_PORT`` is set). Explicit variables, where set, win over it.

    ``JAX_NUM_PROCESSES=1`` (or one SLURM task) is a single-process run. Pure: reads ``environ``
    (default ``os.environ``), starts nothing.
    """
    environ = os.environ if environ is None else environ
    address = environ.get("JAX_COORDINATOR_ADDRESS", "").strip() or None
    count = _int_var(environ, "JAX_NUM_PROCESSES")
    index = _int_var(environ, "JAX_PROCESS_ID")
    slurm = all(name in environ for name in _SLURM_VARS) and (_int_var(environ, "SLURM_NTASKS") or 1) > 1
    if slurm:
        count = count if count is not None else _int_var(environ, "SLURM_NTASKS")
    explicit = {"JAX_COORDINATOR_ADDRESS": address, "JAX_NUM_PROCESSES": count, "JAX_PROCESS_ID": index}
    if not slurm and any(v is not None for v in explicit.values()):
        missing = [name for name, value in explicit.items() if value is None]
        if missing:
            raise DistributedSetupError(
                f"multi-host start-up needs all of {', '.join(_EXPLICIT_VARS)} in every process; "
                f"{', '.join(missing)} {'is' if len(missing) == 1 else 'are'} not set. Set them (the same "
                "coordinator address and process count everywhere, process ids 0..count-1), or unset "
                "them all for a single-process run."
            )
    if count is None or count == 1:
        return None
    if count < 1 or (index is not None and not 0 <= index < count):
        raise DistributedSetupError(
            f"JAX_NUM_PROCESSES={count} and JAX_PROCESS_ID={index}: the count must be positive and the "
            f"id between 0 and {count - 1}."
        )
    if address is not None and ":" not in address:
        raise DistributedSetupError(
            f"JAX_COORDINATOR_ADDRESS={address!r} must be host:port (process 0 listens on that port)."
        )
    return DistributedSettings(address, count, index, "slurm" if slurm else None)


def initialize_distributed(environ: Mapping[str, str] | None = None) -> DistributedSettings | None:
    """Multi-host start-up: ``jax.distributed.initialize`` with ``distributed_settings(environ)``,
    before any JAX computation; nothing for a single-process run or when already initialised.

    Cross-process collectives on CPU need an implementation (gloo, the default in jax 0.10); one
    that was turned off is turned back to gloo, since a multi-process CPU step cannot run without
    it. It only affects the CPU backend, which has not started yet.
    """
    settings = distributed_settings(environ)
    if settings is None or jax.distributed.is_initialized():
        return settings
    if jax.config.jax_cpu_collectives_implementation is None:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
        coordinator_address=settings.coordinator_address,
        num_processes=settings.num_processes,
        process_id=settings.process_id,
        cluster_detection_method=settings.cluster_detection_method,
    )
    return settings


class MultiProcessNotSupportedError(UserError, RuntimeError):
    """A multi-host environment started a program that runs in one process only."""


def require_single_process(what: str, environ: Mapping[str, str] | None = None) -> None:
    """Raises ``MultiProcessNotSupportedError`` when the environment asks for several processes,
    before anything connects to a coordinator (which would otherwise wait for its peers)."""
    settings = distributed_settings(environ)
    if settings is not None:
        raise MultiProcessNotSupportedError(
            f"{what} runs in one process only, but the environment asks for {settings.num_processes} "
            "processes (JAX_NUM_PROCESSES / JAX_COORDINATOR_ADDRESS / SLURM_NTASKS). Start it once, "
            "e.g. `srun --ntasks=1` or without the JAX_* variables; it uses every device of its host."
        )


_barrier_count = 0


def sync_processes(name: str, timeout_s: float = 3600.0) -> None:
    """Returns when every process has called ``sync_processes(name)``; nothing for one process.

    Call it after compiling a step and before running it: on CPU, a cross-process collective's
    first run sets up gloo, which fails when the processes arrive more than 30 s apart, and
    compile times differ between processes (process 0 may find the step in the persistent
    compilation cache, whose keys on CPU differ per process, so the others compile it anew).
    The barrier goes through the JAX coordination service, which waits up to ``timeout_s``.
    """
    global _barrier_count
    if jax.process_count() == 1:
        return
    from jax._src import distributed  # the client jax.distributed.initialize started

    _barrier_count += 1  # every process calls the same barriers in the same order
    distributed.global_state.client.wait_at_barrier(
        f"prelar/{_barrier_count}/{name}", timeout_in_ms=int(timeout_s * 1000)
    )


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
            f" or run on fewer devices (CUDA_VISIBLE_DEVICES / XLA_FLAGS)."
        )


def process_rows(mesh: Mesh, batch_size: int) -> range | list[int]:
    """The rows of a ``batch_size`` global batch that this process's devices hold, ascending.

    With one process, all of them; with several, process i's contiguous block
    ``range(i * B / P, (i + 1) * B / P)`` on a mesh in ``jax.devices()`` order (a list of rows if a
    mesh interleaves the processes' devices). A process loads just these rows and hands them to
    ``put_local_batch``.
    """
    index_map = batch_sharding(mesh).addressable_devices_indices_map((batch_size,))
    rows = sorted({r for index in index_map.values() for r in range(batch_size)[index[0]]})
    if rows == list(range(rows[0], rows[-1] + 1)):
        return range(rows[0], rows[-1] + 1)
    return rows


def put_local_batch(batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """This process's rows of the global batch (``process_rows``, in that order) to a global array
    sharded along the data axis; with one process the whole batch."""
    sharding = batch_sharding(mesh)
    return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v)) for k, v in batch.items()}


def put_batch(batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """The global host batch to a global array sharded along the data axis.

    For callers where every process has the whole global batch (it is a function of the seed and
    step): with several processes each one hands over only its own rows (``process_rows``).
    Pre-training loads just those rows instead and calls ``put_local_batch``.
    """
    if jax.process_count() == 1 or not batch:
        return put_local_batch(batch, mesh)
    batch = {k: np.asarray(v) for k, v in batch.items()}
    rows = process_rows(mesh, next(iter(batch.values())).shape[0])
    take = slice(rows.start, rows.stop) if isinstance(rows, range) else rows
    return put_local_batch({k: v[take] for k, v in batch.items()}, mesh)


def put_replicated(tree: Any, mesh: Mesh) -> Any:
    """``tree`` replicated on every device of the mesh.

    Every process must pass the same values (e.g. the train state initialised from the same seed).
    With several processes each one builds its own replicas from its host copy: ``device_put``
    would check that the processes agree with one cross-process all-gather per leaf, which costs a
    compiled program and a collective for every parameter array at start-up.
    """
    sharding = replicated(mesh)
    if jax.process_count() == 1:
        return jax.device_put(tree, sharding)

    def put(leaf):
        host = np.asarray(jax.device_get(leaf))
        return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])

    return jax.tree.map(put, tree)


def local_example_index(local: int) -> jax.Array:
    """``[local]`` global batch indices of this device's rows (inside ``shard_map``)."""
    return jax.lax.axis_index(AXIS) * local + jnp.arange(local)


def data_parallel(per_device: Callable, mesh: Mesh, out_specs: tuple = (P(), P())) -> Callable:
    """``step(state, batch) -> (state, metrics)`` jitted over the mesh: the state replicated and
    donated, the batch split along the data axis, ``per_device`` seeing the local shard.
    ``out_specs`` for steps that return more (e.g. ``P(AXIS)`` for per-example outputs).

    ``check_vma=False``: collectives are explicit (``pmean`` of gradients, metrics and BatchNorm
    statistics, ``all_gather`` where a loss pairs examples across devices), so gradients are
    per-device until averaged.
    """
    sharded = jax.shard_map(per_device, mesh=mesh, in_specs=(P(), P(AXIS)), out_specs=out_specs, check_vma=False)
    return jax.jit(sharded, donate_argnums=0)


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
        # oneDNN convolutions are custom calls, invisible to the cost analysis: counted from the HLO.
        flops = float(cost.get("flops", 0.0))
        if onednn.enabled():  # only then are there custom calls to count (the HLO text is long)
            flops += onednn.flops_in_hlo(compiled.as_text())
        flops = flops or None
    except Exception:  # cost analysis is best-effort on some backends
        pass
    memory = {}
    try:
        analysis = compiled.memory_analysis()
        for name in (
            "argument_size_in_bytes",
            "output_size_in_bytes",
            "temp_size_in_bytes",
            "generated_code_size_in_bytes",
        ):
            value = getattr(analysis, name, None)
            if value is not None:
                memory[name.replace("_size_in_bytes", "")] = int(value)
    except Exception:
        pass
    return compiled, CompiledInfo(seconds, flops, memory)
