"""Environment faults inside a fine-tuning run: a Meta-World worker that dies mid-episode is
restarted, its episode is discarded and counted, and the run finishes."""

import json
import os

import jax
import pytest

from prelar_jax.runtime import checkpoint, finetune_loop
from prelar_jax.envs import workers
from tests.test_finetune import finetune_config

pytestmark = pytest.mark.slow  # subprocesses or long training: skipped by -m "not slow"

CRASH_AT_STEP = 30


class _CrashingTask:
    """A real Meta-World task whose process dies at step CRASH_AT_STEP of its first episode,
    only for the original seed (a restarted worker has another seed and runs normally)."""

    def __init__(self, seed, crash, **kwargs):
        self._task = workers.make_metaworld_env(seed, **kwargs)
        self._crash = crash
        self._steps = 0

    def reset(self):
        return self._task.reset()

    def step(self, action):
        self._steps += 1
        if self._crash and self._steps == CRASH_AT_STEP:
            os._exit(3)  # the whole worker process dies, as a segfaulting simulator would
        return self._task.step(action)

    def close(self):
        self._task.close()


def crashing_env(seed, **kwargs):
    """Picklable factory: crash in the workers started with the run's first training seed."""
    return _CrashingTask(seed, crash=seed in _CRASH_SEEDS, **kwargs)


_CRASH_SEEDS = set(finetune_loop._seeds(0, 0, 0, count=1))


def test_worker_crash_drops_the_episode_and_the_run_finishes(tmp_path, monkeypatch):
    monkeypatch.setattr(finetune_loop, "make_metaworld_env", crashing_env)
    config = finetune_config("configs/dreamerv2.py:tiny", **{"steps": 300, "log.every": 1})
    with pytest.warns(workers.EnvWorkerWarning, match="process died during step .*episode in progress is dropped"):
        summary = finetune_loop.run(config, str(tmp_path), devices=jax.devices()[:1])
    assert summary["finished"] and summary["env_step"] == 300
    metadata = checkpoint.read_metadata(tmp_path / "checkpoints")
    assert metadata["counters"]["dropped_episodes"] == 1
    assert metadata["counters"]["worker_restarts"] == 1
    # Every stored episode is complete: the crashed one was discarded, not stored half.
    names = metadata["replay"]["episodes"]
    assert names and all(name.endswith(f"-{config.env.time_limit}.npz") for name in names)
    # 300 steps of 50-step episodes, one of them cut at step 29 and dropped.
    assert len(names) == (300 - (CRASH_AT_STEP - 1)) // config.env.time_limit
    with open(tmp_path / "metrics.jsonl") as handle:
        records = [json.loads(line) for line in handle]
    assert max(r.get("env/worker_restarts", 0) for r in records) == 1
