"""Reliability of the training CLIs under process kills and signals, and run determinism.

The CLIs run as subprocesses (one CPU device, the test session's compile cache) and are killed
with SIGKILL at seeded random moments, once right while orbax is writing a checkpoint, or stopped
with SIGTERM. What must hold afterwards, and why it matters:

- a re-run of the same command resumes at the newest *finished* checkpoint (a half-written
  ``<step>.orbax-checkpoint-tmp`` directory is never taken for one) and finishes the run;
- pre-training resumed after kills ends with exactly the state and the metric values of an
  uninterrupted run (batches are a function of (seed, step), the RNG of the step counter);
- ``metrics.jsonl`` never holds a step twice (pre-training) or a kind of line twice for one step
  after the resume point (fine-tuning), and what was logged before the checkpoint is kept as is;
- fine-tuning counters and replay in the final checkpoint add up as in an uninterrupted run;
- environment workers of a killed run exit by themselves, and a finished run leaves none;
- SIGTERM saves a checkpoint at the current environment step and exits with status 0;
- a second process on a running run's workdir is refused at once (the run goes on unharmed), and
  the lock a SIGKILLed run leaves behind does not block the re-runs that resume it.

Every subprocess wait has a time-out, so a hang fails the test instead of blocking CI.
"""

from __future__ import annotations

import collections
import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from prelar_jax.runtime import checkpoint, config as config_lib, workdir_lock
from tests.test_pretrain_loop import restore_state, tiny_config, write_moving_squares

ROOT = Path(__file__).resolve().parent.parent
TMP_MARK = ".orbax-checkpoint-tmp"
# Generous for a loaded 2-core CI machine; a run that takes longer is a hang.
RUN_TIMEOUT = 420.0
EVENT_TIMEOUT = 300.0
# Metrics that measure time, not computation: they legitimately differ between runs.
TIMING_KEYS = re.compile(r"^(perf/.*|fps/.*|updates/s|compile_seconds|eval/seconds)$")

pytestmark = [
    pytest.mark.slow,  # subprocesses: skipped by -m "not slow"
    pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="process checks read /proc (Linux)"),
]


# ------------------------------------------------------------------------------------------- helpers


def subprocess_env() -> dict[str, str]:
    """The test session's environment for a CLI run on one CPU device, sharing the compile cache."""
    env = dict(os.environ)
    env.update(
        JAX_PLATFORMS="cpu", WANDB_MODE="disabled", MUJOCO_GL="egl", PYOPENGL_PLATFORM="egl", PYTHONUNBUFFERED="1"
    )
    flags = re.sub(r"--xla_force_host_platform_device_count=\d+", "", env.get("XLA_FLAGS", "")).strip()
    env["XLA_FLAGS"] = flags
    # conftest.py sets JAX_COMPILATION_CACHE_DIR before this module is imported; it is inherited.
    assert env.get("JAX_COMPILATION_CACHE_DIR"), "tests/conftest.py should set JAX_COMPILATION_CACHE_DIR"
    return env


