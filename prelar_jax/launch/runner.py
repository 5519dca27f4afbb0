"""Runs many training commands (benchmark cells, sweep points) as subprocesses, a few at a time.

Each run is one command line and one workdir. The training CLIs already resume from their workdir
and write ``summary.json`` with ``"finished"`` at exit, so the runner only has to be idempotent:
a run whose ``summary.json`` says finished is skipped, any other run is started again (and
resumes). One run failing never stops the others; its exit status and the end of its log are
recorded in ``<log_dir>/runs.json``, which is rewritten after every start and finish so that a
runner that is itself killed still leaves an accurate picture.

Ctrl-C or SIGTERM sends SIGTERM to every running training process (which saves a checkpoint and
exits), waits ``grace_seconds`` and then kills what is left, process group included. A second
Ctrl-C kills at once. Children run in their own session, so the terminal's Ctrl-C reaches only
the runner and each child sees exactly one SIGTERM: the training loops treat a second signal as
"stop without saving".

This module imports only the standard library: it is cheap to import and runs anywhere.
"""

from __future__ import annotations

import collections
import csv
import dataclasses
import datetime
import io
import json
import math
import os
import signal
import subprocess
import threading
import time
from typing import Any, Callable, Mapping, Sequence

from prelar_jax.runtime import workdir_lock
from prelar_jax.errors import UserError

SUMMARY_FILE = "summary.json"
METRICS_FILE = "metrics.jsonl"
RUN_LOG = "run.log"
RUNS_JSON = "runs.json"
RESULT_COLUMNS = ("method", "task", "seed", "step", "success_rate", "return")

# Every status a run can end a ``run_all`` call with.
SKIPPED = "skipped: finished"  # summary.json already said finished; nothing was started
FINISHED = "finished"  # exit 0 and summary.json says finished
UNFINISHED = "unfinished"  # exit 0 but summary.json missing or not finished (re-run to resume)
FAILED = "failed"  # non-zero exit, killed by a signal we did not send, or could not start
INTERRUPTED = "interrupted"  # stopped by the runner on Ctrl-C / SIGTERM (re-run to resume)
NOT_STARTED = "not started"  # still waiting when the runner was interrupted, or another process held its workdir
RUNNING = "running"  # only seen in runs.json while run_all is going
STATUSES = (SKIPPED, FINISHED, UNFINISHED, FAILED, INTERRUPTED, NOT_STARTED)


class RunnerError(UserError, ValueError):
    """Run specifications that cannot be executed together (duplicate names or workdirs, ...)."""


@dataclasses.dataclass(frozen=True)
class RunSpec:
    """One run: ``command`` is the full argv (no shell); ``labels`` are free-form metadata
    (``method``, ``task``, ``seed``, the sweep's overrides) carried into ``runs.json`` and used
    by ``collect_results``."""

    name: str
    command: list[str]
    workdir: str
    labels: dict[str, Any] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class RunResult:
    """What happened to one ``RunSpec`` in one ``run_all`` call."""

    name: str
    workdir: str
    status: str
    returncode: int | None = None  # negative: killed by that signal number
    seconds: float = 0.0  # wall time of this attempt
    log_tail: list[str] = dataclasses.field(default_factory=list)  # last lines of this attempt's log
    labels: dict[str, Any] = dataclasses.field(default_factory=dict)
    command: list[str] = dataclasses.field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def read_summary(workdir: str) -> dict[str, Any] | None:
    """``<workdir>/summary.json`` as a dict, or None when missing or unreadable (it is written
    atomically, so unreadable means written by something else; treat it as not finished)."""
    try:
        with open(os.path.join(workdir, SUMMARY_FILE), encoding="utf-8") as handle:
            summary = json.load(handle)
    except (OSError, ValueError):
        return None
    return summary if isinstance(summary, dict) else None


def is_finished(workdir: str) -> bool:
    summary = read_summary(workdir)
    return bool(summary and summary.get("finished") is True)


