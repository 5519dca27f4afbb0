"""Parallel environment workers: Dreamer auto-reset, seeding, and surviving crashed/raising/hung workers.

Spawning a worker costs about 0.5 s (fake env) to 2 s (Meta-World), so each test builds one
`ParallelEnvs` and checks several things with it. The fake envs are module-level classes so the
spawned workers can unpickle them (they import this module, which must stay light: no MuJoCo).
"""

from __future__ import annotations

import functools
import multiprocessing
import os
import time
import warnings

import numpy as np
import pytest

from prelar_jax.envs.workers import (
    EnvWorkerError,
    EnvWorkerWarning,
    ParallelEnvs,
    benchmark_envs,
    make_metaworld_env,
    restart_seed,
)


class FakeEnv:
    """A MuJoCo-free env whose obs record (seed, step count, last action); faults on request.

    faults: ((seed, mode, step), ...) with mode 'exit' (the process dies), 'raise' or 'hang'; the fault
    fires when the env built with that seed takes its `step`-th step. mode 'construct-exit' with step 0
    kills the process while the env is being built.
    """

    def __init__(self, seed: int, faults: tuple = (), time_limit: int = 1000) -> None:
        self.seed = seed
        self.faults = {s: (mode, step) for s, mode, step in faults}
        self.time_limit = time_limit
        self.t = 0
        if self.faults.get(seed, ("",))[0] == "construct-exit":
            os._exit(3)

    def _obs(self, action0: float, is_first: bool) -> dict:
        return {
            "image": np.full((4, 4, 3), self.t % 256, np.uint8),
            "state": np.array([self.seed, self.t, action0], np.float64),
            "reward": float(self.t),
            "success": False,
            "is_first": is_first,
            "is_last": self.t >= self.time_limit,
            "is_terminal": False,
        }

    def reset(self) -> dict:
        self.t = 0
        return self._obs(0.0, True)

    def step(self, action: np.ndarray) -> dict:
        self.t += 1
        mode, at = self.faults.get(self.seed, ("", -1))
        if self.t == at:
            if mode == "exit":
                os._exit(1)
            if mode == "raise":
                raise RuntimeError("injected fault")
            if mode == "hang":
                time.sleep(120)
        return self._obs(float(action[0]), False)

    def close(self) -> None:
        pass


def _assert_reaped(pids: set[int]) -> None:
    """No process left, not even a zombie (a zombie keeps its /proc entry until it is reaped)."""
    assert pids, "expected some worker pids"
    alive = [pid for pid in pids if os.path.exists(f"/proc/{pid}")]
    assert not alive, f"worker processes still present after close(): {alive}"


@pytest.mark.slow
def test_metaworld_workers_match_in_process_env_and_auto_reset() -> None:
    time_limit = 3
    make_env = functools.partial(make_metaworld_env, task="drawer-open", size=16, time_limit=time_limit)
    rng = np.random.default_rng(0)
    actions = rng.uniform(-1, 1, size=(8, 2, 4)).astype(np.float32)  # [T, N, A]
    envs = ParallelEnvs(make_env, seeds=[5, 6], step_timeout=60)
    pids = {pid for pid in envs.worker_pids}
    with envs:
        assert envs.num_envs == 2
        trajectory = [envs.reset()]
        for t in range(len(actions)):
            obs, dropped = envs.step(actions[t])
            assert not dropped.any()
            trajectory.append(obs)
    assert envs.restarts == 0

    first = trajectory[0]
    assert first["image"].shape == (2, 16, 16, 3) and first["image"].dtype == np.uint8
    assert first["state"].shape == (2, 39) and first["state"].dtype == np.float32
    assert first["reward"].shape == (2,) and first["reward"].dtype == np.float32
    for key in ("success", "is_first", "is_last", "is_terminal"):
        assert first[key].shape == (2,) and first[key].dtype == bool, key
    # Different seeds draw different goals and object positions.
    assert not np.array_equal(first["state"][0], first["state"][1])
    assert not np.array_equal(first["image"][0], first["image"][1])

    # Dreamer auto-reset: is_last on steps 3 and 7, is_first exactly on the step after each.
    is_last = np.stack([o["is_last"] for o in trajectory])  # [T+1, N]
    is_first = np.stack([o["is_first"] for o in trajectory])
    expected_last = np.array([t in (3, 7) for t in range(len(trajectory))])
    expected_first = np.array([t in (0, 4, 8) for t in range(len(trajectory))])
    np.testing.assert_array_equal(is_last, np.stack([expected_last] * 2, axis=1))
    np.testing.assert_array_equal(is_first, np.stack([expected_first] * 2, axis=1))

    # Reference: the same seed in this process, same actions, reset where is_last was seen (the
    # action of a resetting env is ignored). Same seeds -> identical observations.
    reference = make_env(5)
    try:
        expected = [reference.reset()]
        for t in range(len(actions)):
            expected.append(reference.reset() if expected[-1]["is_last"] else reference.step(actions[t, 0]))
    finally:
        reference.close()
    for t, (got, want) in enumerate(zip(trajectory, expected)):
        np.testing.assert_array_equal(got["image"][0], want["image"], err_msg=f"step {t}")
        np.testing.assert_array_equal(got["state"][0], np.float32(want["state"]), err_msg=f"step {t}")
        assert got["reward"][0] == np.float32(want["reward"]), t
        assert got["is_first"][0] == want["is_first"] and got["is_last"][0] == want["is_last"], t
    # The second episode starts from a new goal (the seed stream continues, it is not re-seeded).
    assert not np.array_equal(trajectory[4]["state"][0], trajectory[0]["state"][0])
    _assert_reaped(pids)