class Run:
    """One CLI process with its console output in a file (a pipe nobody reads could block it)."""

    def __init__(self, command: list[str], log_path: Path):
        self.command, self.log_path = command, log_path
        self.log_file = open(log_path, "w", encoding="utf-8")
        self.proc = subprocess.Popen(
            command,
            cwd=ROOT,
            env=subprocess_env(),
            stdout=self.log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self.children: dict[int, int] = {}  # pid -> start time of every child process seen

    def output(self) -> str:
        if not self.log_file.closed:
            self.log_file.flush()
        return self.log_path.read_text(encoding="utf-8", errors="replace")

    def tail(self, chars: int = 4000) -> str:
        return f"\n--- output of {' '.join(self.command[1:3])} (tail) ---\n{self.output()[-chars:]}"

    def note_children(self) -> None:
        if self.proc.poll() is None:
            self.children.update(child_processes(self.proc.pid))

    def wait_for(self, condition, what: str, timeout: float = EVENT_TIMEOUT, poll: float = 0.01):
        """Polls ``condition()`` until it returns something truthy; fails if the run exits or hangs."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = condition()
            if value:
                return value
            self.note_children()
            if self.proc.poll() is not None:
                value = condition()
                if value:
                    return value
                pytest.fail(f"the run exited (status {self.proc.returncode}) before {what}" + self.tail())
            time.sleep(poll)
        self.kill()
        pytest.fail(f"no {what} within {timeout:g} s" + self.tail())

    def wait(self, timeout: float = RUN_TIMEOUT) -> int:
        """Waits for the exit (noting child processes meanwhile); a run past ``timeout`` is a hang."""
        deadline = time.monotonic() + timeout
        while self.proc.poll() is None:
            if time.monotonic() > deadline:
                self.kill()
                pytest.fail(f"the run did not exit within {timeout:g} s" + self.tail())
            self.note_children()
            time.sleep(0.2)
        self.log_file.close()
        return self.proc.returncode

    def kill(self) -> None:
        """SIGKILL to the CLI process only (its workers must notice by themselves)."""
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=60)
        self.log_file.close()


def _stat(pid: int) -> tuple[str, int, int] | None:
    """(state, parent pid, start time) of a process from /proc, None when it is gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    fields = text[text.rindex(")") + 2 :].split()  # after "pid (comm) "
    return fields[0], int(fields[1]), int(fields[19])


def child_processes(pid: int) -> dict[int, int]:
    """Direct children of ``pid``: {child pid: start time} (the start time guards against pid reuse)."""
    children = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            stat = _stat(int(entry))
            if stat is not None and stat[1] == pid:
                children[int(entry)] = stat[2]
    return children


def alive(processes: dict[int, int]) -> dict[int, str]:
    """The processes of ``processes`` still running (zombies have exited): {pid: command line}."""
    running = {}
    for pid, start in processes.items():
        stat = _stat(pid)
        if stat is not None and stat[2] == start and stat[0] not in ("Z", "X"):
            try:
                running[pid] = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()[:200]
            except OSError:
                running[pid] = "?"
    return running


def assert_processes_exit(processes: dict[int, int], within: float, what: str) -> None:
    deadline = time.monotonic() + within
    while alive(processes) and time.monotonic() < deadline:
        time.sleep(0.1)
    left = alive(processes)
    if left:
        for pid in left:  # do not leave them behind for the rest of the session
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    assert not left, f"{what}: these child processes were still running after {within:g} s: {left}"


def finished_steps(checkpoints: Path) -> list[int]:
    """Steps with a complete (renamed) checkpoint directory, as orbax lists them."""
    if not checkpoints.is_dir():
        return []
    return sorted(int(p.name) for p in checkpoints.iterdir() if p.name.isdigit())


def temporary_dirs(checkpoints: Path) -> list[str]:
    if not checkpoints.is_dir():
        return []
    return sorted(p.name for p in checkpoints.iterdir() if TMP_MARK in p.name)


def read_metrics(workdir: Path, killed: bool = False) -> list[dict]:
    """The lines of ``metrics.jsonl``; a killed run's last line may be cut short (``killed``: skip it)."""
    rows = []
    with open(workdir / "metrics.jsonl", encoding="utf-8") as handle:
        lines = handle.read().split("\n")
    for number, line in enumerate(lines):
        if not line and number == len(lines) - 1:
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            if not (killed and number == len(lines) - 1):
                raise
    return rows


def without_timing(record: dict) -> dict:
    return {k: v for k, v in record.items() if not TIMING_KEYS.match(k)}


def line_kind(record: dict) -> str:
    """Which logging call wrote a fine-tuning metrics line."""
    for key, kind in (
        ("eval/success_rate", "eval"),
        ("train/return", "train"),
        ("model_loss", "update"),
        ("compile_seconds", "setup"),
    ):
        if key in record:
            return kind
    return "other:" + ",".join(sorted(record))


# ------------------------------------------------------------------------------------ pre-training


def pretrain_command(data_root: Path, workdir: Path, steps: int, checkpoint_every: int = 5) -> list[str]:
    return [
        sys.executable,
        str(ROOT / "experiments" / "pretrain.py"),
        "--config=configs/prelar_pretrain.py:tiny",
        f"--config.data.root={data_root}",
        f"--config.steps={steps}",
        "--config.log.every=1",
        f"--config.log.checkpoint_every={checkpoint_every}",
        "--config.log.media_every=100000",
        "--config.log.wandb_mode=disabled",
        f"--workdir={workdir}",
    ]


def test_pretrain_killed_twice_resumes_to_the_uninterrupted_result(tmp_path):
    """SIGKILL at a random moment after the first checkpoint, then SIGKILL again while orbax writes a
    checkpoint; the third run of the same command must end exactly where an uninterrupted run does."""
    steps = 20
    rng = random.Random(20240611)
    videos = Path(write_moving_squares(str(tmp_path / "videos")))
    reference_dir, workdir = tmp_path / "reference", tmp_path / "killed"
    checkpoints = workdir / "checkpoints"
    # The uninterrupted run goes on in parallel with the killed ones.
    reference = Run(pretrain_command(videos, reference_dir, steps), tmp_path / "reference.log")
    try:
        # A second process on the running reference's workdir: refused at once, naming the holder,
        # before it writes anything (the reference's metrics and checkpoints are checked below).
        lock_file = reference_dir / workdir_lock.LOCK_FILE
        reference.wait_for(lambda: lock_file.exists() and lock_file.read_text(), "the reference's workdir lock")
        duplicate = Run(pretrain_command(videos, reference_dir, steps), tmp_path / "duplicate.log")
        assert duplicate.wait() == 2, duplicate.tail()
        assert f"is in use by pid {reference.proc.pid} on host" in duplicate.output(), duplicate.tail()
        assert "Traceback" not in duplicate.output(), duplicate.tail()
        assert reference.proc.poll() is None, "the reference finished before the duplicate could be checked"

        # Kill 1: at a random moment once the first checkpoint is complete.
        first = Run(pretrain_command(videos, workdir, steps), tmp_path / "run1.log")
        first.wait_for(lambda: finished_steps(checkpoints), "first finished checkpoint")
        time.sleep(rng.uniform(0.0, 1.5))
        assert first.proc.poll() is None, "the run finished before it could be killed" + first.tail()
        first.kill()
        assert first.proc.returncode == -signal.SIGKILL
        after_first = checkpoint.read_metadata(checkpoints)["step"]
        assert after_first >= 5 and after_first % 5 == 0
        # The killed run's lock file is left behind naming it; the re-runs below must not be blocked.
        assert json.loads((workdir / workdir_lock.LOCK_FILE).read_text())["pid"] == first.proc.pid

        # Kill 2: right after a new checkpoint's temporary directory appears (an async save in flight).
        second = Run(pretrain_command(videos, workdir, steps), tmp_path / "run2.log")
        second.wait_for(
            lambda: f"resumed from checkpoint at step {after_first}" in second.output(),
            f"'resumed from checkpoint at step {after_first}' (tmp dirs are cleaned before it)",
        )
        in_flight = second.wait_for(lambda: temporary_dirs(checkpoints), "a checkpoint being written")
        time.sleep(rng.uniform(0.0, 0.1))
        second.kill()
        assert second.proc.returncode == -signal.SIGKILL
        in_flight_step = int(in_flight[0].split(".")[0])
        assert in_flight_step > after_first
        left_behind = temporary_dirs(checkpoints)
        assert left_behind, (
            f"the kill missed the save of step {in_flight_step} (it completed); "
            "the test cannot check half-written checkpoints" + second.tail()
        )
        # What a resumed run sees as latest: a finished step, never the half-written one.
        latest = checkpoint.read_metadata(checkpoints)["step"]
        assert latest == max(finished_steps(checkpoints)) and latest < in_flight_step
        assert in_flight_step not in finished_steps(checkpoints)

        # Third run of the same command: resumes at `latest`, removes the tmp dir, finishes.
        third = Run(pretrain_command(videos, workdir, steps), tmp_path / "run3.log")
        assert third.wait() == 0, third.tail()
        assert f"resumed from checkpoint at step {latest}" in third.output(), third.tail()
        assert f"finished at step {steps}/{steps}" in third.output(), third.tail()
        assert temporary_dirs(checkpoints) == []
        assert finished_steps(checkpoints)[-1] == steps
        assert reference.wait() == 0, reference.tail()
    finally:
        reference.kill()

    # The state after two kills equals the uninterrupted run's, bit for bit.
    config = tiny_config(str(videos))
    killed_state, reference_state = restore_state(config, str(workdir)), restore_state(config, str(reference_dir))
    assert int(killed_state.step) == int(reference_state.step) == steps
    leaves_a = jax.tree_util.tree_leaves_with_path(killed_state)
    leaves_b = jax.tree_util.tree_leaves_with_path(reference_state)
    assert len(leaves_a) == len(leaves_b)
    for (path, a), (_, b) in zip(leaves_a, leaves_b):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=jax.tree_util.keystr(path))

    # metrics.jsonl: every step once, in order, with the uninterrupted run's values.
    killed_rows, reference_rows = read_metrics(workdir), read_metrics(reference_dir)
    logged = [r["step"] for r in killed_rows]
    assert logged == sorted(set(logged)), f"steps not strictly increasing (a step logged twice?): {logged}"
    assert logged == [r["step"] for r in reference_rows] == list(range(0, steps + 1))
    for a, b in zip(killed_rows, reference_rows):
        assert without_timing(a) == without_timing(b), f"step {a['step']} differs from the uninterrupted run"