def _check_specs(specs: Sequence[RunSpec], max_parallel: int) -> None:
    if isinstance(max_parallel, bool) or not isinstance(max_parallel, int) or max_parallel < 1:
        raise RunnerError(f"max_parallel must be a positive integer, got {max_parallel!r}")
    for kind, key in (("name", lambda s: s.name), ("workdir", lambda s: os.path.abspath(s.workdir))):
        seen: dict[str, str] = {}
        for spec in specs:
            value = key(spec)
            if value in seen:
                raise RunnerError(
                    f"two runs share the {kind} {value!r} ({seen[value]!r} and {spec.name!r}); "
                    "every run needs its own name and workdir"
                )
            seen[value] = spec.name
    for spec in specs:
        if not spec.command or not all(isinstance(arg, str) for arg in spec.command):
            raise RunnerError(f"run {spec.name!r}: command must be a non-empty list of strings, got {spec.command!r}")


def _atomic_write_text(path: str, text: str) -> None:
    temporary = f"{path}.tmp{os.getpid()}"
    with open(temporary, "w", encoding="utf-8") as handle:
        handle.write(text)
    os.replace(temporary, path)


def _log_tail(path: str, offset: int, lines: int) -> list[str]:
    """The last ``lines`` non-empty lines written to ``path`` after byte ``offset`` (this attempt
    only), reading at most the last 64 KiB."""
    try:
        with open(path, "rb") as handle:
            handle.seek(max(offset, os.path.getsize(path) - 64 * 1024))
            text = handle.read().decode("utf-8", errors="replace")
    except OSError:
        return []
    return [line for line in text.splitlines() if line.strip()][-lines:]


class _SignalTrap:
    """Counts SIGINT/SIGTERM while installed (main thread only; elsewhere it counts nothing)."""

    def __init__(self):
        self.count = 0  # the loop in run_all polls this; a handler must not do more
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> "_SignalTrap":
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        self.count += 1

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


@dataclasses.dataclass
class _Running:
    spec: RunSpec
    process: subprocess.Popen
    log: io.TextIOBase
    log_path: str
    log_offset: int
    started: float
    terminated: bool = False  # we sent SIGTERM (the runner is stopping)


def run_all(
    specs: Sequence[RunSpec],
    max_parallel: int,
    log_dir: str,
    *,
    grace_seconds: float = 120.0,
    tail_lines: int = 20,
    poll_seconds: float = 0.05,
    env: Mapping[str, str] | None = None,
    cwd: str | None = None,
    echo: Callable[[str], None] | None = None,
    on_end: Callable[[RunSpec, RunResult], None] | None = None,
) -> list[RunResult]:
    """Runs ``specs`` (in order) with at most ``max_parallel`` at once; returns one result per
    spec, in the order given, and writes them to ``<log_dir>/runs.json``.

    ``on_end(spec, result)`` is called as each started run ends (e.g. to archive its results at
    once); an exception from it is reported and does not stop the other runs.

    Output of each run is appended to ``<workdir>/run.log`` (after a header line naming the
    attempt). ``env`` replaces the environment of the children (default: this process's, with
    ``PYTHONUNBUFFERED=1`` so logs stream). ``echo`` receives the progress lines (default: print
    to stdout).
    """
    specs = list(specs)
    _check_specs(specs, max_parallel)
    # One runner per output directory: a second one (another terminal, a re-submitted job) is
    # refused here, naming the first, before it changes anything.
    with workdir_lock.hold(log_dir, "runner"):
        return _run_all(
            specs,
            max_parallel,
            log_dir,
            grace_seconds=grace_seconds,
            tail_lines=tail_lines,
            poll_seconds=poll_seconds,
            env=env,
            cwd=cwd,
            echo=echo,
            on_end=on_end,
        )


