"""Step N environments in N worker processes, Dreamer-driver style, surviving worker faults.

Why processes: Meta-World is CPU MuJoCo plus software rendering, about 10 ms a frame, and holds the
GIL; one process per environment lets N of them run at once while the parent runs the policy.

Why `spawn`: the parent has JAX (threads) and possibly a GL context; a `fork`ed child of such a
process can hang. A spawned worker imports only this module, numpy and whatever `make_env` needs
(never JAX: `prelar_jax/__init__` only sets XLA flags), so it starts in about 2 s for Meta-World.
Note that `spawn` also re-imports the parent's main script in each worker (so that factories defined
there unpickle): a script that imports JAX and Flax at the top adds about 1 s and 140 MB per worker.

Protocol: one `Pipe` per worker, one round trip per step. Parent -> worker: `("reset", None)`,
`("step", action)` or `("close", None)`; worker -> parent: `("ready", None)` once the env is built,
then `("ok", obs)` or `("error", traceback_text)` (after which the worker exits).

Fault handling: a worker that dies, raises, or does not answer within `step_timeout` is killed and
replaced by a fresh process and env (seed derived from the original seed and the restart count). The
new env's reset observation stands in for the step's observation and `dropped[i]` tells the caller to
discard the episode it was recording for env i. The caller never sees the fault as an exception,
unless a worker cannot be started `max_restarts_in_a_row` times in a row.
"""

from __future__ import annotations

import os

os.environ.setdefault("MUJOCO_GL", "egl")  # read when mujoco is first imported (in the workers)

import multiprocessing
import multiprocessing.connection
import signal
import time
import traceback
import warnings
from typing import Any, Callable, Protocol, Sequence

import numpy as np

from prelar_jax.errors import UserError

# Dtypes of the stacked observation keys that Dreamer's replay expects; other keys keep their dtype.
_STACK_DTYPES: dict[str, Any] = {
    "image": np.uint8,
    "state": np.float32,
    "reward": np.float32,
    "success": bool,
    "is_first": bool,
    "is_last": bool,
    "is_terminal": bool,
}


class Env(Protocol):
    """The `MetaWorldTask` interface the workers drive."""

    def reset(self) -> dict: ...

    def step(self, action: np.ndarray) -> dict: ...

    def close(self) -> None: ...


class EnvWorkerError(UserError, RuntimeError):
    """An environment worker could not be started (e.g. `make_env` raises, unknown task)."""


class EnvWorkerWarning(UserWarning):
    """An environment worker crashed, raised or hung and was restarted with a fresh env."""


def make_metaworld_env(
    seed: int,
    task: str,
    size: int = 64,
    camera: str = "corner",
    render: Any = None,
    time_limit: int = 500,
    *,
    lean_rendering: bool | None = None,
    action_repeat: int = 1,
) -> Env:
    """Picklable factory for `ParallelEnvs`: `functools.partial(make_metaworld_env, task=...)`.

    render: a `prelar_jax.envs.rendering.RenderSettings` (picklable), a spec such as 'paper', or a
    `{setting: bool}` dict; `MetaWorldTask`'s default (lean) when None. `lean_rendering` is the older
    switch (True = lean, False = paper).

    Imports Meta-World lazily so that the parent process, which only pickles this function, never
    loads MuJoCo.
    """
    from prelar_jax.envs.metaworld import MetaWorldTask

    return MetaWorldTask(
        task,
        seed,
        size=size,
        camera=camera,
        render=render,
        time_limit=time_limit,
        lean_rendering=lean_rendering,
        action_repeat=action_repeat,
    )


def restart_seed(seed: int, restart: int) -> int:
    """Seed of a worker's env after its `restart`-th restart (restart 0 is `seed` itself).

    Hashed through `SeedSequence` so restarted envs do not replay another worker's seed stream.
    """
    if restart == 0:
        return int(seed)
    return int(np.random.SeedSequence([int(seed), int(restart)]).generate_state(1)[0] % (2**31))


def _format_exception(exc: BaseException) -> str:
    """'Type: message', followed by the worker's traceback unless it is a user error (bad input)."""
    summary = f"{type(exc).__name__}: {exc}"
    if isinstance(exc, UserError):
        return summary
    trace = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__)).rstrip()
    return f"{summary}\nWorker traceback:\n{trace}"