def test_pretraining_with_one_seed_is_deterministic(tmp_path):
    """Two runs of the same command (at the same time, as two processes) log identical values,
    timings aside, and end in identical states: nothing depends on wall time or thread order."""
    steps = 4
    videos = Path(write_moving_squares(str(tmp_path / "videos")))
    names = ("a", "b")
    runs = [
        Run(pretrain_command(videos, tmp_path / name, steps, checkpoint_every=2), tmp_path / f"{name}.log")
        for name in names
    ]
    try:
        for run in runs:
            assert run.wait() == 0, run.tail()
    finally:
        for run in runs:
            run.kill()
    rows = [read_metrics(tmp_path / name) for name in names]
    losses = [r["loss"] for r in rows[0] if "loss" in r]
    # Not vacuous: every step was logged, and the loss changes from step to step (other batches).
    assert len(losses) == steps and len(set(losses)) == steps and all(np.isfinite(losses))
    assert [r["step"] for r in rows[0]] == [r["step"] for r in rows[1]] == list(range(steps + 1))
    for a, b in zip(*rows):
        assert without_timing(a) == without_timing(b), f"step {a['step']} differs between identical runs"
    config = tiny_config(str(videos))
    states = [jax.tree.map(np.asarray, restore_state(config, str(tmp_path / name))) for name in names]
    assert int(states[0].step) == steps
    jax.tree.map(np.testing.assert_array_equal, states[0], states[1])


