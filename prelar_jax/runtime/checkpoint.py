"""Step-numbered checkpoints of a train-state pytree plus a JSON metadata dict.

A thin layer over orbax-checkpoint's v0 ``CheckpointManager`` so that trainers only see
``save`` / ``restore`` / ``latest_step``. Each step directory holds two items:

    <directory>/<step>/state/      the train state (StandardSave: sharded jax arrays, OCDBT)
    <directory>/<step>/metadata/   a small JSON dict (RNG counters, env steps, config hash, ...)

Why a wrapper: restoring must land in the structure, dtypes and shardings of the *current*
train state (so a run resumed on another mesh size just works), a checkpoint from another
architecture must give one readable error instead of an orbax tree diff or a "Too many leaves
for PyTreeDef" failure, and saves must be asynchronous so training continues while orbax writes.

Orbax writes each step into ``<step>.orbax-checkpoint-tmp[-<timestamp>]`` and renames it when
the save is complete, so a save interrupted by a crash is never listed as a step; leftover
temporary directories are deleted when the next ``Checkpointer`` opens the directory, before its
constructor returns (orbax's own clean-up runs in a background thread that its ``close`` does not
wait for: a process that exits soon after opening the directory, e.g. with an error, raced it and
printed its traceback).

A save that fails (full disk, quota, read-only or failing disk) surfaces, with asynchronous saves,
at the next ``save``, ``wait_until_finished`` or ``close``: orbax raises tensorstore's
``ValueError('RESOURCE_EXHAUSTED: ... No space left on device')`` and forgets every step in its
in-memory list, including the intact previous ones. ``Checkpointer`` turns that into one
``CheckpointSaveError`` naming the directory and the intact previous step, deletes the half-written
temporary directory (it may be what filled the disk) and re-reads the steps from disk.
"""

from __future__ import annotations

import glob
import json
import logging
import os
import shutil
import threading
import time
from typing import Any, Collection, NoReturn

import jax
import numpy as np
import orbax.checkpoint as ocp

from prelar_jax.errors import UserError

STATE_ITEM = "state"
TEMPORARY_SUFFIX = ".orbax-checkpoint-tmp"  # orbax's name for a step directory still being written
METADATA_ITEM = "metadata"


class CheckpointMismatchError(UserError, ValueError):
    """The checkpoint's tree (paths or shapes) does not match the state it is restored into."""


class CheckpointNotFoundError(UserError, FileNotFoundError):
    """There is no finished checkpoint (for the requested step) in the directory."""


class CheckpointSaveError(UserError, OSError):
    """A checkpoint could not be written (full disk, quota, permissions, failing disk); the
    previous checkpoint is intact and the half-written one is never listed as a step."""


# Texts of the OS errors that make a save fail for reasons outside the program. Tensorstore (which
# writes the arrays) reports them inside a ValueError, e.g. "RESOURCE_EXHAUSTED: ... Failed to write
# ... No space left on device [os_error_code='28']"; Python writes raise OSError.
_SPACE_ERRORS = ("No space left on device", "Disk quota exceeded")
_STORAGE_ERRORS = _SPACE_ERRORS + (
    "Read-only file system",
    "Permission denied",
    "Input/output error",
    "File too large",
    "No such file or directory",
    "os_error_code",
)


def _storage_problem(error: BaseException) -> str | None:
    """A short description of the storage problem behind ``error``, or None if it is not one
    (then it is a bug and keeps its traceback)."""
    if isinstance(error, (TimeoutError, ConnectionError)):  # hosts not answering: not the disk
        return None
    if isinstance(error, OSError) and error.strerror:
        return f"[Errno {error.errno}] {error.strerror}" + (f": {error.filename}" if error.filename else "")
    if isinstance(error, OSError):
        return str(error) or type(error).__name__
    text = str(error)
    for marker in _STORAGE_ERRORS:
        if marker in text:
            return marker if marker != "os_error_code" else text[:300]
    return None


def _vanished(error: BaseException, problem: str) -> bool:
    """True when the save failed because a path it was writing no longer exists (ENOENT)."""
    if isinstance(error, FileNotFoundError):
        return True
    return "No such file or directory" in problem or "No such file or directory" in str(error)


