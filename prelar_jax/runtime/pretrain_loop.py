"""The pre-training run: data, compiled step, checkpoints, metrics and media in one loop.

``run(config, workdir)`` is what ``experiments/pretrain.py`` calls. Re-running it on the same
workdir resumes from the latest checkpoint: batches are a pure function of ``(seed, step)`` and
the training RNG of the step counter, so a resumed run continues exactly as an uninterrupted one.
With several processes each one loads only its own rows of every batch (``parallel.process_rows``);
together they are the one-process batch.
"""

from __future__ import annotations

import contextlib
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging as absl_logging

from prelar_jax.runtime import checkpoint, config as config_lib, logger as logger_lib, media, parallel, run_utils, steps
from prelar_jax.learners import pretrain
from prelar_jax.data import videos

# Keys that may change when a run is resumed (run length, logging, data loading performance).
RESUMABLE_KEYS = ("steps", "log", "nonfinite_limit", "data.prefetch_threads", "data.prefetch_buffer", "data.root",
                  "data.video_list")


def run(config: ml_collections.ConfigDict, workdir: str, allow_config_override: bool = False,
        devices: list | None = None) -> dict[str, Any]:
    """Pre-trains to ``config.steps`` updates in ``workdir``; returns a summary dict. The run
    owns ``workdir`` while it runs (``prelar_jax.runtime.workdir_lock``: a second run on it is refused)."""
    absl_logging.set_verbosity(absl_logging.WARNING)  # orbax logs every save at INFO
    config_lib.validate_pretrain_config(config)
    with contextlib.ExitStack() as owned:  # holds the workdir lock until the run returns
        return _run(config, workdir, allow_config_override, devices, owned)