# ------------------------------------------------------------------------------------- fine-tuning


def finetune_command(workdir: Path, steps: int, checkpoint_every: int, **extra) -> list[str]:
    flags = {
        "steps": steps,
        "log.checkpoint_every": checkpoint_every,
        "env.time_limit": 50,
        "log.wandb_mode": "disabled",
        **extra,
    }
    return (
        [sys.executable, str(ROOT / "experiments" / "finetune.py"), "--config=configs/dreamerv2.py:tiny"]
        + [f"--config.{k}={v}" for k, v in flags.items()]
        + [f"--workdir={workdir}"]
    )


def tiny_finetune_config():
    return config_lib.load_config("configs/dreamerv2.py:tiny", {"env.time_limit": 50})


def expected_updates(config, env_step: int) -> tuple[int, int]:
    """(updates, train_credit) in a checkpoint saved at ``env_step`` (one environment): ``pretrain``
    warm-up updates on reaching ``prefill`` (before that step's checkpoint), then ``train_steps``
    updates per ``train_every`` steps after it, the remainder kept as credit."""
    if env_step < config.prefill:
        return 0, 0
    due, credit = divmod(env_step - config.prefill, config.train_every)
    return config.pretrain + due * config.train_steps, credit


def check_final_counters(config, metadata: dict, steps: int) -> None:
    counters = metadata["counters"]
    assert metadata["step"] == counters["env_step"] == steps
    updates, credit = expected_updates(config, steps)
    assert (counters["updates"], counters["train_credit"]) == (updates, credit), counters
    assert counters["warmed_up"] == 1 and counters["worker_restarts"] == 0, counters
    # Evaluations counted by the schedule: at prefill, then every eval_every steps up to the end.
    assert counters["evals"] == (steps - config.prefill) // config.eval_every + 1, counters