def _run_all(
    specs: list[RunSpec],
    max_parallel: int,
    log_dir: str,
    *,
    grace_seconds: float,
    tail_lines: int,
    poll_seconds: float,
    env: Mapping[str, str] | None,
    cwd: str | None,
    echo: Callable[[str], None] | None,
    on_end: Callable[[RunSpec, RunResult], None] | None = None,
) -> list[RunResult]:
    scheduler = _Scheduler(specs, log_dir, echo or (lambda line: print(line, flush=True)), env, cwd, tail_lines, on_end)
    with _SignalTrap() as trap:
        try:
            scheduler.loop(trap, max_parallel, grace_seconds, poll_seconds)
        finally:
            # Reached with runs still going only if the loop itself raised (a bug, a full disk
            # for runs.json): never leave training processes running without their runner.
            scheduler.shutdown(grace_seconds)
    return scheduler.done()


def inherit_niceness(pid: int, niceness: int | None = None) -> bool:
    """Gives a run started in its own session the runner's niceness at the session level too.

    On Linux with scheduler autogroups (the default), each session is its own scheduling group and
    a process's ``nice`` only ranks it within its group, so ``nice -n 19 benchmark.py`` did not make
    its runs (new sessions, so they can be signalled as a group) yield to other work: they took
    half the CPU from a foreground job. Writing the niceness to ``/proc/<pid>/autogroup`` does.
    Best-effort: False where there are no autogroups or the write is refused."""
    niceness = os.nice(0) if niceness is None else niceness
    if niceness <= 0:
        return False
    try:
        with open(f"/proc/{pid}/autogroup", "w") as handle:
            handle.write(str(niceness))
        return True
    except OSError:
        return False


