"""Small pieces both training loops (pre-training, fine-tuning) share."""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import signal
import socket
import subprocess
from typing import Any

import jax
import numpy as np

from prelar_jax.runtime import workdir_lock
from prelar_jax.runtime.config import REPO_ROOT
from prelar_jax.errors import UserError


def local_value(value: jax.Array) -> jax.Array:
    """This process's replica of a replicated array (a multi-host global array cannot be read
    whole by one process; on one process this is the array itself)."""
    return value.addressable_data(0)


def count_params(tree: Any) -> int:
    return int(sum(np.prod(x.shape) for x in jax.tree.leaves(tree)))


class StopRequest:
    """SIGTERM / SIGINT set a flag; the loop saves a checkpoint and exits cleanly."""

    def __init__(self):
        self.requested = False
        self._previous = {}

    def __enter__(self):
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: leave signals alone
                pass
        return self

    def _handle(self, signum, frame):
        if self.requested:  # a second signal: stop now
            raise KeyboardInterrupt
        self.requested = True
        print(
            f"\nreceived signal {signum}: saving a checkpoint and stopping (send it again to stop immediately)",
            flush=True,
        )

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


class NonFiniteError(UserError, FloatingPointError):
    """Too many updates in a row had a non-finite loss or gradient."""


class NonFiniteMonitor:
    """Watches each update's ``nonfinite`` flag, one update late (no host synchronisation on the
    update just dispatched), logs every skipped update with its step, and raises
    ``NonFiniteError`` naming the last checkpoint after ``limit`` skipped updates in a row.

    Skipped updates never change the parameters (see ``learners.optim.keep_if_finite``), so the
    checkpoints written before and during a streak are good.
    """

    def __init__(self, limit: int, logger, checkpoint_dir: str, latest_step):
        self.limit = int(limit)
        self.logger = logger
        self.checkpoint_dir = checkpoint_dir
        self.latest_step = latest_step  # callable -> newest finished checkpoint step or None
        self.streak = 0
        self.total = 0
        self._pending = None  # (step, flag array) of the last update

    def observe(self, step: int, flag: jax.Array | None) -> None:
        """Registers the update logged as ``step`` and checks the one before it."""
        self.check()
        if flag is not None:
            flag = local_value(flag)
            flag.copy_to_host_async()
            self._pending = (step, flag)

    def check(self) -> None:
        """Reads the pending flag (blocks until that update is done)."""
        if self._pending is None:
            return
        step, flag = self._pending
        self._pending = None
        if float(flag) == 0.0:
            self.streak = 0
            return
        self.streak += 1
        self.total += 1
        self.logger.log(step, {"nonfinite/skipped_in_a_row": self.streak, "nonfinite/skipped_total": self.total})
        print(
            f"[prelar] step {step}: non-finite loss or gradient, update skipped "
            f"({self.streak} in a row, limit {self.limit})",
            flush=True,
        )
        if self.streak >= self.limit:
            latest = self.latest_step()
            where = (
                (
                    f"the last checkpoint is {self.checkpoint_dir}/{latest} (parameters are never "
                    "overwritten by skipped updates)"
                )
                if latest is not None
                else "no checkpoint was written yet"
            )
            raise NonFiniteError(
                f"{self.streak} updates in a row (up to step {step}) had a non-finite loss or "
                f"gradient; stopping. {where}. Check the data for NaN/inf, lower the learning rate, "
                "or raise --config.nonfinite_limit; re-running resumes from that checkpoint."
            )


ATTEMPTS = "attempts.jsonl"  # one line per start or resume of a run: the code it ran


def code_version(root: str = REPO_ROOT) -> dict[str, Any]:
    """``{"commit": sha or None, "dirty": bool or None}`` of the git checkout at ``root``."""

    def git(*args):
        return subprocess.run(["git", "-C", root, *args], capture_output=True, text=True, timeout=30)

    try:
        head = git("rev-parse", "HEAD")
        if head.returncode != 0:
            return {"commit": None, "dirty": None}
        status = git("status", "--porcelain", "--untracked-files=no")
        return {"commit": head.stdout.strip(), "dirty": bool(status.stdout.strip())}
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "dirty": None}


def record_attempt(workdir: str) -> dict[str, Any]:
    """Appends this start (or resume) of the run to ``<workdir>/attempts.jsonl``: the time, the
    host and the code version of the checkout now, when the run's modules are loaded (a commit
    read when the run ends would name whatever the checkout held by then)."""
    attempt = {
        "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "host": socket.gethostname(),
        **code_version(),
    }
    with open(os.path.join(workdir, ATTEMPTS), "a", encoding="utf-8") as handle:
        handle.write(json.dumps(attempt) + "\n")
    return attempt


def last_attempt(workdir: str) -> dict[str, Any] | None:
    """The last line of ``<workdir>/attempts.jsonl`` (the attempt that finished a finished run),
    or None when the run has no readable record."""
    try:
        with open(os.path.join(workdir, ATTEMPTS), encoding="utf-8") as handle:
            lines = [line for line in handle if line.strip()]
        return json.loads(lines[-1]) if lines else None
    except (OSError, ValueError):
        return None


def open_workdir(
    config,
    workdir: str,
    allow_config_override: bool,
    resumable_keys: tuple[str, ...],
    devices: list | None,
    owned: contextlib.ExitStack,
    purpose: str,
):
    """The start of every run, after its config is validated: multi-host start-up, the device
    mesh (the batch must split over it), the workdir and its lock (held in ``owned`` until the
    caller closes it: a second run on the workdir is refused; process 0 holds it for a multi-host
    job), and the config check (a resumed workdir must have been created with the same config, up
    to ``resumable_keys``) and write, and the attempt's code version (``record_attempt``).
    Returns ``(mesh, absolute workdir, config as a dict)``."""
    from prelar_jax.runtime import config as config_lib, logger as logger_lib, parallel

    parallel.initialize_distributed()
    mesh = parallel.make_mesh(devices)
    parallel.check_batch_divides(config.batch_size, mesh)
    workdir = owned.enter_context(workdir_lock.hold(workdir, purpose, multi_host=True))
    config_dict = config.to_dict()
    logger_lib.check_config_matches(
        workdir, config_dict, allow_config_override, ignore=resumable_keys, added=config_lib.ADDED_KEYS
    )
    if jax.process_index() == 0:  # the workdir is shared: concurrent writers would race on config.json.tmp
        logger_lib.write_config(workdir, config_dict)
        record_attempt(workdir)
    return mesh, workdir, config_dict
