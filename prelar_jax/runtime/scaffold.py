"""What the pre-training and the fine-tuning loops share around their own work: the parameter
report, the compiled step and its batch spec, the checkpointer, the metrics logger with its first
line, metrics read one step late, schedule clocks, open-loop media and the summary file.

Each loop keeps only what is its own (pre-training: the video batches; fine-tuning: collecting,
training when due, evaluating when due) and calls these for the rest.
"""

from __future__ import annotations

import os
import time
from typing import Any, Callable, Mapping

import jax
import ml_collections
import numpy as np

from prelar_jax.runtime import checkpoint, logger as logger_lib, media, parallel, run_utils


def report_params(params: Mapping[str, Any]) -> dict[str, int]:
    """Prints the parameter count of every module and the total; returns the counts."""
    sizes = {name: run_utils.count_params(tree) for name, tree in params.items()}
    print(
        "[prelar] parameters: "
        + ", ".join(f"{k} {v / 1e6:.2f}M" for k, v in sizes.items())
        + f", total {sum(sizes.values()) / 1e6:.2f}M",
        flush=True,
    )
    return sizes


def batch_spec(mesh, shapes: Mapping[str, tuple[tuple[int, ...], Any]]) -> dict[str, jax.ShapeDtypeStruct]:
    """``{name: (shape, dtype)}`` -> shape structs sharded along the batch axis of ``mesh``."""
    sharding = parallel.batch_sharding(mesh)
    return {name: jax.ShapeDtypeStruct(shape, dtype, sharding=sharding) for name, (shape, dtype) in shapes.items()}


def compile_step(label: str, step_fn: Callable, *args) -> tuple[Callable, parallel.CompiledInfo]:
    """Compiles ``step_fn`` for ``args`` now (shape errors and OOMs surface at start-up) and
    prints its cost."""
    compiled, info = parallel.compile_ahead(step_fn, *args)
    print(f"[prelar] {label} {info.describe()}", flush=True)
    return compiled, info


def open_checkpointer(config: ml_collections.ConfigDict, workdir: str) -> checkpoint.Checkpointer:
    return checkpoint.Checkpointer(os.path.join(workdir, "checkpoints"), max_to_keep=config.log.keep_checkpoints)


def make_logger(
    config: ml_collections.ConfigDict,
    workdir: str,
    config_dict: dict,
    start_step: int,
    console_every: int,
    console_keys: tuple[str, ...],
) -> logger_lib.MetricsLogger:
    return logger_lib.MetricsLogger(
        workdir,
        total_steps=config.steps,
        start_step=start_step,
        wandb_mode=config.log.wandb_mode,
        wandb_project=config.log.wandb_project,
        run_name=os.path.basename(workdir),
        config=config_dict,
        console_every=console_every,
        console_keys=console_keys,
    )


def log_start(
    logger: logger_lib.MetricsLogger, info: parallel.CompiledInfo, sizes: Mapping[str, int], flops_key: str
) -> None:
    """The first metrics line of a fresh run: compile time, FLOPs of one step, parameter counts."""
    logger.log(
        0,
        {"compile_seconds": info.seconds, flops_key: info.flops or 0.0, **{f"params/{k}": v for k, v in sizes.items()}},
    )


class LateMetrics:
    """Metrics of a logged step, read one step late: ``hold`` starts their copy to the host
    without waiting; ``flush`` (after the next step was dispatched, before a checkpoint or
    another line of an earlier step) writes them. ``extra()`` adds figures computed at write time
    (rates)."""

    def __init__(self, logger: logger_lib.MetricsLogger, extra: Callable[[], dict] | None = None):
        self.logger, self.extra = logger, extra
        self.pending: tuple[int, dict] | None = None

    def hold(self, step: int, metrics: Mapping[str, jax.Array], **extra: Any) -> None:
        metrics = {k: run_utils.local_value(v) for k, v in metrics.items()}
        for value in metrics.values():
            value.copy_to_host_async()
        self.pending = (step, {**metrics, **extra})

    def flush(self) -> None:
        if self.pending is not None:
            step, metrics = self.pending
            self.pending = None
            self.logger.log(step, {**metrics, **(self.extra() if self.extra else {})})


class Rate:
    """Counts per second between successive reads (steps/s, updates/s, environment steps/s)."""

    def __init__(self, **counts: int):
        self.last_time, self.last = time.perf_counter(), dict(counts)

    def __call__(self, **counts: int) -> dict[str, float]:
        now = time.perf_counter()
        elapsed = max(now - self.last_time, 1e-9)
        rates = {name: (value - self.last[name]) / elapsed for name, value in counts.items()}
        self.last_time, self.last = now, dict(counts)
        return rates


def crossed(step: int, previous: int, every: int) -> bool:
    """Whether a schedule of period ``every`` fires between ``previous`` (excluded) and ``step``."""
    return step // every > previous // every


def save_open_loop(
    workdir: str, logger: logger_lib.MetricsLogger, step: int, images: np.ndarray, predicted: jax.Array
) -> None:
    """``media/open_loop_<step>.png``: true frames over predicted ones (every process computed
    ``predicted``; process 0 writes)."""
    predicted = np.asarray(run_utils.local_value(predicted))
    if jax.process_index() == 0:
        path = os.path.join(workdir, "media", f"open_loop_{step:08d}.png")
        media.save_png(path, media.prediction_grid(images, predicted))
        logger.log_media(step, "open_loop", path)


def write_summary(workdir: str, summary: dict[str, Any]) -> dict[str, Any]:
    """``summary.json`` (for tools such as the benchmark runner: did this run finish?) with the
    paths every run writes; returns the summary."""
    summary = {
        "workdir": workdir,
        **summary,
        "metrics": os.path.join(workdir, "metrics.jsonl"),
        "checkpoints": os.path.join(workdir, "checkpoints"),
        "media": os.path.join(workdir, "media"),
    }
    if jax.process_index() == 0:
        logger_lib.atomic_write_json(os.path.join(workdir, "summary.json"), summary)
    return summary
