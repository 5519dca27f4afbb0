"""Render Meta-World scripted-expert episodes as action-free pre-training videos (DreamerV2 .npz files).

Each episode is written to `<out_dir>/<task>/00000000T000000-<seed as 16 hex digits><episode index
as 16 hex digits>-<length>.npz` (the DreamerV2 name's shape; the same names, sorted in episode order,
on every run and with any number of workers, so readers that sort names see the same order) with
  image       uint8   [L+1, 64, 64, 3]
  action      float32 [L+1, 4]   row 0 is zeros (Dreamer: a_t produced o_t); kept for analysis only
  reward      float32 [L+1]      row 0 is 0
  success     bool    [L+1]
  is_first    bool    [L+1]      True at row 0 only
  is_last     bool    [L+1]      True at row L only
  is_terminal bool    [L+1]      all False
(envs_data.md section 5; the same format as APV's RLBench `train_episodes/`).

Episode e of task k is a pure function of (seed, task name, e): the env's goal generator and the
action noise are seeded from `np.random.SeedSequence([seed, crc32(task), e])`, so the output does not
depend on the number of workers or on the other tasks in the list.

Workers are started with the `forkserver` context: a parent that owns a GL context must never `fork`
(the child hangs). With `workers == 1` everything runs in the calling process.
"""

from __future__ import annotations

import dataclasses
import datetime
import multiprocessing
import multiprocessing.util
import os
import time
import uuid
import warnings
import zlib
from pathlib import Path
from typing import Sequence

import numpy as np

from prelar_jax.envs.metaworld import (
    BENCHMARK_TASKS,
    MAX_EPISODE_STEPS,
    TASK_NAMES,
    MetaWorldTask,
    canonical_task_name,
    check_rendering_backend,
)
from prelar_jax.envs.rendering import LEAN, RenderSettings, resolve_render_settings

DEFAULT_TASKS: tuple[str, ...] = tuple(t for t in TASK_NAMES if t not in BENCHMARK_TASKS)


@dataclasses.dataclass(frozen=True)
class _Config:
    out_dir: str
    max_steps: int
    noise_std: float
    seed: int
    cut_after_success: int | None
    camera: str
    size: int
    render: RenderSettings


def episode_seeds(seed: int, task: str, episode: int) -> tuple[int, int]:
    """(env seed, noise seed) of one episode; independent of worker count and of the task list."""
    env_seed, noise_seed = np.random.SeedSequence([seed, zlib.crc32(task.encode()), episode]).generate_state(2)
    return int(env_seed), int(noise_seed)


def episode_filename(length: int, index: int | None = None) -> str:
    """DreamerV2 name `<YYYYmmddTHHMMSS>-<uuid4hex>-<length>.npz`, length = frames - 1. With
    ``index``, a name that sorts by it and is the same on every run: `00000000T000000-<index as 32
    hex digits>-<length>.npz` (for data that must load in the same order each time)."""
    if index is not None:
        return f"00000000T000000-{index:032x}-{length}.npz"
    stamp = datetime.datetime.now().strftime("%Y%m%dT%H%M%S")
    return f"{stamp}-{uuid.uuid4().hex}-{length}.npz"


