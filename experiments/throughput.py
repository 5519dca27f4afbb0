"""The measured throughput suite: compile time, median step time, FLOP, FLOP/s and peak memory of
every compiled step of pre-training or fine-tuning, on 1, 2, 4, ... devices in one command.

    python experiments/throughput.py --config=configs/prelar_pretrain.py:paper --devices=1 --steps=5
    python experiments/throughput.py --config=configs/prelar_finetune.py:tiny --devices=1,2,4 --out=/tmp/t.json
    python experiments/throughput.py --config=configs/prelar_finetune.py:paper --config.model.remat=true \\
        --steps=2 --warmup=1 --env_workers=1,2,4

What each row measures and how (batches, compile time, FLOP, memory): README, "Performance".
"""

from __future__ import annotations

import functools
import json
import os
import platform
import resource
import statistics
import sys
from typing import Any, Callable

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _device_counts(text: str) -> list[int]:
    try:
        counts = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise SystemExit(f"error: --devices must be comma-separated integers, got {text!r}") from None
    if not counts or min(counts) < 1:
        raise SystemExit(f"error: --devices needs positive device counts, got {text!r}")
    return counts


def _kernels() -> tuple[str, str]:
    """(convolutions, allocator) this process measures with."""
    allocator = "tcmalloc" if "tcmalloc" in os.environ.get("LD_PRELOAD", "") else "system malloc"
    convolutions = f"onednn ({onednn.algorithm()})" if onednn.enabled() else "xla"
    return convolutions, allocator


def _early_device_flags(argv: list[str]) -> None:
    """Fake CPU devices must be requested before JAX is imported: ``max(--devices)`` of them."""
    for arg in argv:
        if arg.startswith("--devices="):
            count = max(_device_counts(arg.split("=", 1)[1]))
            flags = os.environ.get("XLA_FLAGS", "")
            if count > 1 and "xla_force_host_platform_device_count" not in flags:
                os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={count}".strip()


_early_device_flags(sys.argv)

import jax  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402
from ml_collections import config_flags  # noqa: E402

import env_throughput  # noqa: E402  (experiments/, this script's directory)
from prelar_jax.learners import finetune as agent_lib, pretrain  # noqa: E402
from prelar_jax.model.nets import onednn  # noqa: E402
from prelar_jax.runtime import parallel, steps  # noqa: E402
from prelar_jax.envs.rendering import RenderSettings  # noqa: E402
from prelar_jax.perf.throughput_report import (
    format_estimates,
    format_table,
    matmul_rate,  # noqa: E402
    protocol_estimate,
    random_batch,
    time_calls,
)

_CONFIG = config_flags.DEFINE_config_file("config", "configs/prelar_pretrain.py:tiny", "Config and preset.")
_DEVICES = flags.DEFINE_string("devices", "1", "Comma-separated device counts, e.g. 1,2,4 (fake CPU devices on CPU).")
_STEPS = flags.DEFINE_integer("steps", 10, "Measured calls per row.")
_WARMUP = flags.DEFINE_integer("warmup", 2, "Unmeasured calls after compilation (and after the first, checked call).")
_NUM_ENVS = flags.DEFINE_integer("num_envs", 0, "Environments of the policy step (0: config.env.num_envs).")
_ENV_WORKERS = flags.DEFINE_string("env_workers", "", "Comma-separated worker counts for env frames/s ('' = off).")
_ENV_STEPS = flags.DEFINE_integer("env_steps", 100, "Timed steps per environment worker.")
_COMPILE_CACHE = flags.DEFINE_bool(
    "compile_cache", False, "Use the persistent compilation cache (compile times become cache loads)."
)
_REFERENCE = flags.DEFINE_integer(
    "reference_matmul",
    0,
    "Side N of an N x N x N matmul in the config's compute dtype, timed on the first device "
    "as its reference FLOP rate; rows then show their share of it (0 = off; e.g. 8192 on a GPU).",
)
_OUT = flags.DEFINE_string("out", "", "Write the JSON record here.")


# ----------------------------------------------------------------------------------------------
# Timing and memory
# ----------------------------------------------------------------------------------------------