class _Scheduler:
    """The state of one ``run_all``: every run's result, the queue, the running processes."""

    def __init__(self, specs, log_dir, echo, env, cwd, tail_lines, on_end):
        self.specs, self.echo, self.cwd, self.tail_lines, self.on_end = specs, echo, cwd, tail_lines, on_end
        self.child_env = dict(os.environ if env is None else env)
        self.child_env.setdefault("PYTHONUNBUFFERED", "1")
        self.results = {
            spec.name: RunResult(
                spec.name, spec.workdir, NOT_STARTED, labels=dict(spec.labels), command=list(spec.command)
            )
            for spec in specs
        }
        self.runs_json = os.path.join(log_dir, RUNS_JSON)
        self.waiting: collections.deque[RunSpec] = collections.deque(s for s in specs if self._should_start(s))
        self.total = len(self.waiting)
        self.running: dict[str, _Running] = {}
        self.started = self.ended = 0

    def _should_start(self, spec: RunSpec) -> bool:
        if is_finished(spec.workdir):
            self.results[spec.name].status = SKIPPED
            self.echo(f"[runner] skip     {spec.name}: {SUMMARY_FILE} says finished")
            return False
        holder = workdir_lock.holder(spec.workdir)
        if holder is not None:
            # Another process (not this runner) is running it: starting it again would only
            # fail on the workdir lock; leave it to that process.
            result = self.results[spec.name]  # stays NOT_STARTED: nothing here says it finished
            result.log_tail = [f"not started: {spec.workdir} is in use by {holder}"]
            self.echo(f"[runner] skip     {spec.name}: not started, its workdir is in use by {holder}")
            return False
        return True

    def write_runs_json(self) -> None:
        ordered = [self.results[spec.name].to_json() for spec in self.specs]
        counts = collections.Counter(result["status"] for result in ordered)
        payload = {
            "updated": datetime.datetime.now().isoformat(timespec="seconds"),
            "counts": dict(counts),
            "runs": ordered,
        }
        _atomic_write_text(self.runs_json, json.dumps(payload, indent=2, default=str) + "\n")

    def progress(self) -> str:
        return f"[{self.ended}/{self.total} done, {len(self.running)} running, {len(self.waiting)} waiting]"

    def launch(self, spec: RunSpec) -> None:
        os.makedirs(spec.workdir, exist_ok=True)
        log_path = os.path.join(spec.workdir, RUN_LOG)
        log = open(log_path, "a", encoding="utf-8")
        now = datetime.datetime.now().isoformat(timespec="seconds")
        log.write(f"\n=== {now} runner start: {' '.join(spec.command)}\n")
        log.flush()
        offset = log.tell()
        self.started += 1
        try:
            process = subprocess.Popen(
                spec.command,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=self.child_env,
                cwd=self.cwd,
                start_new_session=True,
            )
        except OSError as error:  # missing executable, bad cwd, ...
            log.write(f"could not start: {error}\n")
            log.close()
            self.ended += 1
            result = self.results[spec.name]
            result.status, result.log_tail = FAILED, [f"could not start: {error}"]
            self.echo(f"[runner] FAILED   {spec.name}: could not start ({error}) {self.progress()}")
            return
        inherit_niceness(process.pid)
        self.running[spec.name] = _Running(spec, process, log, log_path, offset, time.monotonic())
        self.results[spec.name].status = RUNNING
        self.echo(f"[runner] start    {spec.name} ({self.started}/{self.total}, pid {process.pid}) log: {log_path}")

    def reap(self, name: str, returncode: int) -> None:
        entry = self.running.pop(name)
        entry.log.close()
        self.ended += 1
        result = self.results[name]
        result.returncode = returncode
        result.seconds = round(time.monotonic() - entry.started, 3)
        result.log_tail = _log_tail(entry.log_path, entry.log_offset, self.tail_lines)
        finished = is_finished(entry.spec.workdir)
        if returncode == 0:
            result.status = FINISHED if finished else (INTERRUPTED if entry.terminated else UNFINISHED)
        elif entry.terminated:
            result.status = FINISHED if finished else INTERRUPTED
        else:
            result.status = FAILED
        line = f"[runner] {result.status:<8} {name} in {result.seconds:.1f}s"
        if result.status == FAILED:
            reason = f"killed by signal {-returncode}" if returncode < 0 else f"exit status {returncode}"
            last = result.log_tail[-1] if result.log_tail else "(no output)"
            line += f", {reason}: {last} (log: {entry.log_path})"
        elif result.status == UNFINISHED:
            line += f", exit 0 but {SUMMARY_FILE} does not say finished"
        self.echo(f"{line} {self.progress()}")
        if self.on_end is not None:
            try:
                self.on_end(entry.spec, result)
            except Exception as error:  # noqa: BLE001 - a hook must not stop the other runs
                self.echo(f"[runner] warning: after {name}: {type(error).__name__}: {error}")

    @staticmethod
    def kill_group(entry: _Running) -> None:
        try:
            os.killpg(entry.process.pid, signal.SIGKILL)  # the run and its environment workers
        except (ProcessLookupError, PermissionError):
            pass

    def request_stop(self, grace_seconds: float) -> None:
        """SIGTERM to every running run (they save a checkpoint and exit); nothing new starts."""
        self.echo(
            f"[runner] stopping: SIGTERM to {len(self.running)} running run(s) so they save a checkpoint; "
            f"killing them in {grace_seconds:.0f}s (signal again to kill now)"
        )
        for entry in self.running.values():
            entry.terminated = True
            try:
                entry.process.send_signal(signal.SIGTERM)
            except ProcessLookupError:
                pass
        self.waiting.clear()
        self.write_runs_json()

    def loop(self, trap: _SignalTrap, max_parallel: int, grace_seconds: float, poll_seconds: float) -> None:
        """Start runs while there is room, reap the ones that ended; on a signal stop them."""
        stop_deadline = None
        self.write_runs_json()
        while self.waiting or self.running:
            if trap.count and stop_deadline is None:
                stop_deadline = time.monotonic() + grace_seconds
                self.request_stop(grace_seconds)
            if stop_deadline is not None and (trap.count >= 2 or time.monotonic() >= stop_deadline):
                for entry in self.running.values():
                    if entry.process.poll() is None:
                        self.kill_group(entry)
            while stop_deadline is None and self.waiting and len(self.running) < max_parallel:
                self.launch(self.waiting.popleft())
                self.write_runs_json()
            for name in list(self.running):
                returncode = self.running[name].process.poll()
                if returncode is not None:
                    self.reap(name, returncode)
                    self.write_runs_json()
            if self.running:
                time.sleep(poll_seconds)
        self.write_runs_json()

    def shutdown(self, grace_seconds: float) -> None:
        """SIGTERM to runs still going (a second SIGTERM means "stop without saving": only to
        those not told yet), then kill what outlives ``grace_seconds``."""
        for entry in self.running.values():
            if not entry.terminated:
                entry.process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + grace_seconds
        for entry in self.running.values():
            try:
                entry.process.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                self.kill_group(entry)
                entry.process.wait()

    def done(self) -> list[RunResult]:
        ordered = [self.results[spec.name] for spec in self.specs]
        counts = collections.Counter(result.status for result in ordered)
        tally = ", ".join(f"{counts[s]} {s}" for s in STATUSES if counts[s]) or "nothing to run"
        self.echo(f"[runner] done: {tally} (status of every run: {self.runs_json})")
        return ordered


