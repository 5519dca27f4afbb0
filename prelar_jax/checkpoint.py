"""Step-numbered checkpoints of a train-state pytree plus a JSON metadata dict.

A thin layer over orbax-checkpoint's v0 ``CheckpointManager`` so that trainers only see
``save`` / ``restore`` / ``latest_step``. Each step directory holds two items:

    <directory>/<step>/state/      the train state (StandardSave: sharded jax arrays, OCDBT)
    <directory>/<step>/metadata/   a small JSON dict (RNG counters, env steps, config hash, ...)

Why a wrapper: restoring must land in the structure, dtypes and shardings of the *current*
train state (so a run resumed on another mesh size just works), a checkpoint from another
architecture must give one readable error instead of an orbax tree diff or a "Too many leaves
for PyTreeDef" failure, and saves must be asynchronous so training continues while orbax writes.

Orbax writes each step into ``<step>.orbax-checkpoint-tmp-<timestamp>`` and renames it when the
save is complete, so a save interrupted by a crash is never listed as a step; leftover
temporary directories are deleted when the next ``Checkpointer`` opens the directory.
"""

from __future__ import annotations

import json
import os
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from prelar_jax.errors import UserError

STATE_ITEM = "state"
METADATA_ITEM = "metadata"


class CheckpointMismatchError(UserError, ValueError):
    """The checkpoint's tree (paths or shapes) does not match the state it is restored into."""


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


class Checkpointer:
    """Saves and restores ``(train state, metadata dict)`` pairs keyed by step.

    Use one instance per run directory and call it from every process (orbax coordinates hosts).
    ``save`` returns as soon as the arrays have been copied to host memory, so the caller may
    donate or overwrite the state right away; ``wait_until_finished``/``close`` block until the
    files are complete.
    """

    def __init__(self, directory: str | os.PathLike, max_to_keep: int | None = 3, async_save: bool = True):
        self.directory = os.path.abspath(os.fspath(directory))
        options = ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep,
            create=True,
            cleanup_tmp_directories=True,
            enable_async_checkpointing=async_save,
        )
        self._manager = ocp.CheckpointManager(self.directory, options=options, item_handlers=_item_handlers())

    def latest_step(self) -> int | None:
        """The newest completely written step, or None when there is none."""
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        """All completely written steps, oldest first."""
        return sorted(self._manager.all_steps())

    def save(self, step: int, state: Any, metadata: dict[str, Any] | None = None, force: bool = False) -> bool:
        """Starts writing ``state`` and ``metadata`` as ``step``; returns whether a save was started.

        Returns False (and writes nothing) for a step that is not newer than the latest saved
        one; ``force=True`` instead raises orbax's StepAlreadyExistsError for an existing step.
        """
        metadata = json.loads(json.dumps(dict(metadata or {}), default=_json_default))
        args = ocp.args.Composite(
            **{STATE_ITEM: ocp.args.StandardSave(state), METADATA_ITEM: ocp.args.JsonSave(metadata)}
        )
        return bool(self._manager.save(int(step), args=args, force=force))

    def _resolve_step(self, step: int | None) -> int:
        if step is None:
            step = self.latest_step()
            if step is None:
                raise FileNotFoundError(
                    f"no finished checkpoint in {self.directory}; check the --workdir, or start a fresh run."
                )
        elif step not in self._manager.all_steps():
            raise FileNotFoundError(
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

    def restore(self, target_state: Any, step: int | None = None) -> tuple[Any, dict[str, Any]]:
        """Loads ``step`` (default: latest) into the structure, dtypes and shardings of ``target_state``.

        ``target_state`` may hold live arrays or ``jax.ShapeDtypeStruct``s with shardings (e.g. from
        ``jax.eval_shape`` plus the mesh's shardings); only its structure is used.
        """
        step = self._resolve_step(step)
        self.check_compatible(target_state, step)
        args = ocp.args.Composite(
            **{
                STATE_ITEM: ocp.args.StandardRestore(_abstract_target(target_state)),
                METADATA_ITEM: ocp.args.JsonRestore(),
            }
        )
        try:
            restored = self._manager.restore(step, args=args)
        except ValueError as error:  # Differences the shape check cannot see (e.g. empty subtrees).
            raise CheckpointMismatchError(
                f"checkpoint {self.directory}/{step} does not fit the current train state; it was written by "
                f"a different architecture or config. Orbax says: {error}"
            ) from error
        return restored[STATE_ITEM], dict(restored[METADATA_ITEM] or {})

    def wait_until_finished(self) -> None:
        """Blocks until every started save is completely on disk."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        """Waits for pending saves, then releases orbax's background resources."""
        self._manager.wait_until_finished()
        self._manager.close()

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()


def read_metadata(directory: str | os.PathLike, step: int | None = None) -> dict[str, Any]:
    """The JSON metadata of ``step`` (default: latest) without needing a train state, for tools."""
    directory = os.path.abspath(os.fspath(directory))
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"checkpoint directory {directory} does not exist.")
    options = ocp.CheckpointManagerOptions(read_only=True, create=False)
    manager = ocp.CheckpointManager(directory, options=options, item_handlers=_item_handlers())
    try:
        if step is None:
            step = manager.latest_step()
            if step is None:
                raise FileNotFoundError(f"no finished checkpoint in {directory}.")
        elif step not in manager.all_steps():
            raise FileNotFoundError(
                f"no finished checkpoint for step {step} in {directory}; available: {sorted(manager.all_steps())}"
            )
        restored = manager.restore(step, args=ocp.args.Composite(**{METADATA_ITEM: ocp.args.JsonRestore()}))
        return dict(restored[METADATA_ITEM] or {})
    finally:
        manager.close()