def _worker_main(conn: multiprocessing.connection.Connection, make_env: Callable[[int], Env], seed: int) -> None:
    """Worker process body: build the env, then answer reset/step requests until told to close."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle; it closes us
    try:
        env = make_env(seed)
    except BaseException as exc:  # noqa: BLE001 -- reported to the parent, which raises it
        conn.send(("error", _format_exception(exc)))
        conn.close()
        return
    try:
        conn.send(("ready", None))
        while True:
            try:
                command, payload = conn.recv()
            except (EOFError, OSError):  # the parent is gone
                break
            if command == "close":
                break
            try:
                obs = env.reset() if command == "reset" else env.step(payload)
                conn.send(("ok", obs))
            except Exception as exc:  # noqa: BLE001 -- the env may be broken now: report and exit
                try:
                    conn.send(("error", _format_exception(exc)))
                except (OSError, ValueError):
                    pass
                break
    finally:
        try:
            env.close()  # frees the GL context before exit (no EGL tracebacks from __del__)
        except Exception:  # noqa: BLE001
            pass
        conn.close()


def _stack(observations: Sequence[dict]) -> dict[str, np.ndarray]:
    """List of N obs dicts -> dict of arrays with a leading axis N (dtypes per `_STACK_DTYPES`)."""
    return {
        key: np.stack([np.asarray(obs[key], dtype=_STACK_DTYPES.get(key)) for obs in observations])
        for key in observations[0]
    }


class ParallelEnvs:
    """N environments, each in its own spawned process, stepped concurrently.

    Worker i builds `make_env(seeds[i])`, so two `ParallelEnvs` with the same seeds produce the same
    observations for the same actions. Attributes: `restarts` (workers restarted so far, in total),
    `start_seconds` (wall time the constructor took to bring all workers up).
    """

    max_restarts_in_a_row: int = 3

    def __init__(
        self,
        make_env: Callable[[int], Env],
        seeds: Sequence[int],
        step_timeout: float = 60.0,
        start_timeout: float = 300.0,
    ) -> None:
        seeds = [int(s) for s in seeds]
        if not seeds:
            raise ValueError("ParallelEnvs needs at least one seed (one per worker)")
        if any(s < 0 for s in seeds):
            raise ValueError(f"seeds must be non-negative integers, got {seeds}")
        if step_timeout <= 0 or start_timeout <= 0:
            raise ValueError(
                f"timeouts must be positive, got step_timeout={step_timeout}, start_timeout={start_timeout}"
            )
        self._make_env = make_env
        self._seeds = seeds
        self._step_timeout = float(step_timeout)
        self._start_timeout = float(start_timeout)
        self._ctx = multiprocessing.get_context("spawn")
        n = len(seeds)
        self._procs: list[Any] = [None] * n
        self._conns: list[Any] = [None] * n
        self._worker_restarts = [0] * n  # restarts of worker i (its current env has seed restart_seed(...))
        self._needs_reset = [True] * n  # Dreamer driver: an env whose last obs had is_last is reset
        self.restarts = 0
        self._closed = False

        start = time.perf_counter()
        try:
            pending = list(range(n))
            for attempt in range(1, self.max_restarts_in_a_row + 1):
                failures = self._start(pending)
                for i, (cause, raised) in failures.items():
                    if raised:  # make_env itself raised: a deterministic user error, do not retry
                        raise EnvWorkerError(f"Environment worker {i} (seed {seeds[i]}) failed to start: {cause}")
                pending = sorted(failures)
                if not pending:
                    break
                if attempt == self.max_restarts_in_a_row:
                    causes = "; ".join(f"worker {i}: {failures[i][0]}" for i in pending)
                    raise EnvWorkerError(f"Environment workers failed to start {attempt} times in a row: {causes}")
        except BaseException:
            self.close()
            raise
        self.start_seconds = time.perf_counter() - start

    # ----------------------------------------------------------------------------------------------
    # public API

    @property
    def num_envs(self) -> int:
        return len(self._seeds)

    @property
    def worker_pids(self) -> list[int | None]:
        """Process ids of the current workers (for logging and for checking that close() reaps them)."""
        return [None if proc is None else proc.pid for proc in self._procs]

    def reset(self) -> dict[str, np.ndarray]:
        """Reset every env; stacked obs (image [N,H,W,3] uint8, reward float32 [N], flags bool [N])."""
        self._check_open()
        obs, _ = self._exchange([("reset", None)] * self.num_envs)
        return obs

    def step(self, actions: np.ndarray) -> tuple[dict[str, np.ndarray], np.ndarray]:
        """Step all envs at once with `actions` [N, A]; returns (stacked obs, dropped bool [N]).

        An env whose previous obs had `is_last` (or that was never reset) is reset instead and its
        action ignored. `dropped[i]` is True when worker i faulted and was restarted: its obs is the
        reset obs of a fresh env, and the caller should discard env i's episode in progress.
        """
        self._check_open()
        actions = np.asarray(actions, dtype=np.float32)
        if actions.ndim != 2 or actions.shape[0] != self.num_envs:
            raise ValueError(f"actions must have shape [num_envs={self.num_envs}, action_dim], got {actions.shape}")
        if not np.all(np.isfinite(actions)):  # a caller bug, not a worker fault: do not restart for it
            raise ValueError(f"actions must be finite, got {actions}")
        commands = [
            ("reset", None) if self._needs_reset[i] else ("step", actions[i].copy()) for i in range(self.num_envs)
        ]
        return self._exchange(commands)

    def close(self) -> None:
        """Stop every worker (politely, then by force); safe to call twice. Leaves no child processes."""
        if getattr(self, "_closed", True):
            return
        self._closed = True
        for conn in self._conns:
            if conn is not None:
                try:
                    conn.send(("close", None))
                except (OSError, ValueError):
                    pass
        deadline = time.monotonic() + 5.0
        for i in range(len(self._procs)):
            proc = self._procs[i]
            if proc is not None:
                proc.join(max(0.0, deadline - time.monotonic()))
            self._kill(i)

    def __enter__(self) -> "ParallelEnvs":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ----------------------------------------------------------------------------------------------
    # internals

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("ParallelEnvs was closed")

    def _current_seed(self, i: int) -> int:
        return restart_seed(self._seeds[i], self._worker_restarts[i])

    def _kill(self, i: int) -> None:
        """Kill worker i (if running), reap it and close its pipe."""
        proc, conn = self._procs[i], self._conns[i]
        self._procs[i] = self._conns[i] = None
        if proc is not None:
            if proc.is_alive():
                proc.kill()
            proc.join(5.0)
            try:
                proc.close()
            except ValueError:  # still running after SIGKILL + 5 s: leave it to the OS
                pass
        if conn is not None:
            conn.close()

    def _start(self, indices: Sequence[int]) -> dict[int, tuple[str, bool]]:
        """Spawn workers `indices` concurrently and wait until each env is built.

        Returns {i: (cause, make_env_raised)} for those that failed (and were cleaned up).
        """
        for i in indices:
            parent_conn, child_conn = self._ctx.Pipe(duplex=True)
            proc = self._ctx.Process(
                target=_worker_main,
                args=(child_conn, self._make_env, self._current_seed(i)),
                name=f"env-worker-{i}",
                daemon=True,
            )
            proc.start()
            child_conn.close()  # only the child holds this end now, so its death reads as EOF here
            self._procs[i], self._conns[i] = proc, parent_conn
        replies = self._receive(indices, self._start_timeout, "start")
        failures = {}
        for i, (kind, payload) in replies.items():
            if kind != "ready":
                failures[i] = (payload, kind == "error")
                self._kill(i)
        return failures

    def _receive(self, indices: Sequence[int], timeout: float, what: str) -> dict[int, tuple[str, Any]]:
        """Collect one reply from each worker in `indices` within `timeout` seconds (all at once).

        Returns {i: (kind, payload)}, kind in {'ready', 'ok', 'error', 'died', 'timeout'}; for the last
        three the payload is a human-readable cause.
        """
        replies: dict[int, tuple[str, Any]] = {}
        pending = {self._conns[i]: i for i in indices if self._conns[i] is not None}
        for i in indices:
            if self._conns[i] is None:
                replies[i] = ("died", "worker was not running")
        deadline = time.monotonic() + timeout
        while pending:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            for conn in multiprocessing.connection.wait(list(pending), remaining):
                i = pending.pop(conn)
                try:
                    kind, payload = conn.recv()
                except (EOFError, OSError):
                    proc = self._procs[i]
                    proc.join(1.0)
                    replies[i] = ("died", f"process died during {what} (exit code {proc.exitcode})")
                    continue
                except Exception as exc:  # noqa: BLE001 -- e.g. an obs that cannot be unpickled here
                    replies[i] = ("error", f"unreadable reply during {what}: {type(exc).__name__}: {exc}")
                    continue
                if kind == "error":
                    payload = f"exception during {what}: {payload}"
                replies[i] = (kind, payload)
        for i in pending.values():
            replies[i] = ("timeout", f"no answer within {timeout:g} s during {what}")
        return replies

    def _exchange(self, commands: Sequence[tuple[str, Any]]) -> tuple[dict[str, np.ndarray], np.ndarray]:
        """Send commands[i] to every worker, then collect all replies; restart the workers that fault."""
        n = self.num_envs
        failed: dict[int, str] = {}
        for i, message in enumerate(commands):
            try:
                self._conns[i].send(message)
            except (OSError, ValueError) as exc:
                failed[i] = f"could not send {message[0]}: {type(exc).__name__}: {exc}"
        sent = [i for i in range(n) if i not in failed]
        observations: list[dict | None] = [None] * n
        for i, (kind, payload) in self._receive(sent, self._step_timeout, "step").items():
            if kind == "ok":
                observations[i] = payload
            else:
                failed[i] = payload
        dropped = np.zeros(n, dtype=bool)
        for i, obs in self._restart(failed).items():
            observations[i] = obs
            dropped[i] = True
        for i, obs in enumerate(observations):
            self._needs_reset[i] = bool(obs["is_last"])
        return _stack(observations), dropped

    def _restart(self, failed: dict[int, str]) -> dict[int, dict]:
        """Replace each faulted worker by a fresh one and reset its env; returns {i: reset obs}."""
        resets: dict[int, dict] = {}
        in_a_row = dict.fromkeys(failed, 0)
        while failed:
            for i, cause in sorted(failed.items()):
                self._kill(i)
                self._worker_restarts[i] += 1
                self.restarts += 1
                warnings.warn(
                    EnvWorkerWarning(
                        f"Environment worker {i} (seed {self._seeds[i]}) faulted: {cause}. Restarting it with "
                        f"seed {self._current_seed(i)} (restart {self._worker_restarts[i]} of this worker, "
                        f"{self.restarts} in total); its episode in progress is dropped."
                    ),
                    stacklevel=4,
                )
            starting = sorted(failed)
            next_failed = {i: cause for i, (cause, _) in self._start(starting).items()}
            started = [i for i in starting if i not in next_failed]
            for i in started:
                try:
                    self._conns[i].send(("reset", None))
                except (OSError, ValueError) as exc:
                    next_failed[i] = f"could not send reset: {type(exc).__name__}: {exc}"
            for i, (kind, payload) in self._receive(
                [i for i in started if i not in next_failed], self._step_timeout, "reset after restart"
            ).items():
                if kind == "ok":
                    resets[i] = payload
                else:
                    next_failed[i] = payload
            for i in next_failed:
                in_a_row[i] += 1
                if in_a_row[i] >= self.max_restarts_in_a_row:
                    raise EnvWorkerError(
                        f"Environment worker {i} (seed {self._seeds[i]}) failed {in_a_row[i]} restarts in a row; "
                        f"last cause: {next_failed[i]}"
                    )
            failed = next_failed
        return resets


def benchmark_envs(
    make_env: Callable[[int], Env],
    num_workers: int,
    steps: int,
    seed: int = 0,
    action_dim: int = 4,
) -> dict[str, float]:
    """Time `num_workers` workers taking `steps` random steps each (actions uniform in [-1, 1]).

    Returns {'fps': env frames per second over the steps (auto-resets count: each renders a frame),
    'fps_per_worker', 'start_seconds': constructor wall time (spawn, imports, env construction),
    'reset_seconds': the first reset, 'step_seconds': the timed steps, 'restarts'}.
    """
    if num_workers < 1 or steps < 1:
        raise ValueError(f"num_workers and steps must be >= 1, got {num_workers} and {steps}")
    rng = np.random.default_rng(seed)
    actions = rng.uniform(-1.0, 1.0, size=(steps, num_workers, action_dim)).astype(np.float32)  # [T, N, A]
    with ParallelEnvs(make_env, [seed + i for i in range(num_workers)]) as envs:
        start = time.perf_counter()
        envs.reset()
        reset_seconds = time.perf_counter() - start
        start = time.perf_counter()
        for t in range(steps):
            envs.step(actions[t])
        step_seconds = time.perf_counter() - start
        fps = steps * num_workers / step_seconds
        return {
            "fps": fps,
            "fps_per_worker": fps / num_workers,
            "start_seconds": envs.start_seconds,
            "reset_seconds": reset_seconds,
            "step_seconds": step_seconds,
            "restarts": float(envs.restarts),
        }


def measure_fps(
    make_env: Callable[[int], Env],
    num_workers: int,
    steps: int,
    seed: int = 0,
    action_dim: int = 4,
) -> float:
    """Environment frames per second of `num_workers` workers taking `steps` random steps each.

    Actions are uniform in [-1, 1]; auto-resets count as frames (each renders one). Worker start-up
    and the first reset are excluded.
    """
    return benchmark_envs(make_env, num_workers, steps, seed=seed, action_dim=action_dim)["fps"]