class _QuietStorageErrors(logging.Filter):
    """Drops the logs of a storage problem that orbax writes with background-thread tracebacks,
    and asyncio's "exception was never retrieved" reports of the same error for orbax's
    abandoned write tasks: ``Checkpointer`` re-raises the problem as one ``CheckpointSaveError``
    saying what to do, and command-line entry points print user errors without tracebacks.
    Also drops orbax's warning that a directory opened read-only "is read only" (readers of a
    checkpoint open it so on purpose; the warning read like a permissions problem). Every other
    log passes."""

    def filter(self, record: logging.LogRecord) -> bool:
        from_orbax = "orbax" in record.pathname
        unretrieved = record.name == "asyncio" and "never retrieved" in record.getMessage()
        if not (from_orbax or unretrieved):
            return True
        if from_orbax and record.getMessage().startswith("Given directory is read only"):
            return False
        error = record.exc_info[1] if record.exc_info else None
        if error is not None and _storage_problem(error) is not None:
            return False
        return not any(marker in record.getMessage() for marker in _STORAGE_ERRORS)


_QUIET_STORAGE_ERRORS = _QuietStorageErrors()


def _quiet_orbax_logs() -> None:
    for name in ("absl", "asyncio"):  # orbax logs through absl; adding a filter twice is a no-op
        logging.getLogger(name).addFilter(_QUIET_STORAGE_ERRORS)


def _human_bytes(count: float) -> str:
    """'512 bytes', '56.0 KiB', '1.1 MiB', ..."""
    units = ("bytes", "KiB", "MiB", "GiB", "TiB")
    index = 0
    while count >= 1024 and index < len(units) - 1:
        count, index = count / 1024, index + 1
    return f"{count:.0f} bytes" if index == 0 else f"{count:.1f} {units[index]}"


def _nbytes(tree: Any) -> int:
    return int(
        sum(
            np.prod(leaf.shape) * np.dtype(leaf.dtype).itemsize
            for leaf in jax.tree.leaves(tree)
            if hasattr(leaf, "shape") and hasattr(leaf, "dtype")
        )
    )


def _item_handlers() -> dict[str, ocp.CheckpointHandler]:
    # Registered up front so a fresh manager (a resumed run) can read metadata before any save.
    return {
        STATE_ITEM: ocp.StandardCheckpointHandler(),
        METADATA_ITEM: ocp.JsonCheckpointHandler(),
    }


def _json_default(value: Any) -> Any:
    """Lets numpy/jax scalars through json.dumps; everything else non-JSON is an error."""
    if isinstance(value, (np.generic, np.ndarray, jax.Array)) and np.ndim(value) == 0:
        return np.asarray(value).item()
    raise TypeError(
        f"checkpoint metadata must be JSON-serialisable; got {type(value).__name__}: {value!r}. "
        "Store arrays in the train state, not in the metadata dict."
    )


def _path_str(path: tuple) -> str:
    return jax.tree_util.keystr(path, simple=True, separator="/")


def _leaf_shapes(tree: Any) -> dict[str, tuple[int, ...]]:
    """Maps 'a/b/0/c' paths to leaf shapes; works for live arrays, abstract arrays and orbax metadata."""
    leaves, _ = jax.tree_util.tree_flatten_with_path(tree)
    return {_path_str(path): tuple(leaf.shape) for path, leaf in leaves}


def _describe_mismatch(saved: dict[str, tuple], wanted: dict[str, tuple], limit: int = 20) -> list[str]:
    lines = []
    for path in sorted(saved.keys() - wanted.keys()):
        lines.append(f"  {path}: in checkpoint {saved[path]}, missing from the current state")
    for path in sorted(wanted.keys() - saved.keys()):
        lines.append(f"  {path}: in the current state {wanted[path]}, missing from the checkpoint")
    for path in sorted(saved.keys() & wanted.keys()):
        if saved[path] != wanted[path]:
            lines.append(f"  {path}: checkpoint shape {saved[path]} != current shape {wanted[path]}")
    if len(lines) > limit:
        lines = lines[:limit] + [f"  ... and {len(lines) - limit} more"]
    return lines


def _abstract_target(target_state: Any) -> Any:
    """ShapeDtypeStructs carrying the target's shardings, so restored arrays land where the live ones are."""
    return jax.tree.map(ocp.utils.to_shape_dtype_struct, target_state)


def _top_level_name(path: tuple) -> Any:
    """The field (dataclass attribute, dict key, sequence index) a leaf's path starts with."""
    first = path[0]
    for attribute in ("name", "key", "idx"):
        if hasattr(first, attribute):
            return getattr(first, attribute)
    return first


