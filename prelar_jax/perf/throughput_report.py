"""The throughput suite's timing and reporting helpers, without command-line flags.

`experiments/throughput.py` (the suite), `experiments/conv_rates.py` and `experiments/profile_step.py`
use them (timing, reports, the fixed random batch the steps are measured on); they live in the
package so that tests and other scripts can import them without defining the suite's absl flags.
"""

from __future__ import annotations

import statistics
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

MiB = 2**20


def time_calls(call: Callable[[], Any], warmup: int, steps: int) -> list[float]:
    """Seconds of each of ``steps`` synchronised calls after ``warmup`` unmeasured ones."""
    for _ in range(warmup):
        jax.block_until_ready(call())
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        jax.block_until_ready(call())
        times.append(time.perf_counter() - start)
    return times


def matmul_rate(side: int, dtype, device, warmup: int = 2, steps: int = 5) -> dict[str, Any]:
    """Median FLOP/s of ``a @ a`` for a ``side x side`` matrix of ``dtype`` on ``device``: the
    reference for "achieved FLOP/s against the device's measured matrix rate"."""
    a = jax.device_put(jax.random.normal(jax.random.key(0), (side, side)).astype(dtype), device)
    product = jax.jit(lambda a: a @ a)
    times = time_calls(lambda: product(a), warmup + 1, steps)  # +1: the compiling call
    seconds = statistics.median(times)
    return {
        "side": side,
        "dtype": jnp.dtype(dtype).name,
        "seconds": seconds,
        "flops_per_second": 2.0 * side**3 / seconds,
    }


def _mib(value: int | None) -> str:
    return "-" if value is None else f"{value / MiB:.0f}"


def format_table(rows: list[dict[str, Any]], reference_flops_per_second: float | None = None) -> str:
    """One line per row; with a reference rate, a column with each row's FLOP/s as a % of it."""
    share_header = f" {'% of ref':>8}" if reference_flops_per_second else ""
    header = (
        f"{'measurement':<14} {'devices':>7} {'compile s':>9} {'median ms':>10} {'GFLOP':>9} "
        f"{'GFLOP/s':>8}{share_header} {'compiled MiB':>12} "
        f"{'runtime peak MiB':>16} {'host RSS MiB':>12}"
    )
    lines = [header, "-" * len(header)]
    for r in rows:
        gflop = f"{r['flops_per_step'] / 1e9:.3f}" if r["flops_per_step"] else "-"
        rate = f"{r['flops_per_second'] / 1e9:.2f}" if r["flops_per_second"] else "-"
        share = ""
        if reference_flops_per_second:
            share = f"{100 * r['flops_per_second'] / reference_flops_per_second:.1f}" if r["flops_per_second"] else "-"
            share = f" {share:>8}"
        lines.append(
            f"{r['name']:<14} {r['devices']:>7} {r['compile_seconds']:>9.2f} "
            f"{r['step_seconds_median'] * 1e3:>10.2f} {gflop:>9} {rate:>8}{share} "
            f"{_mib(r['compiled_peak_bytes']):>12} {_mib(r['runtime_peak_bytes']):>16} "
            f"{_mib(r['host_max_rss_bytes']):>12}"
        )
    return "\n".join(lines)


def protocol_estimate(config, rows: list[dict[str, Any]], env_results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Wall time of the config's whole fine-tuning protocol from the measured parts, one estimate
    per measured worker count W (``env.num_envs = env.eval_envs = W``), on 1 device.

    Counts follow ``prelar_jax.runtime.finetune_loop``: ``pretrain + (steps - prefill) // train_every *
    train_steps`` updates; ``steps`` training frames; evaluations at ``prefill`` and every
    ``eval_every`` steps after it and at the last step, ``eval_eps`` episodes of ``env.time_limit``
    frames each; one policy call per ``W`` frames after the prefill (training) and in evaluation
    (the extra call at each episode's reset is left out: 1 in ``time_limit``). The parts are
    summed as if nothing overlapped (the loop dispatches updates asynchronously, so this is an
    upper bound on them), and pre-training, compilation, checkpoints and logging are left out.
    """
    times = {r["name"]: r["step_seconds_median"] for r in rows if r["devices"] == 1}
    if "update" not in times or "policy" not in times:
        return []
    learning_steps = max(config.steps - config.prefill, 0)
    updates = config.pretrain + learning_steps // config.train_every * config.train_steps
    evaluations = learning_steps // config.eval_every + 1 + (learning_steps % config.eval_every != 0)
    eval_frames = evaluations * config.eval_eps * config.env.time_limit
    estimates = []
    for result in env_results:
        workers, fps = result["workers"], result["fps"]
        policy_calls = -(-learning_steps // workers) + -(-eval_frames // workers)
        parts = {
            "updates": updates * times["update"],
            "train_frames": config.steps / fps,
            "eval_frames": eval_frames / fps,
            "policy": policy_calls * times["policy"],
        }
        estimates.append(
            {
                "workers": workers,
                "env_fps": fps,
                "updates": updates,
                "train_frames": config.steps,
                "eval_frames": eval_frames,
                "policy_calls": policy_calls,
                "seconds": parts,
                "total_seconds": sum(parts.values()),
            }
        )
    return estimates


def format_estimates(estimates: list[dict[str, Any]]) -> str:
    lines = [
        f"{'workers':>7} {'env fps':>8} {'updates min':>11} {'frames min':>10} {'policy min':>10} "
        f"{'total min':>9} {'total h':>7}"
    ]
    for e in estimates:
        s = e["seconds"]
        lines.append(
            f"{e['workers']:>7} {e['env_fps']:>8.1f} {s['updates'] / 60:>11.1f} "
            f"{(s['train_frames'] + s['eval_frames']) / 60:>10.1f} {s['policy'] / 60:>10.1f} "
            f"{e['total_seconds'] / 60:>9.1f} {e['total_seconds'] / 3600:>7.2f}"
        )
    return "\n".join(lines)


def random_batch(config, finetune: bool) -> dict[str, np.ndarray]:
    """A fixed random global batch: ``image`` ``[B, T, H, W, 3]`` uint8, ``is_first`` ``[B, T]``
    and, for fine-tuning, ``action`` ``[B, T, A]`` and ``reward`` ``[B, T]``."""
    rng = np.random.default_rng(0)
    shape = (config.batch_size, config.sequence_length, config.image_size, config.image_size, 3)
    is_first = np.zeros(shape[:2], bool)
    is_first[:, 0] = True
    batch = {"image": rng.integers(0, 256, shape, dtype=np.uint8), "is_first": is_first}
    if finetune:
        batch["action"] = rng.uniform(-1, 1, shape[:2] + (config.action_dim,)).astype(np.float32)
        batch["reward"] = rng.random(shape[:2]).astype(np.float32)
    return batch
