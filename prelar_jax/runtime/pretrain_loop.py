"""The pre-training run: data, compiled step, checkpoints, metrics and media in one loop.

``run(config, workdir)`` is what ``experiments/pretrain.py`` calls. Re-running it on the same
workdir resumes from the latest checkpoint: batches are a pure function of ``(seed, step)`` and
the training RNG of the step counter, so a resumed run continues exactly as an uninterrupted one.
With several processes each one loads only its own rows of every batch (``parallel.process_rows``);
together they are the one-process batch.
"""

from __future__ import annotations

import contextlib
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging as absl_logging

from prelar_jax.runtime import config as config_lib, parallel, run_utils, scaffold, steps
from prelar_jax.learners import pretrain
from prelar_jax.data import videos

# Keys that may change when a run is resumed (run length, logging, data loading performance).
RESUMABLE_KEYS = (
    "steps",
    "log",
    "nonfinite_limit",
    "data.prefetch_threads",
    "data.prefetch_buffer",
    "data.root",
    "data.video_list",
)


def run(
    config: ml_collections.ConfigDict, workdir: str, allow_config_override: bool = False, devices: list | None = None
) -> dict[str, Any]:
    """Pre-trains to ``config.steps`` updates in ``workdir``; returns a summary dict. The run
    owns ``workdir`` while it runs (``prelar_jax.runtime.workdir_lock``: a second run on it is refused)."""
    absl_logging.set_verbosity(absl_logging.WARNING)  # orbax logs every save at INFO
    config_lib.validate_pretrain_config(config)
    with contextlib.ExitStack() as owned:  # holds the workdir lock until the run returns
        return _run(config, workdir, allow_config_override, devices, owned)


def _run(
    config: ml_collections.ConfigDict,
    workdir: str,
    allow_config_override: bool,
    devices: list | None,
    owned: contextlib.ExitStack,
) -> dict[str, Any]:
    mesh, workdir, config_dict = run_utils.open_workdir(
        config, workdir, allow_config_override, RESUMABLE_KEYS, devices, owned, "pre-training"
    )

    dataset = videos.make_video_dataset(
        config.data.kind, config.data.root, config.data.video_list, frame_stride=config.data.frame_stride
    )
    dataset.sample(np.random.default_rng([config.seed, 2**31 - 1]), 1, config.sequence_length)
    print(
        f"[prelar] {config.method} pre-training, preset {config.preset}: "
        f"{mesh.devices.size} x {jax.devices()[0].platform} device(s), jax {jax.__version__}; "
        f"data {config.data.kind} at {config.data.root}"
        + (f", frame stride {config.data.frame_stride}" if config.data.frame_stride > 1 else "")
        + f" ({dataset.file_counts()})",
        flush=True,
    )
    rows = parallel.process_rows(mesh, config.batch_size)  # all of them with one process
    if jax.process_count() > 1:
        shown = f"{rows.start}..{rows.stop - 1}" if isinstance(rows, range) else str(rows)
        print(
            f"[prelar] process {jax.process_index()} of {jax.process_count()} loads rows {shown} of each "
            f"batch of {config.batch_size}",
            flush=True,
        )

    model = pretrain.PretrainModel(config, bn_axis_name=parallel.AXIS)
    optimizer = pretrain.make_optimizer(config)
    state = parallel.put_replicated(model.init_state(jax.random.key(config.seed), optimizer), mesh)
    sizes = scaffold.report_params(state.params)
    ckpt = scaffold.open_checkpointer(config, workdir)
    if ckpt.latest_step() is not None:
        state, _ = ckpt.restore(state)
        print(f"[prelar] resumed from checkpoint at step {int(state.step)}", flush=True)
    start = int(state.step)

    B, T, size = config.batch_size, config.sequence_length, config.image_size
    spec = scaffold.batch_spec(mesh, {"image": ((B, T, size, size, 3), jnp.uint8), "is_first": ((B, T), jnp.bool_)})
    train_step, info = scaffold.compile_step(
        "train step", steps.make_pretrain_step(model.loss, optimizer, mesh, config.seed), state, spec
    )
    parallel.sync_processes("train step compiled")  # the first step's collectives need every process

    open_loop = jax.jit(model.open_loop, static_argnames="context")
    media_batch = dataset.sample(
        np.random.default_rng([config.seed, 2**31 - 2]), config.log.media_examples, config.sequence_length
    )

    logger = scaffold.make_logger(
        config,
        workdir,
        config_dict,
        start,
        console_every=config.log.every,
        console_keys=("loss", "image_loss", "kl", "consistency"),
    )
    if start == 0:
        scaffold.log_start(logger, info, sizes, "flops_per_step")

    def save_media(step: int) -> None:  # every process computes (the step is global), one writes
        predicted = open_loop(
            state.params, state.batch_stats, media_batch, jax.random.key(step), context=config.log.media_context
        )
        scaffold.save_open_loop(workdir, logger, step, media_batch["image"], predicted)

    late = scaffold.LateMetrics(logger)  # metrics of the last logged step, written one step late
    monitor = run_utils.NonFiniteMonitor(config.nonfinite_limit, logger, ckpt.directory, ckpt.latest_step)
    rate = scaffold.Rate(steps=start)
    step = start
    try:
        with (
            run_utils.StopRequest() as stop,
            videos.BatchPrefetcher(
                dataset,
                config.batch_size,
                config.sequence_length,
                seed=config.seed,
                start_step=start,
                num_steps=max(config.steps - start, 0),
                num_threads=config.data.prefetch_threads,
                buffer=config.data.prefetch_buffer,
                rows=rows,
            ) as batches,
        ):
            for index, batch in batches:
                state, metrics = train_step(state, parallel.put_local_batch(batch, mesh))
                previous, step = index, index + 1
                late.flush()
                monitor.observe(step, metrics["nonfinite"])  # the previous update's flag
                last = step == config.steps
                if scaffold.crossed(step, previous, config.log.every) or last:
                    per_second = rate(steps=step)["steps"]
                    late.hold(
                        step,
                        metrics,
                        **{
                            "perf/steps_per_second": per_second,
                            "perf/frames_per_second": per_second * config.batch_size * config.sequence_length,
                            # this process's count (of the bad files its own rows came across)
                            **{f"data/{k}": v for k, v in dataset.file_counts().items()},
                        },
                    )
                if scaffold.crossed(step, previous, config.log.media_every) or last:
                    save_media(step)
                if scaffold.crossed(step, previous, config.log.checkpoint_every) or last or stop.requested:
                    late.flush()  # never lose the metrics of a checkpointed step
                    ckpt.save(step, state, {"step": step, "method": config.method, "preset": config.preset})
                if stop.requested:
                    break
        late.flush()
        monitor.check()
    finally:
        ckpt.close()
        logger.close()
    finished = step >= config.steps
    summary = scaffold.write_summary(workdir, {"step": step, "finished": finished})
    print(
        f"[prelar] {'finished' if finished else 'stopped'} at step {step}/{config.steps}. "
        f"Results in {workdir}: metrics.jsonl, config.json, checkpoints/, media/",
        flush=True,
    )
    return summary