def runtime_peak_bytes(devices: list) -> int | None:
    """Largest ``peak_bytes_in_use`` over ``devices`` (a process high-water mark), or None when
    the backend keeps no statistics (CPU)."""
    peaks = []
    for device in devices:
        try:
            stats = device.memory_stats()
        except Exception:  # not implemented on some backends
            stats = None
        if stats and "peak_bytes_in_use" in stats:
            peaks.append(int(stats["peak_bytes_in_use"]))
    return max(peaks) if peaks else None


def host_max_rss_bytes() -> int:
    """The process's maximum resident set size so far (Linux reports KiB, macOS bytes)."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss) if sys.platform == "darwin" else int(rss) * 1024


def _floats(metrics: dict[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in metrics.items()}


def measure(
    name: str,
    devices: list,
    compiled_info: parallel.CompiledInfo,
    call: Callable[[], Any],
    first: Callable[[], dict[str, float] | None],
    per_device_batch: int | None,
) -> dict[str, Any]:
    """One row: ``first()`` (the checked first call, unmeasured), then the warm-up and timed
    calls of ``call``, with the compiled analysis and the memory high-water marks after it."""
    first_metrics = first()
    times = time_calls(call, _WARMUP.value, _STEPS.value)
    median = statistics.median(times)
    memory = compiled_info.memory
    compiled_peak = sum(memory.get(k, 0) for k in ("argument", "output", "temp")) or None
    return {
        "name": name,
        "devices": len(devices),
        "per_device_batch": per_device_batch,
        "compile_seconds": compiled_info.seconds,
        "step_seconds_median": median,
        "step_seconds_all": times,
        "flops_per_step": compiled_info.flops,  # one device's program (the shard's share)
        "flops_per_second": (compiled_info.flops / median) if compiled_info.flops else None,
        "memory_compiled": memory,
        "compiled_peak_bytes": compiled_peak,
        "runtime_peak_bytes": runtime_peak_bytes(devices),
        "host_max_rss_bytes": host_max_rss_bytes() if devices[0].platform == "cpu" else None,
        "first_metrics": first_metrics,
    }


# ----------------------------------------------------------------------------------------------
# The measured steps
# ----------------------------------------------------------------------------------------------


def pretrain_rows(config, devices: list, host_batch) -> list[dict[str, Any]]:
    mesh = parallel.make_mesh(devices)
    model = pretrain.PretrainModel(config, bn_axis_name=parallel.AXIS)
    optimizer = pretrain.make_optimizer(config)
    holder = {"state": parallel.put_replicated(model.init_state(jax.random.key(0), optimizer), mesh)}
    batch = parallel.put_batch(host_batch, mesh)
    compiled, info = parallel.compile_ahead(
        steps.make_pretrain_step(model.loss, optimizer, mesh, seed=0), holder["state"], batch
    )

    def call():
        holder["state"], metrics = compiled(holder["state"], batch)
        return holder["state"], metrics

    return [
        measure("pretrain_step", devices, info, call, lambda: _floats(call()[1]), config.batch_size // len(devices))
    ]


def make_imagination_step(agent: agent_lib.FinetuneAgent, mesh, seed: int) -> Callable:
    """``imagine(params, post) -> trajectory``: the actor-critic's rollout alone, forward only,
    from every posterior of ``post`` (``[B, T, ...]``, sharded like the batch), keyed as in an
    update; the time-major trajectory ``[H + 1, B * T, ...]`` stays sharded along its rows."""
    key = jax.random.fold_in(jax.random.key(seed), 0)

    def per_device(params, post):
        example_index = parallel.local_example_index(post["deter"].shape[0])
        start, keys = agent.imagination_start(post, key, example_index)
        return agent.imagine(params, start, keys)

    return jax.jit(
        jax.shard_map(
            per_device, mesh=mesh, in_specs=(P(), P(parallel.AXIS)), out_specs=P(None, parallel.AXIS), check_vma=False
        )
    )


def finetune_rows(config, devices: list, host_batch, num_envs: int) -> list[dict[str, Any]]:
    """The world-model half, the actor-critic half, the whole update, imagination and the
    policy step, each from the same fresh state (``init_state(key 0)``) and batch."""
    mesh = parallel.make_mesh(devices)
    local = config.batch_size // len(devices)
    agent = agent_lib.FinetuneAgent(config, bn_axis_name=parallel.AXIS)
    fresh = lambda: parallel.put_replicated(agent.init_state(jax.random.key(0)), mesh)  # noqa: E731
    batch = parallel.put_batch(host_batch, mesh)
    rows = []

    # World-model half; its first call's state and posteriors feed the actor-critic half, so
    # that (world model, then actor-critic) is exactly one update from the fresh state.
    wm = {"state": fresh()}
    wm_step, info = parallel.compile_ahead(
        steps.make_finetune_step(agent, mesh, 0, part="world_model"), wm["state"], batch
    )
    handoff = {}

    def wm_call():
        wm["state"], metrics, wm["post"] = wm_step(wm["state"], batch)
        return wm["state"], metrics, wm["post"]

    def wm_first():
        state, metrics, post = wm_step(wm["state"], batch)
        # Copies: the timed calls donate wm["state"].
        handoff["state"], handoff["post"] = jax.tree.map(lambda x: x.copy(), (state, post))
        wm["state"] = state
        return _floats(metrics)

    rows.append(measure("world_model", devices, info, wm_call, wm_first, local))
    post = handoff["post"]
    wm.clear()  # frees the world-model half's state before the next measurement

    ac = {"state": handoff.pop("state")}
    ac_step, info = parallel.compile_ahead(
        steps.make_finetune_step(agent, mesh, 0, part="actor_critic"), ac["state"], post
    )

    def ac_call():
        ac["state"], metrics = ac_step(ac["state"], post)
        return ac["state"], metrics

    rows.append(measure("actor_critic", devices, info, ac_call, lambda: _floats(ac_call()[1]), local))
    params = jax.tree.map(lambda x: x.copy(), ac["state"].params)  # the imagination's parameters
    ac.clear()

    full = {"state": fresh()}
    full_step, info = parallel.compile_ahead(steps.make_finetune_step(agent, mesh, 0), full["state"], batch)

    def full_call():
        full["state"], metrics = full_step(full["state"], batch)
        return full["state"], metrics

    rows.append(measure("update", devices, info, full_call, lambda: _floats(full_call()[1]), local))
    stats = full["state"].batch_stats
    full.clear()

    imagine, info = parallel.compile_ahead(make_imagination_step(agent, mesh, 0), params, post)
    rows.append(measure("imagination", devices, info, lambda: imagine(params, post), lambda: None, local))

    # The policy as the training loop calls it: replicated parameters, host frames in.
    rng = np.random.default_rng(1)
    image = rng.integers(0, 256, (num_envs, config.image_size, config.image_size, 3), dtype=np.uint8)
    is_first = np.zeros((num_envs,), bool)
    policy = jax.jit(functools.partial(agent.policy, explore=True))
    pol = {
        "carry": parallel.put_replicated(agent.initial_carry(num_envs), mesh),
        "key": parallel.put_replicated(jax.random.key(2), mesh),
    }
    policy_compiled, info = parallel.compile_ahead(policy, params, stats, pol["carry"], image, is_first, pol["key"])

    def policy_call():
        action, pol["carry"] = policy_compiled(params, stats, pol["carry"], image, is_first, pol["key"])
        return action

    row = measure("policy", devices, info, policy_call, lambda: None, None)
    row["num_envs"] = num_envs
    rows.append(row)
    return rows


# ----------------------------------------------------------------------------------------------
# Output
# ----------------------------------------------------------------------------------------------


def main(argv):
    del argv
    config = _CONFIG.value
    counts = _device_counts(_DEVICES.value)
    if not _COMPILE_CACHE.value:
        jax.config.update("jax_enable_compilation_cache", False)
    available = jax.devices()
    if max(counts) > len(available):
        raise app.UsageError(
            f"asked for {max(counts)} devices, found {len(available)} (on CPU, set "
            f"XLA_FLAGS=--xla_force_host_platform_device_count={max(counts)} or pass "
            f"--devices=... so this script requests them)"
        )
    for count in counts:
        parallel.check_batch_divides(config.batch_size, parallel.make_mesh(available[:count]))
    finetune = "actor_critic" in config
    num_envs = _NUM_ENVS.value or (config.env.num_envs if finetune else 0)
    host_batch = random_batch(config, finetune)
    kernels = _kernels()
    print(
        f"{'fine-tuning' if finetune else 'pre-training'} [{config.method}, {config.preset}] on "
        f"{available[0].platform} ({available[0].device_kind}); global batch {config.batch_size} x "
        f"{config.sequence_length} fixed at every device count (per device: batch / devices); "
        f"median of {_STEPS.value} calls after {_WARMUP.value} warm-up"
        + (f"; policy for {num_envs} environments" if finetune else "")
        + "; convolutions: {}; allocator: {}".format(*kernels),
        flush=True,
    )

    reference = None
    if _REFERENCE.value:
        reference = matmul_rate(_REFERENCE.value, config.model.compute_dtype, available[0])
        print(
            f"reference: {reference['side']}^3 {reference['dtype']} matmul on one device: "
            f"{reference['seconds'] * 1e3:.2f} ms, {reference['flops_per_second'] / 1e9:.1f} GFLOP/s",
            flush=True,
        )

    rows = []
    for count in counts:
        devices = available[:count]
        new = (
            finetune_rows(config, devices, host_batch, num_envs)
            if finetune
            else pretrain_rows(config, devices, host_batch)
        )
        for row in new:
            print(f"  {row['name']} on {count} device(s): {row['step_seconds_median'] * 1e3:.2f} ms", flush=True)
        rows.extend(new)
    print(format_table(rows, reference["flops_per_second"] if reference else None))
    print(
        "FLOP and compiled memory (argument + output + temp) are per device program; runtime peak "
        "and host RSS are process high-water marks."
    )

    env, estimates = None, []
    if _ENV_WORKERS.value:
        # The config's rendering settings (the paper preset renders with the paper's look).
        render = (
            RenderSettings.from_mapping(config.env.render, "config.env.render").describe()
            if finetune and "render" in config.env
            else "lean"
        )
        env = env_throughput.main(
            [
                "--workers",
                _ENV_WORKERS.value,
                "--steps",
                str(_ENV_STEPS.value),
                "--task",
                config.get("task", "drawer-open"),
                "--size",
                str(config.image_size),
                "--render",
                render,
            ]
        )
        if finetune:
            estimates = protocol_estimate(config, rows, env["results"])
            if estimates:
                print(
                    f"whole protocol ({config.steps} env steps) from the 1-device rows and the env frames/s, "
                    f"parts summed without overlap; pre-training, compilation and checkpoints left out:"
                )
                print(format_estimates(estimates))

    record = {
        "kind": "finetune" if finetune else "pretrain",
        "preset": config.preset,
        "method": config.method,
        "devices": counts,
        "global_batch_fixed": True,
        "batch": config.batch_size,
        "length": config.sequence_length,
        "num_envs": num_envs if finetune else None,
        "platform": available[0].platform,
        "device_kind": available[0].device_kind,
        "host": platform.node(),
        "cpu_count": os.cpu_count(),
        "jax": jax.__version__,
        "compute_dtype": config.model.compute_dtype,
        "steps": _STEPS.value,
        "warmup": _WARMUP.value,
        "compile_cache": _COMPILE_CACHE.value,
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "convolutions": kernels[0],
        "allocator": kernels[1],
        "command": " ".join(sys.argv),
        "rows": rows,
        "env": env,
        "reference_matmul": reference,
        "protocol_estimate": estimates,
    }
    if _OUT.value:
        os.makedirs(os.path.dirname(os.path.abspath(_OUT.value)), exist_ok=True)
        with open(_OUT.value, "w") as f:
            json.dump(record, f, indent=1)
        print(f"wrote {_OUT.value}")


if __name__ == "__main__":
    from prelar_jax.runtime import xla_setup

    xla_setup.use_fast_allocator()  # tcmalloc when installed, as the training scripts run
    app.run(main)
