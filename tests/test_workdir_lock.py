"""A run owns its workdir (``prelar_jax.runtime.workdir_lock``; README "Reliability").

The holder is a real second process (the lock is a kernel ``flock``: only another process shows
whether it excludes, and only a real SIGKILL shows that a dead holder's lock does not block).
The CLI case (two pre-training processes on one workdir, and the resume after SIGKILL) is in
``tests/test_kill_resume.py``.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest

from prelar_jax.runtime import workdir_lock
from prelar_jax.launch import runner

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_HOLDER = """
import sys, time
sys.path.insert(0, {root!r})
from prelar_jax.runtime import workdir_lock
workdir_lock.acquire({path!r}, "test holder")
print("locked", flush=True)
time.sleep(600)
"""


class Holder:
    """A process that takes the lock on ``path`` and sleeps."""

    def __init__(self, path):
        os.makedirs(path, exist_ok=True)
        self.proc = subprocess.Popen(
            [sys.executable, "-c", _HOLDER.format(root=ROOT, path=str(path))], stdout=subprocess.PIPE, text=True
        )
        assert self.proc.stdout.readline().strip() == "locked"

    def kill(self):
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=30)


@pytest.fixture
def holder(tmp_path):
    held = Holder(tmp_path / "work")
    yield held
    if held.proc.poll() is None:
        held.kill()


def test_a_second_process_is_refused_with_the_holder_named_and_nothing_changed(holder, tmp_path):
    work = tmp_path / "work"
    (work / "metrics.jsonl").write_text("untouched\n")
    with pytest.raises(workdir_lock.WorkdirBusyError) as info:
        with workdir_lock.hold(str(work), "pre-training"):
            pytest.fail("entered a workdir another process holds")
    message = str(info.value)
    assert f"pid {holder.proc.pid} on host " in message and "running since" in message
    assert "pre-training changed nothing" in message and "--workdir" in message
    assert (work / "metrics.jsonl").read_text() == "untouched\n"
    assert f"pid {holder.proc.pid}" in workdir_lock.holder(str(work))


def test_the_lock_of_a_sigkilled_holder_does_not_block_the_rerun(holder, tmp_path):
    work = tmp_path / "work"
    holder.kill()
    # The file still names the dead holder: only the kernel lock decides, and it went with it.
    assert json.loads((work / workdir_lock.LOCK_FILE).read_text())["pid"] == holder.proc.pid
    assert workdir_lock.holder(str(work)) is None
    with workdir_lock.hold(str(work), "pre-training") as path:
        assert json.loads((work / workdir_lock.LOCK_FILE).read_text())["pid"] == os.getpid()
        assert path == str(work)
    assert (work / workdir_lock.LOCK_FILE).read_text() == ""  # released: names nobody


def test_the_lock_is_reentrant_in_one_process_and_released_by_the_last_hold(tmp_path):
    work = str(tmp_path / "work")
    with workdir_lock.hold(work, "benchmark"):
        with workdir_lock.hold(work, "runner"):  # e.g. the runner on the benchmark's own directory
            pass
        # Still held by the outer block: another process is refused.
        probe = subprocess.run(
            [
                sys.executable,
                "-c",
                (
                    f"import sys; sys.path.insert(0, {ROOT!r}); from prelar_jax.runtime import workdir_lock as w\n"
                    f"try:\n    w.acquire({work!r})\nexcept w.WorkdirBusyError as e:\n    print('busy', e)"
                ),
            ],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert probe.stdout.startswith("busy") and f"pid {os.getpid()}" in probe.stdout, probe
    assert workdir_lock.holder(work) is None
    with workdir_lock.hold(work):  # free again
        pass


def _spec(tmp_path, name, seconds=0.0):
    workdir = tmp_path / "runs" / name
    code = (
        f"import json, os, time; time.sleep({seconds}); os.makedirs({str(workdir)!r}, exist_ok=True); "
        f"json.dump({{'finished': True}}, open(os.path.join({str(workdir)!r}, 'summary.json'), 'w'))"
    )
    return runner.RunSpec(name=name, command=[sys.executable, "-c", code], workdir=str(workdir))


def test_a_second_runner_on_the_same_output_directory_is_refused(tmp_path):
    logs = tmp_path / "logs"
    held = Holder(logs)  # stands for a runner already working in that directory
    try:
        with pytest.raises(workdir_lock.WorkdirBusyError, match=f"pid {held.proc.pid}"):
            runner.run_all([_spec(tmp_path, "a")], 1, str(logs), echo=lambda _: None)
        assert not (tmp_path / "runs" / "a").exists() and not (logs / runner.RUNS_JSON).exists()
    finally:
        held.kill()


def test_the_runner_leaves_a_run_whose_workdir_another_process_holds(tmp_path):
    busy, free = _spec(tmp_path, "busy"), _spec(tmp_path, "free")
    held = Holder(busy.workdir)
    lines: list[str] = []
    try:
        results = runner.run_all([busy, free], 2, str(tmp_path / "logs"), echo=lines.append)
    finally:
        held.kill()
    status = {r.name: r.status for r in results}
    assert status == {"busy": runner.NOT_STARTED, "free": runner.FINISHED}, lines
    assert any(f"skip     busy: not started, its workdir is in use by pid {held.proc.pid}" in line for line in lines)
    assert not os.path.exists(os.path.join(busy.workdir, runner.RUN_LOG))  # nothing started there