@pytest.mark.slow
def test_crashed_raising_and_hung_workers_are_restarted() -> None:
    faults = ((1, "exit", 2), (2, "raise", 3), (3, "hang", 4))
    make_env = functools.partial(FakeEnv, faults=faults)
    seeds = [0, 1, 2, 3]
    envs = ParallelEnvs(make_env, seeds=seeds, step_timeout=1.5, start_timeout=60)
    pids = set(envs.worker_pids)
    obs = envs.reset()
    np.testing.assert_array_equal(obs["state"][:, 0], seeds)
    with pytest.raises(ValueError, match="num_envs=4"):
        envs.step(np.zeros((3, 4), np.float32))
    with pytest.raises(ValueError, match="finite"):
        envs.step(np.full((4, 2), np.nan, np.float32))

    faulty_at = {2: 1, 3: 2, 4: 3}  # step -> worker that faults on it
    causes = {1: "exit code 1", 2: "injected fault", 3: "no answer within 1.5 s"}
    for t in range(1, 7):
        actions = np.full((4, 2), t / 10, np.float32)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            start = time.monotonic()
            obs, dropped = envs.step(actions)
            seconds = time.monotonic() - start
        pids.update(pid for pid in envs.worker_pids if pid is not None)
        worker_warnings = [w for w in caught if issubclass(w.category, EnvWorkerWarning)]
        bad = faulty_at.get(t)
        np.testing.assert_array_equal(dropped, [i == bad for i in range(4)], err_msg=f"step {t}")
        # The healthy worker is unaffected: its episode simply goes on.
        np.testing.assert_array_equal(obs["state"][0], np.float32([0, t, t / 10]))
        assert not obs["is_first"][0]
        if bad is None:
            assert not worker_warnings, [str(w.message) for w in worker_warnings]
            continue
        assert len(worker_warnings) == 1
        message = str(worker_warnings[0].message)
        assert f"worker {bad} (seed {bad})" in message and causes[bad] in message and "restart 1 " in message
        # The restarted worker returns the reset obs of a fresh env with a derived seed.
        assert obs["is_first"][bad] and not obs["is_last"][bad]
        np.testing.assert_array_equal(obs["state"][bad], np.float32([restart_seed(bad, 1), 0, 0]))
        assert envs.restarts == bad
        if causes[bad].startswith("no answer"):
            assert seconds < 1.5 + 30, seconds  # waited for the timeout, not for the 120 s hang
    # Restarted workers step normally afterwards; their seeds changed, so no fault fires again.
    assert envs.restarts == 3
    np.testing.assert_array_equal(obs["state"][1:, 1], [4, 3, 2])

    envs.close()
    envs.close()  # idempotent
    with pytest.raises(RuntimeError, match="closed"):
        envs.step(np.zeros((4, 2), np.float32))
    _assert_reaped(pids)


def test_worker_that_cannot_start_raises_promptly() -> None:
    # make_env raises (unknown task): reported at once with the worker's message, no retries.
    start = time.monotonic()
    with pytest.raises(EnvWorkerError, match=r"worker 0 \(seed 0\).*Unknown Meta-World task 'drawer-opn'"):
        ParallelEnvs(functools.partial(make_metaworld_env, task="drawer-opn"), seeds=[0])
    assert time.monotonic() - start < 30
    # The process dies while building the env: retried, then given up after 3 attempts.
    make_env = functools.partial(FakeEnv, faults=((7, "construct-exit", 0),))
    with pytest.raises(EnvWorkerError, match=r"3 times in a row: worker 1: process died during start \(exit code 3\)"):
        ParallelEnvs(make_env, seeds=[0, 7])
    assert time.monotonic() - start < 60
    assert not [p for p in multiprocessing.active_children() if p.name.startswith("env-worker")]


def test_benchmark_counts_every_env_frame() -> None:
    # time_limit 4 makes auto-resets happen during the timed steps; they count as frames too.
    result = benchmark_envs(functools.partial(FakeEnv, time_limit=4), num_workers=2, steps=25, seed=3)
    assert result["restarts"] == 0
    assert result["start_seconds"] > 0 and result["step_seconds"] > 0
    assert result["fps"] == pytest.approx(2 * 25 / result["step_seconds"])
    assert result["fps_per_worker"] == pytest.approx(result["fps"] / 2)
    with pytest.raises(ValueError, match="steps must be >= 1"):
        benchmark_envs(FakeEnv, num_workers=1, steps=0)
