"""One run per workdir: an exclusive, kernel-held lock on ``<workdir>/workdir.lock``.

Every command that writes into a directory it owns (pre-training, fine-tuning, diagnostics, the
benchmark and the runner behind sweeps) holds this lock for its lifetime. A second process that
opens the same directory gets one ``WorkdirBusyError`` naming the holder (host, pid, start time,
command) and changes nothing in it.

The lock is ``fcntl.flock`` on an open file: the kernel releases it when the holding process
ends in any way (exit, crash, ``kill -9``), so a lock file left behind by a dead run never blocks
the re-run that resumes it; the file's text (who held it) is only information. In one process the
lock is re-entrant (a benchmark that locks its directory and then runs the runner on a
sub-directory of it, or on the same one, does not lock itself out).

Shared filesystems: Linux NFS clients implement ``flock`` with the server's byte-range locks
(NFSv4, or NLM for v3), so two hosts exclude each other when the server supports locking; a lock
held by a host that vanished is released when its NFS lease expires (about 90 s on NFSv4).
Filesystems without lock support (some FUSE and object-store mounts, Lustre mounted without
``flock``) make ``flock`` fail: the run then goes on with a warning that nothing keeps a second run
out. In a multi-host job only process 0 takes the lock, for the whole job.
"""

from __future__ import annotations

import datetime
import errno
import fcntl
import json
import os
import socket
import sys
import threading

from prelar_jax.errors import UserError

LOCK_FILE = "workdir.lock"

# path -> [fd, depth]: locks this process holds (re-entrant per process).
_held: dict[str, list[int]] = {}
_guard = threading.Lock()


class WorkdirBusyError(UserError):
    """The workdir is locked by another running process."""


def prepare_workdir(path: str) -> str:
    """``path`` as an absolute directory, created if missing; one clear error when it names
    something that is not a directory (a file, a broken link)."""
    path = os.path.abspath(path)
    if os.path.lexists(path) and not os.path.isdir(path):
        kind = "a broken symbolic link" if os.path.islink(path) else "a file"
        raise UserError(
            f"--workdir {path} is {kind}, not a directory. Pass a directory (it is created "
            "if missing), e.g. a new name next to it."
        )
    try:
        os.makedirs(path, exist_ok=True)
    except (FileExistsError, NotADirectoryError):  # a parent component is a file
        raise UserError(
            f"cannot create the workdir {path}: a component of the path is a file, not a "
            "directory. Pass a path whose parents are directories."
        ) from None
    except PermissionError as error:
        raise UserError(
            f"cannot create the workdir {path}: {error.strerror}. Pass a directory you can write to."
        ) from None
    return path


def _owner_text(path: str) -> str:
    try:
        with open(os.path.join(path, LOCK_FILE), encoding="utf-8") as handle:
            owner = json.loads(handle.read() or "{}")
    except (OSError, ValueError):
        owner = {}
    if not owner:
        return "another process (it has not written its name yet)"
    command = " ".join(owner.get("command", []))
    return f"pid {owner.get('pid')} on host {owner.get('host')}, running since {owner.get('started')}" + (
        f" ({command})" if command else ""
    )


def holder(path: str) -> str | None:
    """Who holds ``path``'s lock (as in the busy error), or None when nobody does (no lock file,
    a stale one, this process's own hold, or a filesystem without locks). Changes nothing."""
    path = os.path.abspath(path)
    lock_path = os.path.join(path, LOCK_FILE)
    with _guard:
        if path in _held:
            return None
    try:
        fd = os.open(lock_path, os.O_RDONLY)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return _owner_text(path)
    except OSError:
        return None
    finally:
        os.close(fd)  # closing drops the probe's shared lock
    return None


def acquire(path: str, purpose: str = "run") -> bool:
    """Takes the lock on directory ``path`` (which must exist); raises ``WorkdirBusyError`` if
    another process holds it. Returns False (with a warning) where the filesystem cannot lock."""
    path = os.path.abspath(path)
    with _guard:
        if path in _held:
            _held[path][1] += 1
            return True
        lock_path = os.path.join(path, LOCK_FILE)
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise WorkdirBusyError(
                f"{path} is in use by {_owner_text(path)}. Two runs on one workdir would overwrite each "
                f"other's metrics and checkpoints, so this {purpose} changed nothing and stops. Wait for "
                "that run to finish (or stop it: it saves a checkpoint on SIGTERM, and a re-run then "
                "resumes), or pass another --workdir."
            ) from None
        except OSError as error:
            os.close(fd)
            if error.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                print(
                    f"[prelar] warning: the filesystem of {path} does not support file locks "
                    f"({error.strerror}); nothing stops a second run from using this workdir at the "
                    "same time.",
                    file=sys.stderr,
                    flush=True,
                )
                return False
            raise
        owner = {
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "started": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
            "purpose": purpose,
            "command": list(sys.argv),
        }
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(owner) + "\n").encode(), 0)
        _held[path] = [fd, 1]
        return True


def release(path: str) -> None:
    """Releases one hold of ``path``'s lock (the last one unlocks it)."""
    path = os.path.abspath(path)
    with _guard:
        entry = _held.get(path)
        if entry is None:
            return
        entry[1] -= 1
        if entry[1] > 0:
            return
        del _held[path]
        fd = entry[0]
        try:
            os.ftruncate(fd, 0)  # the text names a holder only while there is one
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)


class hold:
    """``with hold(path, purpose):`` owns ``path`` (created if missing) for the block; the lock is
    taken by process 0 only (``multi_host=True``: call after ``jax.distributed`` is set up)."""

    def __init__(self, path: str, purpose: str = "run", multi_host: bool = False):
        self.path = prepare_workdir(path)
        self.purpose = purpose
        self.multi_host = multi_host
        self._locked = False

    def __enter__(self) -> str:
        primary = True
        if self.multi_host:
            import jax

            primary = jax.process_index() == 0
        if primary:
            self._locked = acquire(self.path, self.purpose)
        return self.path

    def __exit__(self, *exc) -> None:
        if self._locked:
            release(self.path)
            self._locked = False