def _run(config: ml_collections.ConfigDict, workdir: str, allow_config_override: bool,
         devices: list | None, owned: contextlib.ExitStack) -> dict[str, Any]:
    mesh, workdir, config_dict = run_utils.open_workdir(config, workdir, allow_config_override,
                                                        RESUMABLE_KEYS, devices, owned, "pre-training")

    dataset = videos.make_video_dataset(config.data.kind, config.data.root, config.data.video_list,
                                        frame_stride=config.data.frame_stride)
    dataset.sample(np.random.default_rng([config.seed, 2**31 - 1]), 1, config.sequence_length)
    print(f"[prelar] {config.method} pre-training, preset {config.preset}: "
          f"{mesh.devices.size} x {jax.devices()[0].platform} device(s), jax {jax.__version__}; "
          f"data {config.data.kind} at {config.data.root}"
          + (f", frame stride {config.data.frame_stride}" if config.data.frame_stride > 1 else "")
          + f" ({dataset.stats()})", flush=True)
    rows = parallel.process_rows(mesh, config.batch_size)  # all of them with one process
    if jax.process_count() > 1:
        shown = f"{rows.start}..{rows.stop - 1}" if isinstance(rows, range) else str(rows)
        print(f"[prelar] process {jax.process_index()} of {jax.process_count()} loads rows {shown} of each "
              f"batch of {config.batch_size}", flush=True)

    model = pretrain.PretrainModel(config, bn_axis_name=parallel.AXIS)
    optimizer = pretrain.make_optimizer(config)
    state = model.init_state(jax.random.key(config.seed), optimizer)
    state = parallel.put_replicated(state, mesh)
    sizes = {k: run_utils.count_params(v) for k, v in state.params.items()}
    print("[prelar] parameters: " + ", ".join(f"{k} {v / 1e6:.2f}M" for k, v in sizes.items())
          + f", total {sum(sizes.values()) / 1e6:.2f}M", flush=True)

    ckpt = checkpoint.Checkpointer(os.path.join(workdir, "checkpoints"),
                                   max_to_keep=config.log.keep_checkpoints)
    if ckpt.latest_step() is not None:
        state, _ = ckpt.restore(state)
        print(f"[prelar] resumed from checkpoint at step {int(state.step)}", flush=True)
    start = int(state.step)

    batch_spec = {
        "image": jax.ShapeDtypeStruct((config.batch_size, config.sequence_length, config.image_size,
                                       config.image_size, 3), jnp.uint8,
                                      sharding=parallel.batch_sharding(mesh)),
        "is_first": jax.ShapeDtypeStruct((config.batch_size, config.sequence_length), jnp.bool_,
                                         sharding=parallel.batch_sharding(mesh)),
    }
    step_fn = steps.make_pretrain_step(model.loss, optimizer, mesh, config.seed)
    train_step, info = parallel.compile_ahead(step_fn, state, batch_spec)
    print(f"[prelar] train step {info.describe()}", flush=True)
    parallel.sync_processes("train step compiled")  # the first step's collectives need every process

    open_loop = jax.jit(model.open_loop, static_argnames="context")
    media_batch = dataset.sample(np.random.default_rng([config.seed, 2**31 - 2]),
                                 config.log.media_examples, config.sequence_length)

    logger = logger_lib.MetricsLogger(
        workdir, total_steps=config.steps, start_step=start, wandb_mode=config.log.wandb_mode,
        wandb_project=config.log.wandb_project, run_name=os.path.basename(workdir),
        config=config_dict, console_every=config.log.every,
        console_keys=("loss", "image_loss", "kl", "consistency"))
    if start == 0:
        logger.log(0, {"compile_seconds": info.seconds, "flops_per_step": info.flops or 0.0,
                       **{f"params/{k}": v for k, v in sizes.items()}})

    def save_media(step: int) -> None:  # every process computes (the step is global), one writes
        predicted = np.asarray(run_utils.local_value(open_loop(state.params, state.batch_stats, media_batch,
                                                jax.random.key(step), context=config.log.media_context)))
        if jax.process_index() == 0:
            path = os.path.join(workdir, "media", f"open_loop_{step:08d}.png")
            media.save_png(path, media.prediction_grid(media_batch["image"], predicted))
            logger.log_media(step, "open_loop", path)

    pending = None  # metrics of the last logged step, fetched asynchronously one step late

    def flush_metrics() -> None:
        nonlocal pending
        if pending is not None:
            logger.log(*pending)
            pending = None

    monitor = run_utils.NonFiniteMonitor(config.nonfinite_limit, logger, ckpt.directory, ckpt.latest_step)
    last_time, last_step = time.perf_counter(), start
    step = start
    try:
        with run_utils.StopRequest() as stop, videos.BatchPrefetcher(
                dataset, config.batch_size, config.sequence_length, seed=config.seed, start_step=start,
                num_steps=max(config.steps - start, 0), num_threads=config.data.prefetch_threads,
                buffer=config.data.prefetch_buffer, rows=rows) as batches:
            for index, batch in batches:
                state, metrics = train_step(state, parallel.put_local_batch(batch, mesh))
                step = index + 1
                flush_metrics()
                monitor.observe(step, metrics["nonfinite"])  # the previous update's flag
                if step % config.log.every == 0 or step == config.steps:
                    metrics = {k: run_utils.local_value(v) for k, v in metrics.items()}
                    for value in metrics.values():
                        value.copy_to_host_async()
                    now = time.perf_counter()
                    rate = (step - last_step) / max(now - last_time, 1e-9)
                    last_time, last_step = now, step
                    extra = {"perf/steps_per_second": rate,
                             "perf/frames_per_second": rate * config.batch_size * config.sequence_length,
                             # this process's count (of the bad files its own rows came across)
                             **{f"data/{k}": v for k, v in dataset.stats().items()}}
                    pending = (step, {**metrics, **extra})
                if step % config.log.media_every == 0 or step == config.steps:
                    save_media(step)
                if step % config.log.checkpoint_every == 0 or step == config.steps or stop.requested:
                    flush_metrics()  # never lose the metrics of a checkpointed step
                    ckpt.save(step, state, {"step": step, "method": config.method, "preset": config.preset})
                if stop.requested:
                    break
        flush_metrics()
        monitor.check()
    finally:
        ckpt.close()
        logger.close()
    finished = step >= config.steps
    summary = {"workdir": workdir, "step": step, "finished": finished,
               "checkpoints": os.path.join(workdir, "checkpoints"),
               "metrics": os.path.join(workdir, "metrics.jsonl"), "media": os.path.join(workdir, "media")}
    if jax.process_index() == 0:  # for tools (the benchmark runner): did this run finish?
        logger_lib.atomic_write_json(os.path.join(workdir, "summary.json"), summary)
    print(f"[prelar] {'finished' if finished else 'stopped'} at step {step}/{config.steps}. "
          f"Results in {workdir}: metrics.jsonl, config.json, checkpoints/, media/", flush=True)
    return summary