def _as_float(value: Any) -> float:
    """A metric value as a float; the logger writes non-finite values as "nan"/"inf"/"-inf"."""
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


def _run_identity(spec: RunSpec) -> tuple[Any, Any, Any]:
    """``(method, task, seed)`` from the labels, else from the run's resolved ``config.json``."""
    labels = dict(spec.labels)
    if not all(key in labels for key in ("method", "task", "seed")):
        try:
            with open(os.path.join(spec.workdir, "config.json"), encoding="utf-8") as handle:
                config = json.load(handle)
            for key in ("method", "task", "seed"):
                labels.setdefault(key, config.get(key))
        except (OSError, ValueError, AttributeError):
            pass
    return labels.get("method") or spec.name, labels.get("task", ""), labels.get("seed", "")


def collect_results(specs: Sequence[RunSpec], finished_only: bool = False) -> list[dict[str, Any]]:
    """One row per (run, evaluation step): ``method, task, seed, step, success_rate, return``.

    Reads the ``eval/success_rate`` lines of each run's ``metrics.jsonl``. A resumed run
    truncates the lines after its checkpoint and logs those steps again, and a run killed between
    writing and truncating can leave both copies, so for each step the last line wins.
    Unparsable lines (a half-written last line) are ignored. Runs without metrics give no rows;
    ``finished_only`` also drops runs whose ``summary.json`` does not say finished.
    """
    rows = []
    for spec in specs:
        if finished_only and not is_finished(spec.workdir):
            continue
        path = os.path.join(spec.workdir, METRICS_FILE)
        try:
            with open(path, encoding="utf-8") as handle:
                lines = handle.readlines()
        except OSError:
            continue
        by_step: dict[int, dict[str, Any]] = {}
        for line in lines:
            try:
                record = json.loads(line)
                step = int(record["step"])
            except (ValueError, KeyError, TypeError):
                continue
            if isinstance(record, dict) and "eval/success_rate" in record:
                by_step[step] = record  # last line for a step wins
        method, task, seed = _run_identity(spec)
        for step in sorted(by_step):
            record = by_step[step]
            rows.append(
                {
                    "method": method,
                    "task": task,
                    "seed": seed,
                    "step": step,
                    "success_rate": _as_float(record["eval/success_rate"]),
                    "return": _as_float(record.get("eval/return")),
                }
            )
    return rows


def write_results_csv(rows: Sequence[Mapping[str, Any]], path: str) -> None:
    """``rows`` as CSV with the columns ``RESULT_COLUMNS`` (header always written), atomically."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=RESULT_COLUMNS, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({key: (repr(value) if isinstance(value, float) else value) for key, value in row.items()})
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    _atomic_write_text(path, buffer.getvalue())