def _skip_other_fields(target: Any, only: Collection[Any]) -> Any:
    """``target`` with every leaf outside the top-level fields ``only`` replaced by orbax's
    placeholder, which orbax neither reads from disk nor allocates."""
    # The fields themselves, empty ones included (a model without BatchNorm has batch_stats {}).
    fields = jax.tree_util.tree_flatten_with_path(target, is_leaf=lambda node: node is not target)[0]
    unknown = set(only) - {_top_level_name(path) for path, _ in fields}
    if unknown:
        raise ValueError(f"restore(only=...): the state has no fields {sorted(map(str, unknown))}")
    return jax.tree_util.tree_map_with_path(
        lambda path, leaf: leaf if _top_level_name(path) in only else ocp.PLACEHOLDER, target
    )


def _use_distributed_barriers() -> None:
    """Multi-process runs: orbax's barriers through the JAX coordination service (a key-value
    store with orbax's 300 s timeout) instead of its default, a compiled cross-device all-gather
    per barrier. That default compiles a program on every process before the first save and runs
    it through the CPU collectives (gloo), whose set-up fails when processes arrive more than
    30 s apart, which a loaded machine or a slow compile easily causes.

    Orbax reads an absl flag; ``parse`` sets it whether or not the command line was parsed yet.
    """
    from absl import flags
    from orbax.checkpoint._src.multihost import multihost  # noqa: F401 -- defines the flag

    flags.FLAGS["experimental_orbax_use_distributed_barrier"].parse("true")


def _remove_temporary_directories(directory: str, step: int | None = None) -> None:
    """Deletes the unfinished saves (``<step>.orbax-checkpoint-tmp*``) of ``step``, or of every step."""
    pattern = f"{step if step is not None else '*'}{TEMPORARY_SUFFIX}*"
    for partial in glob.glob(os.path.join(glob.escape(directory), pattern)):
        shutil.rmtree(partial, ignore_errors=True)


