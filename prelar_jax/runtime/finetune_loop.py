"""The fine-tuning run (spec section 7): environments, replay, compiled updates, evaluation,
checkpoints, metrics and media in one host-side loop.

``run(config, workdir)`` is what ``experiments/finetune.py`` calls. The loop, in environment steps
(all workers together; prefill counts, as in the original):

1. ``prefill`` steps with uniform random actions;
2. once they are done, ``pretrain`` world-model + actor-critic updates on the prefill data;
3. then the policy acts (one jitted call for all workers per step) and ``train_steps`` updates
   run every ``train_every`` environment steps;
4. evaluation (``eval_eps`` episodes, policy mode = the actor's mean) at ``prefill``, then every
   ``eval_every`` steps, and at the end;
5. checkpoints every ``log.checkpoint_every`` steps, at the end, and on SIGTERM/SIGINT.

Re-running on the same workdir resumes: the agent state (parameters, optimisers, BatchNorm
statistics, intrinsic-bonus queue and normaliser), the counters and the replay (the episodes the
checkpoint names, read back from ``<workdir>/replay``) are restored. Episodes that were still
running when the checkpoint was written are lost; the environments start new ones.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import time
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import logging as absl_logging

from prelar_jax.learners import finetune as agent_lib
from prelar_jax.runtime import pretrained as pretrained_lib
from prelar_jax.runtime import config as config_lib, media, parallel, run_utils, scaffold, steps
from prelar_jax.runtime.device_replay import DeviceReplay, bytes_per_step
from prelar_jax.data.replay import Replay
from prelar_jax.envs.metaworld import canonical_task_name, check_rendering_backend
from prelar_jax.envs.rendering import RenderSettings
from prelar_jax.envs.workers import ParallelEnvs, make_metaworld_env

# Keys that may change when a run is resumed (run length, logging, worker time-outs).
RESUMABLE_KEYS = (
    "steps",
    "log",
    "env.step_timeout",
    "env.eval_envs",
    "pretrained",
    "nonfinite_limit",
    "replay.on_device",
    "replay.device_capacity",
)


# What an update reads of a replay batch (host or device replay).
UPDATE_KEYS = ("image", "action", "reward", "is_first")


def _seeds(*parts: int, count: int) -> list[int]:
    """``count`` worker seeds from a SeedSequence over ``parts`` (run seed, role, resume point)."""
    return [int(s % (2**31)) for s in np.random.SeedSequence(list(parts)).generate_state(count)]


class EpisodeTracker:
    """Return, success and length (in control steps: ``action_repeat`` per step) of the episodes
    running in N environments."""

    def __init__(self, count: int, action_repeat: int = 1):
        self.action_repeat = action_repeat
        self.returns = np.zeros(count, np.float64)
        self.success = np.zeros(count, bool)
        self.length = np.zeros(count, np.int64)

    def observe(self, obs: dict[str, np.ndarray], dropped: np.ndarray) -> list[tuple[float, bool, int]]:
        """Adds one step; returns ``(return, success, length)`` of the episodes it finished."""
        first = obs["is_first"] | dropped
        self.returns[first], self.success[first], self.length[first] = 0.0, False, 0
        self.returns += np.where(first, 0.0, obs["reward"])
        self.success |= obs["success"] & ~first
        self.length += self.action_repeat * ~first
        return [
            (float(self.returns[i]), bool(self.success[i]), int(self.length[i])) for i in np.flatnonzero(obs["is_last"])
        ]


def _device_replay(config: ml_collections.ConfigDict, mesh, replay: Replay) -> DeviceReplay:
    """``replay.on_device``: the device copy, filled with the host replay's episodes (on resume,
    those the checkpoint named), oldest first, so it holds what the host holds (or the newest part)."""
    capacity = config.replay.device_capacity or config.replay.capacity
    image_shape = (config.image_size, config.image_size, 3)
    device_replay = DeviceReplay(
        capacity,
        config_lib.episode_frames(config),
        image_shape,
        config.action_dim,
        mesh,
        config.replay.prioritize_ends,
        UPDATE_KEYS,
    )
    for name in replay.episode_names():
        device_replay.add_episode(replay.get_episode(name))
    print(
        f"[prelar] replay on device: {capacity} steps, "
        f"{capacity * bytes_per_step(image_shape, config.action_dim, UPDATE_KEYS) / 2**30:.2f} GiB per device, "
        f"it holds {device_replay.num_episodes} of the host replay's {replay.num_episodes} episode(s)",
        flush=True,
    )
    return device_replay


def run(
    config: ml_collections.ConfigDict, workdir: str, allow_config_override: bool = False, devices: list | None = None
) -> dict[str, Any]:
    """Fine-tunes to ``config.steps`` environment steps in ``workdir``; returns a summary dict.
    The run owns ``workdir`` while it runs (``prelar_jax.runtime.workdir_lock``)."""
    # Environments, replay and the agent's acting run per process: one process only, refused
    # before it would connect to a coordinator and wait for peers.
    parallel.require_single_process("fine-tuning")
    absl_logging.set_verbosity(absl_logging.WARNING)
    config_lib.validate_finetune_config(config)
    # Before anything slow: no offscreen rendering means one clear error naming the packages (and
    # an OSMesa fallback, set here, is inherited by the spawned environment workers).
    check_rendering_backend()
    with contextlib.ExitStack() as owned:  # holds the workdir lock until the run returns
        return _run(config, workdir, allow_config_override, devices, owned)


def _initial_state(config, agent, ckpt, mesh, workdir: str):
    """``(state, counters, replay, kept_names)``: restored from the latest checkpoint (with the
    replay episodes it names), or fresh with the pre-trained modules loaded."""
    key = jax.random.key(config.seed)
    resuming = ckpt.latest_step() is not None
    params = batch_stats = None
    if not resuming and config.pretrained:
        params, batch_stats = _load_pretrained(config, agent, key, workdir)
    state = agent.init_state(key, params, batch_stats)
    state = parallel.put_replicated(state, mesh)
    counters = {
        "env_step": 0,
        "updates": 0,
        "episodes": 0,
        "train_credit": 0,
        "evals": 0,
        "worker_restarts": 0,
        "dropped_episodes": 0,
        "warmed_up": 0,
        "last_eval_step": -1,
    }
    replay_dir = os.path.join(workdir, "replay")
    if resuming:
        state, metadata = ckpt.restore(state)
        counters.update({k: int(v) for k, v in metadata.get("counters", {}).items()})
        replay = Replay.restore(replay_dir, metadata["replay"], config.replay.capacity, config.replay.prioritize_ends)
        kept_names = list(metadata["replay"]["episodes"])
        print(
            f"[prelar] resumed at environment step {counters['env_step']} ({counters['updates']} "
            f"updates, {replay.num_episodes} episodes in the replay)",
            flush=True,
        )
    else:
        replay = Replay(config.replay.capacity, replay_dir, config.replay.prioritize_ends)
        kept_names = []
    return state, counters, replay, kept_names


def _load_pretrained(config, agent, key, workdir: str):
    """The fresh parameters with the pre-trained modules of ``config.pretrained`` loaded; prints
    the load report and writes every loaded, new and ignored array to pretrained_load.json."""
    fresh_params, fresh_stats = jax.tree.map(np.asarray, jax.jit(agent.init)(jax.random.split(key)[0]))
    params, batch_stats, report = pretrained_lib.load_pretrained(
        config.pretrained, fresh_params, fresh_stats, config.model, agent_lib.pretrained_module_map(config)
    )
    print(
        "[prelar] " + pretrained_lib.summarise_report(report, config.env.action_repeat).replace("\n", "\n[prelar] "),
        flush=True,
    )
    report_path = os.path.join(workdir, "pretrained_load.json")
    with open(report_path, "w", encoding="utf-8") as handle:
        json.dump({"pretrained": os.path.abspath(config.pretrained), **report}, handle, indent=1)
    print(f"[prelar] every loaded, new and ignored array: {report_path}", flush=True)
    return params, batch_stats


def _env_factory(config, task: str):
    """A picklable constructor of one Meta-World environment of ``task`` (run in each worker)."""
    return functools.partial(
        make_metaworld_env,
        task=task,
        size=config.image_size,
        camera=config.env.camera,
        render=RenderSettings.from_mapping(dict(config.env.render)),
        time_limit=config.env.time_limit,
        action_repeat=config.env.action_repeat,
    )


def _run(
    config: ml_collections.ConfigDict,
    workdir: str,
    allow_config_override: bool,
    devices: list | None,
    owned: contextlib.ExitStack,
) -> dict[str, Any]:
    mesh, workdir, config_dict = run_utils.open_workdir(
        config, workdir, allow_config_override, RESUMABLE_KEYS, devices, owned, "fine-tuning"
    )
    task = canonical_task_name(config.task)
    print(
        f"[prelar] {config.method} fine-tuning on {task}, preset {config.preset}: "
        f"{mesh.devices.size} x {jax.devices()[0].platform} device(s), jax {jax.__version__}",
        flush=True,
    )

    agent = agent_lib.FinetuneAgent(config, bn_axis_name=parallel.AXIS)
    ckpt = scaffold.open_checkpointer(config, workdir)
    state, counters, replay, kept_names = _initial_state(config, agent, ckpt, mesh, workdir)
    sizes = scaffold.report_params(state.params)

    B, T, size = config.batch_size, config.sequence_length, config.image_size
    spec = scaffold.batch_spec(
        mesh,
        {
            "image": ((B, T, size, size, 3), np.uint8),
            "action": ((B, T, config.action_dim), np.float32),
            "reward": ((B, T), np.float32),
            "is_first": ((B, T), np.bool_),
        },
    )
    update_step, info = scaffold.compile_step(
        "update step", steps.make_finetune_step(agent, mesh, config.seed), state, spec
    )
    device_replay = _device_replay(config, mesh, replay) if config.replay.on_device else None
    policy = jax.jit(agent.policy, static_argnames="explore")
    open_loop = jax.jit(agent.open_loop, static_argnames="context")

    start_step = counters["env_step"]
    make_env = _env_factory(config, task)
    num_envs, num_eval = config.env.num_envs, min(config.env.eval_envs, config.eval_eps)
    envs = ParallelEnvs(
        make_env, _seeds(config.seed, 0, start_step, count=num_envs), step_timeout=config.env.step_timeout
    )
    eval_envs = None
    logger = None
    try:
        eval_envs = ParallelEnvs(
            make_env, _seeds(config.seed, 1, start_step, count=num_eval), step_timeout=config.env.step_timeout
        )
        print(
            f"[prelar] {num_envs} training and {num_eval} evaluation environment worker(s) "
            f"started in {envs.start_seconds + eval_envs.start_seconds:.1f}s",
            flush=True,
        )
        logger = scaffold.make_logger(
            config,
            workdir,
            config_dict,
            start_step,
            console_every=max(1, config.log.every * config.train_every),
            console_keys=("eval/success_rate", "train/return", "model_loss", "fps/env"),
        )
        if start_step == 0:
            scaffold.log_start(logger, info, sizes, "flops_per_update")
        loop = FinetuneLoop(
            config=config,
            agent=agent,
            state=state,
            update_step=update_step,
            policy=policy,
            open_loop=open_loop,
            replay=replay,
            envs=envs,
            eval_envs=eval_envs,
            logger=logger,
            ckpt=ckpt,
            counters=counters,
            kept_names=kept_names,
            mesh=mesh,
            workdir=workdir,
            device_replay=device_replay,
        )
        loop.run()
        state = loop.state
    finally:
        envs.close()
        if eval_envs is not None:
            eval_envs.close()
        ckpt.close()
        if logger is not None:
            logger.close()
    finished = counters["env_step"] >= config.steps
    summary = scaffold.write_summary(
        workdir, {"env_step": counters["env_step"], "updates": counters["updates"], "finished": finished}
    )
    print(
        f"[prelar] {'finished' if finished else 'stopped'} at environment step "
        f"{counters['env_step']}/{config.steps} ({counters['updates']} updates). Results in {workdir}: "
        "metrics.jsonl (eval/success_rate, eval/return), config.json, checkpoints/, replay/, media/",
        flush=True,
    )
    return summary


class FinetuneLoop:
    """The mutable host side of one run (counters, pending metrics); the device side is ``state``.
    One iteration of ``run``: collect one step of every environment, train when due, evaluate
    when due, save media when due, checkpoint when due."""

    def __init__(  # keyword-only: sixteen parts of one run, none to be passed in the wrong place
        self,
        *,
        config,
        agent,
        state,
        update_step,
        policy,
        open_loop,
        replay,
        envs,
        eval_envs,
        logger,
        ckpt,
        counters,
        kept_names,
        mesh,
        workdir,
        device_replay=None,
    ):
        self.config, self.agent, self.state = config, agent, state
        self.device_replay = device_replay  # replay.on_device: batches come from it
        self.update_step, self.policy, self.open_loop = update_step, policy, open_loop
        self.replay, self.envs, self.eval_envs = replay, envs, eval_envs
        self.logger, self.ckpt, self.counters = logger, ckpt, counters
        self.kept_names, self.mesh, self.workdir = kept_names, mesh, workdir
        self.rate = scaffold.Rate(env=counters["env_step"], updates=counters["updates"])
        self.late = scaffold.LateMetrics(logger, self._rates)  # the last logged update's metrics
        self.next_batch = None
        self.train_episodes: list[tuple[float, bool, int]] = []
        self.monitor = run_utils.NonFiniteMonitor(config.nonfinite_limit, logger, ckpt.directory, ckpt.latest_step)

    def _rates(self) -> dict[str, float]:
        rates = self.rate(env=self.counters["env_step"], updates=self.counters["updates"])
        return {
            "fps/env": rates["env"],
            "updates/s": rates["updates"],
            "replay/episodes": self.replay.num_episodes,
            "replay/steps": self.replay.num_steps,
            "env/worker_restarts": self.counters["worker_restarts"],
        }

    def run(self) -> None:
        """Steps, updates, evaluations and checkpoints. Everything logged at an environment step
        happens before the checkpoint of that step, so a run resumed from it never logs that
        step again, and lines are written in step order."""
        c, counters = self.config, self.counters
        self.rng = np.random.default_rng([c.seed, 7, counters["env_step"]])
        n = self.envs.num_envs
        self.obs = self.envs.reset()
        self.episodes = EpisodeTracker(n, c.env.action_repeat)
        self.episodes.observe(self.obs, np.zeros(n, bool))
        self.replay.add_batch(self.obs, np.zeros((n, c.action_dim), np.float32))
        self.carry = self.agent.initial_carry(n)
        with run_utils.StopRequest() as stop:
            while counters["env_step"] < c.steps and not stop.requested:
                previous, step, stepped = self.collect()
                self.train_when_due(step, stepped)
                self._log_train(step)
                if self._eval_due(step):
                    self.evaluate(step)
                    counters["evals"] += 1
                if scaffold.crossed(step, previous, c.log.media_every) and counters["updates"] > 0:
                    self.save_media(step)
                # The last checkpoint comes after the final evaluation, below.
                if (scaffold.crossed(step, previous, c.log.checkpoint_every) and step < c.steps) or stop.requested:
                    self.save(step)
            step = counters["env_step"]
            if step >= c.steps and not stop.requested:
                if counters["last_eval_step"] != step:
                    self.evaluate(step)
                self.save(step)
            elif stop.requested:
                self.save(step)
        self.late.flush()
        self.monitor.check()

    # ------------------------------------------------------------------ collect
    def collect(self) -> tuple[int, int, int]:
        """One step of every training environment (uniform random actions during ``prefill``,
        then the policy exploring), into the replay; returns ``(previous env step, env step,
        steps taken)``. A reset (the call after ``is_last``) is not an environment step, as in
        Dreamer's driver."""
        c, counters, n = self.config, self.counters, self.envs.num_envs
        step = counters["env_step"]
        if step < c.prefill:
            action = self.rng.uniform(-1.0, 1.0, (n, c.action_dim)).astype(np.float32)
        else:
            key = jax.random.fold_in(jax.random.key(c.seed + 1), step)
            action, self.carry = self.policy(
                self.state.params,
                self.state.batch_stats,
                self.carry,
                self.obs["image"],
                self.obs["is_first"],
                key,
                explore=True,
            )
            action = np.asarray(action)
        obs, dropped = self.envs.step(action)
        self.obs = obs
        for i in np.flatnonzero(dropped):
            self.replay.discard(i)
            counters["worker_restarts"] += 1
            counters["dropped_episodes"] += 1
        stored_action = np.where(obs["is_first"][:, None], 0.0, action).astype(np.float32)
        finished = self.replay.add_batch(obs, stored_action)
        if self.device_replay is not None:  # one host->device copy per finished episode
            for name in finished:
                self.device_replay.add_episode(self.replay.get_episode(name))
        for episode in self.episodes.observe(obs, dropped):
            self.train_episodes.append(episode)
            counters["episodes"] += 1
        stepped = int(np.sum(~obs["is_first"])) * c.env.action_repeat  # control steps
        counters["env_step"] = step + stepped
        return step, counters["env_step"], stepped

    # ------------------------------------------------------------------ schedule
    def train_when_due(self, step: int, stepped: int) -> None:
        """The world-model warm-up (``pretrain`` updates) once the prefill is done, then
        ``train_steps`` updates per ``train_every`` environment steps (credit carries over)."""
        c, counters = self.config, self.counters
        if not counters["warmed_up"]:
            if step >= c.prefill:
                self.train(c.pretrain, step)  # world-model warm-up on the prefill data
                counters["warmed_up"] = 1
            return
        counters["train_credit"] += stepped
        due = counters["train_credit"] // c.train_every
        counters["train_credit"] -= due * c.train_every
        self.train(due * c.train_steps, step)

    def _eval_due(self, step: int) -> bool:
        c = self.config
        return step >= c.prefill and (step - c.prefill) // c.eval_every >= self.counters["evals"]

    # ------------------------------------------------------------------ updates
    def _sample(self) -> dict[str, jax.Array]:
        c = self.config
        if self.device_replay is not None:  # drawn on the devices, already sharded like put_batch's
            key = jax.random.fold_in(jax.random.fold_in(jax.random.key(c.seed), 11), self.counters["updates"])
            return self.device_replay.sample(key, c.batch_size, c.sequence_length)
        rng = np.random.default_rng([c.seed, 11, self.counters["updates"]])
        batch = self.replay.sample(rng, c.batch_size, c.sequence_length)
        batch = {k: batch[k] for k in UPDATE_KEYS}
        return parallel.put_batch(batch, self.mesh)

    def train(self, count: int, env_step: int) -> None:
        for _ in range(count):
            batch = self.next_batch if self.next_batch is not None else self._sample()
            self.state, metrics = self.update_step(self.state, batch)
            self.counters["updates"] += 1
            self.late.flush()  # the previous update's metrics are ready by now (or soon)
            self.monitor.observe(env_step, metrics["nonfinite"])
            if self.counters["updates"] % self.config.log.every == 0:
                self.late.hold(env_step, metrics)
            # Sample and transfer the next batch while the device computes this update.
            self.next_batch = self._sample()

    def _log_train(self, step: int) -> None:
        if not self.train_episodes:
            return
        self.late.flush()  # pending update metrics carry an earlier step: write them first
        returns, success, length = zip(*self.train_episodes)
        self.train_episodes = []
        self.logger.log(
            step,
            {
                "train/return": float(np.mean(returns)),
                "train/success": float(np.mean(success)),
                "train/length": float(np.mean(length)),
                "train/episodes": self.counters["episodes"],
            },
        )

    # ------------------------------------------------------------------ evaluation
    def evaluate(self, step: int) -> None:
        """``eval_eps`` episodes with the policy's mode on the evaluation workers."""
        c, envs = self.config, self.eval_envs
        start = time.perf_counter()
        n = envs.num_envs
        obs = envs.reset()
        episodes = EpisodeTracker(n, c.env.action_repeat)
        episodes.observe(obs, np.zeros(n, bool))
        carry = self.agent.initial_carry(n)
        finished: list[tuple[float, bool, int]] = []
        frames = 0
        # The first evaluation episode of worker 0, frame by frame (reset frame included).
        video = [obs["image"][0]] if c.log.eval_video else None
        while len(finished) < c.eval_eps:
            key = jax.random.fold_in(jax.random.key(c.seed + 2), step * 1000 + frames)
            action, carry = self.policy(
                self.state.params, self.state.batch_stats, carry, obs["image"], obs["is_first"], key, explore=False
            )
            obs, dropped = envs.step(np.asarray(action))
            self.counters["worker_restarts"] += int(dropped.sum())
            finished.extend(episodes.observe(obs, dropped))
            if video is not None:
                if dropped[0]:  # worker 0 restarted: its episode is gone, record its next one
                    video = [obs["image"][0]]
                else:
                    video.append(obs["image"][0])
                    if obs["is_last"][0]:
                        self.save_eval_video(step, np.stack(video), episodes.success[0])
                        video = None
            frames += n
        finished = finished[: c.eval_eps]
        returns, success, length = zip(*finished)
        self.counters["last_eval_step"] = step
        self.late.flush()  # pending update metrics carry an earlier step: write them first
        self.logger.log(
            step,
            {
                "eval/success_rate": float(np.mean(success)),
                "eval/return": float(np.mean(returns)),
                "eval/episodes": len(finished),
                "eval/seconds": time.perf_counter() - start,
            },
        )

    # ------------------------------------------------------------------ media and checkpoints
    def save_eval_video(self, step: int, frames: np.ndarray, success: bool) -> None:
        """``media/eval_<step>.gif``: one evaluation episode (``[L, H, W, 3]`` uint8), also to W&B."""
        if jax.process_index() != 0:
            return
        path = os.path.join(self.workdir, "media", f"eval_{step:08d}.gif")
        media.save_gif(path, frames, fps=self.config.log.eval_video_fps)
        self.logger.log_video(step, "eval/video", path, caption=f"step {step}, success {bool(success)}")

    def save_media(self, step: int) -> None:
        c = self.config
        batch = self.replay.sample(np.random.default_rng([c.seed, 13, step]), c.log.media_examples, c.sequence_length)
        predicted = self.open_loop(
            self.state.params,
            self.state.batch_stats,
            {k: batch[k] for k in ("image", "action", "is_first")},
            jax.random.key(step),
            context=c.log.media_context,
        )
        scaffold.save_open_loop(self.workdir, self.logger, step, batch["image"], predicted)

    def save(self, step: int) -> None:
        self.late.flush()  # never lose the metrics of a checkpointed step
        # The previous save is complete once this returns; only then may files it does not name go.
        self.ckpt.wait_until_finished()
        if jax.process_index() == 0:
            self.replay.prune_files(self.kept_names)
        replay_state = self.replay.state_dict()
        self.ckpt.save(
            step,
            self.state,
            {
                "step": step,
                "method": self.config.method,
                "task": self.config.task,
                "counters": dict(self.counters),
                "replay": replay_state,
            },
        )
        self.kept_names = list(replay_state["episodes"])