def save_episode(directory: str | os.PathLike, episode: dict[str, np.ndarray], index: int | None = None) -> Path:
    """Write one episode as compressed npz, atomically (a killed run leaves no half-written *.npz),
    named by ``episode_filename`` (``index``: a fixed name)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / episode_filename(len(episode["image"]) - 1, index)
    tmp = directory / f".{path.name}.tmp"
    with open(tmp, "wb") as f:
        np.savez_compressed(f, **episode)
    os.replace(tmp, path)
    return path


class _EpisodeRunner:
    """Holds one MetaWorldTask at a time (rebuilt only when the task changes) and records episodes."""

    def __init__(self, config: _Config) -> None:
        self.config = config
        self._env: MetaWorldTask | None = None

    def _task_env(self, task: str) -> MetaWorldTask:
        if self._env is None or self._env.task != task:
            self.close()
            self._env = MetaWorldTask(
                task,
                seed=0,  # re-seeded at every reset
                size=self.config.size,
                camera=self.config.camera,
                render=self.config.render,
                time_limit=self.config.max_steps,
            )
        return self._env

    def run(self, job: tuple[str, int]) -> dict:
        """Record and save episode `job = (task, episode_index)`; return a summary without the frames."""
        from metaworld.policies import ENV_POLICY_MAP

        task, episode = job
        cfg = self.config
        env = self._task_env(task)
        start_time = time.perf_counter()  # rollout + rendering + saving; env construction excluded
        env_seed, noise_seed = episode_seeds(cfg.seed, task, episode)
        noise_rng = np.random.default_rng(noise_seed)
        policy = ENV_POLICY_MAP[f"{task}-v3"]()
        obs = env.reset(seed=env_seed)
        images = [obs["image"]]
        hands = [obs["state"][:3]]
        actions = [np.zeros(4, np.float32)]
        rewards = [0.0]
        successes = [False]
        first_success = -1
        while True:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)  # "Constant(s) may be too high"
                action = np.clip(policy.get_action(obs["state"]), -1.0, 1.0)
            if cfg.noise_std > 0:
                action = np.clip(action + noise_rng.normal(0.0, cfg.noise_std, size=4), -1.0, 1.0)
            action = action.astype(np.float32)
            obs = env.step(action)
            images.append(obs["image"])
            hands.append(obs["state"][:3])
            actions.append(action)
            rewards.append(obs["reward"])
            successes.append(obs["success"])
            t = len(images) - 1
            if obs["success"] and first_success < 0:
                first_success = t
            cut = (
                cfg.cut_after_success is not None and first_success >= 0 and t >= first_success + cfg.cut_after_success
            )
            if obs["is_last"] or cut:
                break
        n = len(images)
        episode_data = {
            "image": np.stack(images),  # [L+1, 64, 64, 3] uint8
            "action": np.stack(actions).astype(np.float32),  # [L+1, 4]
            "reward": np.asarray(rewards, np.float32),  # [L+1]
            "success": np.asarray(successes, bool),  # [L+1]
            "is_first": np.arange(n) == 0,  # [L+1]
            "is_last": np.arange(n) == n - 1,  # [L+1]
            "is_terminal": np.zeros(n, bool),  # [L+1]
            # The hand's measured position (Meta-World state[:3], metres) in each frame: what the
            # frames show moving, as against the commanded action (the probe's `hand` target).
            "hand": np.stack(hands).astype(np.float32),  # [L+1, 3]
        }
        # A name from (seed, episode): the files sort in episode order and are the same on every run
        # (time + uuid names sorted differently each time: the probe's episode split moved with them).
        path = save_episode(Path(cfg.out_dir) / task, episode_data, index=(cfg.seed << 64) | episode)
        return {
            "task": task,
            "episode": episode,
            "path": str(path),
            "frames": n,
            "first_success": first_success,
            "seconds": time.perf_counter() - start_time,
        }

    def close(self) -> None:
        if self._env is not None:
            self._env.close()
            self._env = None


_WORKER: _EpisodeRunner | None = None


def _close_worker() -> None:
    global _WORKER
    if _WORKER is not None:
        _WORKER.close()
        _WORKER = None


def _init_worker(config: _Config) -> None:
    global _WORKER
    _WORKER = _EpisodeRunner(config)
    # Free the GL context before the process exits (avoids EGL tracebacks from __del__ at exit).
    multiprocessing.util.Finalize(None, _close_worker, exitpriority=10)


def _run_job(job: tuple[str, int]) -> dict:
    assert _WORKER is not None
    return _WORKER.run(job)


def generate_videos(
    out_dir: str | os.PathLike,
    tasks: Sequence[str] | None = None,
    episodes_per_task: int = 10,
    max_steps: int = MAX_EPISODE_STEPS,
    noise_std: float = 0.0,
    seed: int = 0,
    workers: int = 1,
    cut_after_success: int | None = None,
    camera: str = "corner",
    size: int = 64,
    render: RenderSettings | str | None = None,
    verbose: bool = True,
    *,
    lean_rendering: bool | None = None,
) -> dict:
    """Render `episodes_per_task` expert episodes per task into `out_dir`; return a summary dict.

    tasks: names with or without '-v3' (default: all 50 minus BENCHMARK_TASKS). max_steps: episode
    length cap (<= 500). noise_std: Gaussian noise added to the expert action, result clipped to
    [-1, 1]. cut_after_success: if set to K, an episode ends K steps after its first success (frames
    after success are nearly static). workers: processes, each rendering with its own env.
    render: `RenderSettings` or a spec ('lean', 'paper', 'lean+shadows', ...); default `LEAN`, ~10x
    faster than `PAPER` in software OpenGL. The paper pre-trained on real-world videos, so there is no
    paper look to match here; pass the fine-tuning run's settings for pre-training frames that look
    exactly like its frames. `lean_rendering` is the older switch (True = lean, False = paper).

    Summary keys: out_dir, tasks, episodes, frames, seconds, fps (frames per wall-clock second,
    worker start-up and env construction included), episode_fps (frames per second of one worker
    while it rolls out, renders and saves episodes), success_rate (episodes with any success),
    per_task {task: {episodes, successes, frames}}, files, render (the settings' spec, e.g. 'lean').
    """
    tasks = list(DEFAULT_TASKS if tasks is None else tasks)
    tasks = list(dict.fromkeys(canonical_task_name(t) for t in tasks))
    if not tasks:
        raise ValueError("No tasks to render: pass at least one Meta-World task name")
    if episodes_per_task < 1:
        raise ValueError(f"episodes_per_task must be >= 1, got {episodes_per_task}")
    if not 1 <= max_steps <= MAX_EPISODE_STEPS:
        raise ValueError(f"max_steps must be in [1, {MAX_EPISODE_STEPS}], got {max_steps}")
    if noise_std < 0:
        raise ValueError(f"noise_std must be >= 0, got {noise_std}")
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    if cut_after_success is not None and cut_after_success < 0:
        raise ValueError(f"cut_after_success must be >= 0 or None, got {cut_after_success}")
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    settings = resolve_render_settings(render, lean_rendering, default=LEAN)
    check_rendering_backend()  # probes in a subprocess: the parent gets no GL context

    config = _Config(str(out_dir), max_steps, float(noise_std), seed, cut_after_success, camera, size, settings)
    jobs = [(task, e) for task in tasks for e in range(episodes_per_task)]  # task-major: few env rebuilds
    workers = min(workers, len(jobs))
    results: list[dict] = []
    start = time.perf_counter()

    def report(res: dict) -> None:
        results.append(res)
        if verbose:
            frames = sum(r["frames"] for r in results)
            fps = frames / max(time.perf_counter() - start, 1e-9)
            succ = f"success at step {res['first_success']}" if res["first_success"] >= 0 else "no success"
            print(
                f"[{len(results)}/{len(jobs)}] {res['task']} episode {res['episode']}: "
                f"{res['frames']} frames, {succ} ({fps:.1f} frames/s overall)",
                flush=True,
            )

    if workers == 1:
        runner = _EpisodeRunner(config)
        try:
            for job in jobs:
                report(runner.run(job))
        finally:
            runner.close()
    else:
        ctx = multiprocessing.get_context("forkserver")
        # Import MuJoCo/Meta-World once in the fork server (no GL context there), not in every worker.
        ctx.set_forkserver_preload(["prelar_jax.data.generate", "metaworld", "metaworld.policies"])
        pool = ctx.Pool(workers, initializer=_init_worker, initargs=(config,))
        try:
            for res in pool.imap_unordered(_run_job, jobs):
                report(res)
            pool.close()
        except BaseException:
            pool.terminate()
            raise
        finally:
            pool.join()
    seconds = time.perf_counter() - start

    per_task: dict[str, dict[str, int]] = {t: {"episodes": 0, "successes": 0, "frames": 0} for t in tasks}
    for r in results:
        stats = per_task[r["task"]]
        stats["episodes"] += 1
        stats["successes"] += int(r["first_success"] >= 0)
        stats["frames"] += r["frames"]
    frames = sum(r["frames"] for r in results)
    summary = {
        "out_dir": str(out_dir),
        "tasks": tasks,
        "episodes": len(results),
        "frames": frames,
        "seconds": seconds,
        "fps": frames / max(seconds, 1e-9),
        "episode_fps": frames / max(sum(r["seconds"] for r in results), 1e-9),
        "success_rate": float(np.mean([r["first_success"] >= 0 for r in results])),
        "per_task": per_task,
        "files": sorted(r["path"] for r in results),
        "render": settings.describe(),
    }
    if verbose:
        print(
            f"Wrote {summary['episodes']} episodes, {frames} frames to {out_dir} in {seconds:.1f} s: "
            f"{summary['fps']:.1f} frames/s with {workers} worker(s) "
            f"({summary['episode_fps']:.1f} frames/s per worker while rendering); "
            f"success rate {summary['success_rate']:.2f}",
            flush=True,
        )
    return summary