class Checkpointer:
    """Saves and restores ``(train state, metadata dict)`` pairs keyed by step.

    Use one instance per run directory and call it from every process (orbax coordinates hosts).
    ``save`` returns as soon as the arrays have been copied to host memory, so the caller may
    donate or overwrite the state right away; ``wait_until_finished``/``close`` block until the
    files are complete. A failed save raises ``CheckpointSaveError`` from the call that finds it
    (that save, the next one, ``wait_until_finished`` or ``close``).
    """

    def __init__(
        self,
        directory: str | os.PathLike,
        max_to_keep: int | None = 3,
        async_save: bool = True,
        remove_unfinished: bool = True,
    ):
        """``remove_unfinished=False`` leaves other processes' saves in progress alone: for a
        reader of another run's checkpoints (fine-tuning from a pre-training that still runs)."""
        self.directory = os.path.abspath(os.fspath(directory))
        self._remove_unfinished = remove_unfinished
        self._options = ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep,
            create=True,
            cleanup_tmp_directories=False,  # done synchronously in _open
            enable_async_checkpointing=async_save,
        )
        if jax.process_count() > 1:
            _use_distributed_barriers()
        _quiet_orbax_logs()
        self._manager = self._open()
        self._pending: tuple[int, int] | None = None  # (step, bytes) of a save that may be running

    def _open(self) -> ocp.CheckpointManager:
        if self._remove_unfinished and jax.process_index() == 0:
            _remove_temporary_directories(self.directory)
        return ocp.CheckpointManager(self.directory, options=self._options, item_handlers=_item_handlers())

    def latest_step(self) -> int | None:
        """The newest completely written step, or None when there is none."""
        steps = self.all_steps()
        return steps[-1] if steps else None

    def all_steps(self) -> list[int]:
        """All completely written steps, oldest first (a save still being written is not one)."""
        if self._pending is None:
            return sorted(self._manager.all_steps())
        # Orbax lists a step as soon as its save starts and drops the ones it will prune; until the
        # save is finished the finished step directories on disk are the truth (orbax renames a
        # step's temporary directory to "<step>" when it is complete).
        return sorted(
            int(name)
            for name in os.listdir(self.directory)
            if name.isdigit() and os.path.isdir(os.path.join(self.directory, name))
        )

    def save(self, step: int, state: Any, metadata: dict[str, Any] | None = None, force: bool = False) -> bool:
        """Starts writing ``state`` and ``metadata`` as ``step``; returns whether a save was started.

        Returns False (and writes nothing) for a step that is not newer than the latest saved
        one; ``force=True`` instead raises orbax's StepAlreadyExistsError for an existing step.
        Raises ``CheckpointSaveError`` if this save, or the previous asynchronous one, could not
        be written.
        """
        metadata = json.loads(json.dumps(dict(metadata or {}), default=_json_default))
        self._finish_pending()  # the previous save's failure belongs to the previous step
        args = ocp.args.Composite(
            **{STATE_ITEM: ocp.args.StandardSave(state), METADATA_ITEM: ocp.args.JsonSave(metadata)}
        )
        size = _nbytes(state)
        try:
            started = bool(self._manager.save(int(step), args=args, force=force))
        except Exception as error:
            self._fail(int(step), size, error)
        if started and self._options.enable_async_checkpointing:
            self._pending = (int(step), size)
        return started

    def _finish_pending(self) -> None:
        """Blocks until the save in flight is on disk; its failure becomes ``CheckpointSaveError``."""
        pending, self._pending = self._pending, None
        try:
            self._manager.wait_until_finished()
        except Exception as error:
            step, size = pending if pending is not None else (None, 0)
            self._fail(step, size, error)

    def _drain_failed_writes(self, timeout: float = 60.0) -> None:
        """Waits for the failed save's other writes: orbax stops waiting at the first error, and
        deleting the temporary directory under a write still running would let it come back.

        Orbax runs each write in a thread of its own (a class defined in orbax); without such
        threads to wait for, the directory is still never a step and the next run deletes it.
        """
        deadline = time.monotonic() + timeout
        for thread in threading.enumerate():
            if thread is not threading.current_thread() and type(thread).__module__.startswith("orbax."):
                # threading.Thread.join: orbax's own join re-raises the write's error.
                threading.Thread.join(thread, timeout=max(deadline - time.monotonic(), 0.0))

    def _fail(self, step: int | None, size: int, error: Exception) -> NoReturn:
        """Cleans up after a failed save of ``step`` and raises; never returns.

        Deletes the step's temporary directory (a full disk is often full of it) and re-reads the
        finished steps from disk, since orbax dropped them all from its in-memory list.
        """
        self._drain_failed_writes()
        if step is not None and jax.process_index() == 0:
            _remove_temporary_directories(self.directory, step)
        try:
            self._manager.close()
        except Exception:  # noqa: BLE001 -- it already failed; a fresh manager replaces it
            pass
        self._manager = self._open()
        problem = _storage_problem(error)
        if problem is None:
            raise error  # not a storage problem: a bug, keep the traceback
        latest = self.latest_step()  # re-read from disk: finished steps only
        what = f"checkpoint step {step}" if step is not None else "a checkpoint"
        if latest is None:
            intact = "There is no complete checkpoint in it, so a re-run starts from the beginning. "
        elif step is not None and latest >= step:
            # Only another writer can have finished this step (or a later one) meanwhile.
            intact = (
                f"The newest complete checkpoint on disk is step {latest}, written by another process; "
                "a re-run resumes from it. "
            )
        else:
            intact = f"The newest complete checkpoint is step {latest}: re-running the same command resumes from it. "
        if _vanished(error, problem):
            todo = (
                "A file or directory of the save disappeared while it was being written: something else "
                "deleted it, most often another process using the same workdir (a second run, or a "
                "cleanup job). Make sure only one run uses the workdir, then re-run."
            )
        elif any(marker in str(error) or marker in problem for marker in _SPACE_ERRORS):
            kept = self._options.max_to_keep
            todo = (
                f"Free disk space (a checkpoint holds about {_human_bytes(size)} of arrays"
                + (f", and up to {kept} are kept" if kept else "")
                + ") or use a --workdir on another disk, then re-run."
            )
        else:
            todo = "Fix the storage problem named above (permissions, read-only or failing disk), then re-run."
        raise CheckpointSaveError(f"could not write {what} to {self.directory}: {problem}. {intact}{todo}") from error

    def _resolve_step(self, step: int | None) -> int:
        self._finish_pending()  # a save still being written is restorable once it is finished
        if step is None:
            step = self.latest_step()
            if step is None:
                raise CheckpointNotFoundError(
                    f"no finished checkpoint in {self.directory}; check the --workdir, or start a fresh run."
                )
        elif step not in self.all_steps():
            raise CheckpointNotFoundError(
                f"no finished checkpoint for step {step} in {self.directory}; available steps: {self.all_steps()}"
            )
        return int(step)

    def check_compatible(self, target_state: Any, step: int | None = None) -> None:
        """Raises CheckpointMismatchError naming every path whose presence or shape differs."""
        step = self._resolve_step(step)
        try:
            saved_tree = self._manager.item_metadata(step)[STATE_ITEM]
        except Exception as error:  # Not one of our checkpoints at all (other item layout).
            raise CheckpointMismatchError(
                f"checkpoint {self.directory}/{step} has no readable '{STATE_ITEM}' item ({error}); "
                "it was not written by prelar-jax's Checkpointer. Pass a new --workdir."
            ) from error
        if saved_tree is None:
            raise CheckpointMismatchError(f"checkpoint {self.directory}/{step} has no '{STATE_ITEM}' item.")
        saved = _leaf_shapes(getattr(saved_tree, "tree", saved_tree))
        wanted = _leaf_shapes(target_state)
        problems = _describe_mismatch(saved, wanted)
        if problems:
            raise CheckpointMismatchError(
                f"checkpoint {self.directory}/{step} does not fit the current train state; it was written by "
                "a different architecture or config. Differences:\n"
                + "\n".join(problems)
                + "\nUse the config this workdir was created with (see its config.json), or pass a new --workdir."
            )

    def restore(
        self, target_state: Any, step: int | None = None, only: Collection[Any] | None = None
    ) -> tuple[Any, dict[str, Any]]:
        """Loads ``step`` (default: latest) into the structure, dtypes and shardings of ``target_state``.

        ``target_state`` may hold live arrays or ``jax.ShapeDtypeStruct``s with shardings (e.g. from
        ``jax.eval_shape`` plus the mesh's shardings); only its structure is used.

        ``only`` names the top-level fields of the state to load (dataclass attributes or dict
        keys), e.g. ``('step', 'params', 'batch_stats')`` when the optimizer moments are not
        needed: every leaf of the other fields is still checked against the checkpoint, but is
        neither read from disk nor allocated, and comes back as ``None``. In this mode a leaf of
        ``target_state`` without a sharding comes back as a host numpy array.
        """
        step = self._resolve_step(step)
        self.check_compatible(target_state, step)
        target = _abstract_target(target_state)
        manager = self._manager
        if only is None:
            state_args = ocp.args.StandardRestore(target)
        else:
            # StandardRestore refuses orbax's placeholders; PyTreeRestore (what StandardRestore
            # runs underneath, reading the same files) skips them, through a handler of its own.
            target = _skip_other_fields(target, only)
            state_args = ocp.args.PyTreeRestore(
                target, restore_args=ocp.checkpoint_utils.construct_restore_args(target)
            )
            manager = ocp.CheckpointManager(
                self.directory,
                options=ocp.CheckpointManagerOptions(
                    read_only=True, create=False, save_interval_steps=0, max_to_keep=None
                ),
                item_handlers={STATE_ITEM: ocp.PyTreeCheckpointHandler(), METADATA_ITEM: ocp.JsonCheckpointHandler()},
            )
        args = ocp.args.Composite(**{STATE_ITEM: state_args, METADATA_ITEM: ocp.args.JsonRestore()})
        try:
            restored = manager.restore(step, args=args)
        except ValueError as error:  # Differences the shape check cannot see (e.g. empty subtrees).
            raise CheckpointMismatchError(
                f"checkpoint {self.directory}/{step} does not fit the current train state; it was written by "
                f"a different architecture or config. Orbax says: {error}"
            ) from error
        finally:
            if manager is not self._manager:
                manager.close()
        state = restored[STATE_ITEM]
        if only is not None:
            state = jax.tree.map(lambda leaf: None if leaf is ocp.PLACEHOLDER else leaf, state)
        return state, dict(restored[METADATA_ITEM] or {})

    def wait_until_finished(self) -> None:
        """Blocks until every started save is completely on disk; raises ``CheckpointSaveError``
        if it could not be written."""
        self._finish_pending()

    def close(self) -> None:
        """Waits for pending saves, then releases orbax's background resources (also when the
        pending save failed, whose ``CheckpointSaveError`` is then raised)."""
        try:
            self._finish_pending()
        finally:
            self._manager.close()

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()


def read_metadata(directory: str | os.PathLike, step: int | None = None) -> dict[str, Any]:
    """The JSON metadata of ``step`` (default: latest) without needing a train state, for tools."""
    directory = os.path.abspath(os.fspath(directory))
    if not os.path.isdir(directory):
        raise CheckpointNotFoundError(f"checkpoint directory {directory} does not exist.")
    options = ocp.CheckpointManagerOptions(read_only=True, create=False)
    _quiet_orbax_logs()
    manager = ocp.CheckpointManager(directory, options=options, item_handlers=_item_handlers())
    try:
        if step is None:
            step = manager.latest_step()
            if step is None:
                raise CheckpointNotFoundError(f"no finished checkpoint in {directory}.")
        elif step not in manager.all_steps():
            raise CheckpointNotFoundError(
                f"no finished checkpoint for step {step} in {directory}; available: {sorted(manager.all_steps())}"
            )
        restored = manager.restore(step, args=ocp.args.Composite(**{METADATA_ITEM: ocp.args.JsonRestore()}))
        return dict(restored[METADATA_ITEM] or {})
    finally:
        manager.close()