def test_finetune_sigkill_resumes_at_the_checkpoint(tmp_path):
    """SIGKILL at a random moment after the first checkpoint; the workers exit by themselves and a
    re-run resumes at the checkpoint's environment step, keeping its replay and counters."""
    steps, every = 400, 100
    config = tiny_finetune_config()
    rng = random.Random(7)
    workdir = tmp_path / "run"
    checkpoints = workdir / "checkpoints"
    command = finetune_command(workdir, steps, every)

    first = Run(command, tmp_path / "run1.log")
    first.wait_for(lambda: finished_steps(checkpoints), "first finished checkpoint")
    time.sleep(rng.uniform(0.0, 2.0))
    first.note_children()
    workers = dict(first.children)
    assert first.proc.poll() is None, "the run finished before it could be killed" + first.tail()
    assert len(alive(workers)) >= 2, f"expected a training and an evaluation worker, saw {alive(workers)}"
    first.kill()
    # Spawned workers whose parent died see EOF on their pipe and exit.
    assert_processes_exit(workers, within=15.0, what="after SIGKILL of the fine-tuning run")

    killed_metadata = checkpoint.read_metadata(checkpoints)
    resume_step = killed_metadata["step"]
    assert resume_step == killed_metadata["counters"]["env_step"] and resume_step % every == 0
    killed_rows = read_metrics(workdir, killed=True)

    second = Run(command, tmp_path / "run2.log")
    assert second.wait() == 0, second.tail()
    output = second.output()
    assert f"resumed at environment step {resume_step} " in output, second.tail()
    if any(r["step"] > resume_step for r in killed_rows):  # lines logged after the checkpoint go
        assert f"resuming at step {resume_step}: removed" in output, second.tail()
    assert f"finished at environment step {steps}/{steps}" in output, second.tail()
    assert second.children, "no worker processes were seen during the re-run"
    assert_processes_exit(second.children, within=10.0, what="after the re-run finished")
    assert temporary_dirs(checkpoints) == []

    metadata = checkpoint.read_metadata(checkpoints)
    check_final_counters(config, metadata, steps)
    # Checkpoints fall on episode boundaries (multiples of time_limit), so no episode was lost.
    assert metadata["counters"]["episodes"] == steps // 50
    saved, final = killed_metadata["replay"]["episodes"], metadata["replay"]["episodes"]
    assert final[: len(saved)] == saved and len(final) == steps // 50
    assert metadata["replay"]["total_episodes"] == steps // 50

    rows = read_metrics(workdir)
    logged = [r["step"] for r in rows]
    assert logged == sorted(logged), f"steps go back: lines after the checkpoint were not removed: {logged}"
    # Lines logged before the checkpoint step are kept as they were.
    assert [r for r in rows if r["step"] < resume_step] == [r for r in killed_rows if r["step"] < resume_step]
    later = collections.Counter((r["step"], line_kind(r)) for r in rows if r["step"] > resume_step)
    assert not [k for k, n in later.items() if n > 1], f"lines logged twice: {later}"
    evals = [r["step"] for r in rows if line_kind(r) == "eval"]
    assert evals[-1] == steps and len([s for s in evals if s > resume_step]) == len(
        {s for s in evals if s > resume_step}
    )


def test_finetune_sigterm_saves_at_the_current_step_and_exits(tmp_path):
    """SIGTERM after the first checkpoint: status 0 soon, a checkpoint at the current environment
    step, no workers left; the same command then finishes the run."""
    steps, every = 300, 100
    config = tiny_finetune_config()
    rng = random.Random(11)
    workdir = tmp_path / "run"
    checkpoints = workdir / "checkpoints"
    command = finetune_command(workdir, steps, every)

    first = Run(command, tmp_path / "run1.log")
    first_step = first.wait_for(lambda: finished_steps(checkpoints), "first finished checkpoint")[0]
    time.sleep(rng.uniform(0.2, 1.0))
    assert first.proc.poll() is None, "the run finished before the signal" + first.tail()
    first.note_children()
    first.proc.send_signal(signal.SIGTERM)
    sent = time.monotonic()
    assert first.wait(timeout=120) == 0, first.tail()
    assert time.monotonic() - sent < 60, "SIGTERM took too long to stop the run"
    output = first.output()
    assert "saving a checkpoint and stopping" in output, first.tail()
    stopped = re.search(r"stopped at environment step (\d+)/", output)
    assert stopped, first.tail()
    assert_processes_exit(first.children, within=10.0, what="after SIGTERM")

    metadata = checkpoint.read_metadata(checkpoints)
    assert metadata["step"] == metadata["counters"]["env_step"] == int(stopped.group(1)) > first_step
    assert metadata["step"] < steps
    updates, credit = expected_updates(config, metadata["step"])
    assert (metadata["counters"]["updates"], metadata["counters"]["train_credit"]) == (updates, credit)
    stopped_rows = read_metrics(workdir)
    assert max(r["step"] for r in stopped_rows) <= metadata["step"]

    second = Run(command, tmp_path / "run2.log")
    assert second.wait() == 0, second.tail()
    assert f"resumed at environment step {metadata['step']} " in second.output(), second.tail()
    assert f"finished at environment step {steps}/{steps}" in second.output(), second.tail()
    final = checkpoint.read_metadata(checkpoints)
    check_final_counters(config, final, steps)
    saved = metadata["replay"]["episodes"]
    assert final["replay"]["episodes"][: len(saved)] == saved
    # Per kind of line, steps only go up (the whole file too: see the test below).
    rows = read_metrics(workdir)
    for kind in ("train", "update", "eval"):
        logged = [r["step"] for r in rows if line_kind(r) == kind]
        assert logged == sorted(set(logged)), f"{kind} lines out of order or twice: {logged}"
    assert [r for r in rows if r["step"] < metadata["step"]] == [
        r for r in stopped_rows if r["step"] < metadata["step"]
    ]


def test_finetune_metrics_lines_are_once_and_in_order_across_a_kill_and_a_rerun(tmp_path):
    """Two runs side by side. A: killed once both the evaluation and the checkpoint at ``prefill``
    are written (the evaluation must come first), then re-run to the end. B: episodes of 51 steps
    (episode ends between updates), run to the end, then the finished run re-run. In both, each kind
    of line appears once per step and steps never go back."""
    steps, prefill = 250, 200
    commands = {
        "A": finetune_command(tmp_path / "A", steps, prefill, prefill=prefill),
        "B": finetune_command(tmp_path / "B", steps, prefill, prefill=prefill, **{"env.time_limit": 51}),
    }
    killed = Run(commands["A"], tmp_path / "A1.log")
    finished = Run(commands["B"], tmp_path / "B1.log")
    reruns = []
    try:
        path, checkpoints = tmp_path / "A" / "metrics.jsonl", tmp_path / "A" / "checkpoints"
        killed.wait_for(
            lambda: (
                prefill in finished_steps(checkpoints) and path.exists() and '"eval/success_rate"' in path.read_text()
            ),
            "the evaluation and checkpoint at prefill",
        )
        killed.kill()
        assert checkpoint.read_metadata(checkpoints)["step"] == prefill
        reruns.append(Run(commands["A"], tmp_path / "A2.log"))
        assert finished.wait() == 0, finished.tail()
        reruns.append(Run(commands["B"], tmp_path / "B2.log"))
        for rerun in reruns:
            assert rerun.wait() == 0, rerun.tail()
    finally:
        for run in (killed, finished, *reruns):
            run.kill()
    problems = []
    for name in "AB":
        rows = read_metrics(tmp_path / name)
        evals = [r["step"] for r in rows if line_kind(r) == "eval"]
        twice = sorted(k for k, n in collections.Counter((r["step"], line_kind(r)) for r in rows).items() if n > 1)
        if evals != [prefill, steps] or twice:
            problems.append(f"run {name}: evaluation steps {evals}, (step, line) logged twice: {twice}")
        logged = [r["step"] for r in rows]
        back = [(a, b) for a, b in zip(logged, logged[1:]) if b < a]
        if back:
            problems.append(f"run {name}: steps go back (previous, next): {back}")
    assert not problems, "\n".join(problems)
