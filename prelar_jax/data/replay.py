"""The fine-tuning replay: complete uint8 episodes in memory, sampled as DreamerV2 did.

Step t of an episode holds (o_t, a_t, r_t, is_first_t, is_last_t, is_terminal_t, success_t), where
a_t is the action that produced o_t; the reset step has a_0 = 0 and r_0 = 0 (spec section 0).

Behaviour copied from DreamerV2's `Replay` (spec section 7):
- capacity is counted in stored steps (frames); the oldest episodes are dropped when over it;
- an episode is chosen uniformly among those with at least `length` steps;
- with `prioritize_ends` the start is `min(randint(0, total - length + 1 + length), total - length)`,
  so P(start = s) = 1 / (total + 1) for s < total - length and (length + 1) / (total + 1) for the
  last window; otherwise the start is uniform over the total - length + 1 windows;
- `is_first[:, 0]` is forced True on every sampled sequence.

Keys: an episode is stored with exactly `EPISODE_KEYS`. Any other key in a step or an episode (for
example Meta-World's `state` vector) is ignored, on purpose: the agent never sees it and it would
only cost memory and disk. `sample` returns `SAMPLE_KEYS` (everything but `success`).

Files and resumable runs. With a `directory`, each finished episode is written atomically (temporary
name, then `os.replace`) as `<directory>/<episode index, 6+ digits>-<steps>.npz` with
`np.savez_compressed`, where steps = frames - 1 as in DreamerV2's names. Compression was measured on
a 501-frame Meta-World episode: 54 ms and 0.41 MB compressed against 10 ms and 6.2 MB plain, i.e.
about 0.1 ms per env step for a 15x smaller directory, so files are compressed.
A checkpoint records `state_dict()` (names of the held episodes, in order, and the counters) and
`Replay.restore` loads exactly those files, so episodes written after the checkpoint are ignored.
Eviction only drops an episode from memory and never deletes its file, because the last saved
checkpoint may still reference it: a crash before the next checkpoint must find every file that
checkpoint names. Files are deleted only by `prune_files(keep_names)`, which the run calls once a
checkpoint is safely on disk; it keeps the names given (every checkpoint one may still restore) and
every episode held in memory, and deletes all other episode files, including those left by a crashed
run after its last checkpoint. The directory therefore stays bounded by the capacity plus the
episodes evicted since the last checkpoint. One directory belongs to one `Replay`.

Threads: `sample` may run in a prefetch thread while the main thread adds steps. Stored episode
arrays are read-only and never change, so a sample only needs the list of episodes under a lock.
"""

from __future__ import annotations

import collections
import os
import re
import threading
import zipfile
from pathlib import Path
from typing import Any, Iterable, Mapping

import numpy as np

from prelar_jax.errors import UserError

EPISODE_KEYS = ("image", "action", "reward", "is_first", "is_last", "is_terminal", "success")
SAMPLE_KEYS = ("image", "action", "reward", "is_first", "is_last", "is_terminal")
_DTYPES = {
    "image": np.uint8,
    "action": np.float32,
    "reward": np.float32,
    "is_first": np.bool_,
    "is_last": np.bool_,
    "is_terminal": np.bool_,
    "success": np.bool_,
}
_FLAGS = ("is_first", "is_last", "is_terminal", "success")
_NAME_RE = re.compile(r"^(\d+)-(\d+)\.npz$")
_TMP_RE = re.compile(r"^\.(\d+)-(\d+)\.npz\.tmp$")
_STATE_VERSION = 1


class ReplayError(UserError, ValueError):
    """Bad replay input, state or files; the message says what to change."""


class ReplayTooSmallError(ReplayError):
    """No stored episode is long enough for the requested sequence length."""


class ReplayFileError(ReplayError):
    """An episode file named by a replay state is missing, unreadable or malformed."""


def episode_filename(index: int, frames: int) -> str:
    """`<index, zero-padded to 6+ digits>-<frames - 1>.npz`; steps = frames - 1 as DreamerV2 names them."""
    return f"{index:06d}-{frames - 1}.npz"


def _validate_episode(episode: Mapping[str, Any], where: str) -> dict[str, np.ndarray]:
    """Checked arrays of `EPISODE_KEYS` (extra keys dropped); raises `ReplayError` saying what is wrong.

    Images must already be uint8 (a float image is a bug upstream, not something to cast silently);
    the other keys are converted to their dtype.
    """
    missing = [k for k in EPISODE_KEYS if k not in episode]
    if missing:
        raise ReplayError(f"{where}: missing key(s) {missing}; an episode needs {list(EPISODE_KEYS)}")
    image = np.asarray(episode["image"])
    if image.dtype != np.uint8:
        raise ReplayError(f"{where}: image must be uint8, got {image.dtype}")
    if image.ndim != 4 or image.shape[-1] != 3:
        raise ReplayError(f"{where}: image must be [L, H, W, 3], got shape {image.shape}")
    out = {"image": image}
    for key in EPISODE_KEYS[1:]:
        value = np.asarray(episode[key])
        if value.dtype == object:
            raise ReplayError(f"{where}: {key} is an object array; numbers are needed")
        out[key] = value.astype(_DTYPES[key], copy=False)
    lengths = {k: len(v) if v.ndim else None for k, v in out.items()}
    if len(set(lengths.values())) != 1:
        raise ReplayError(f"{where}: every key must have the same length, got {lengths}")
    length = lengths["image"]
    if length < 2:
        raise ReplayError(f"{where}: an episode needs at least 2 steps (reset + 1 step), got {length}")
    if out["action"].ndim != 2:
        raise ReplayError(f"{where}: action must be [L, A], got shape {out['action'].shape}")
    for key in ("reward",) + _FLAGS:
        if out[key].ndim != 1:
            raise ReplayError(f"{where}: {key} must be [L], got shape {out[key].shape}")
    if not out["is_first"][0] or out["is_first"][1:].any():
        where_true = np.flatnonzero(out["is_first"]).tolist()
        raise ReplayError(f"{where}: is_first must be True on step 0 only, got True at steps {where_true}")
    if not out["is_last"][-1]:
        raise ReplayError(f"{where}: is_last must be True on the final step of a complete episode")
    return out


class Replay:
    """Complete episodes of one or more environments, sampled as [B, T, ...] training sequences.

    Args:
      capacity: the most stored steps (frames, summed over episodes); older episodes are dropped.
      directory: where finished episodes are written (`None`: memory only).
      prioritize_ends: DreamerV2's start rule (see the module docstring); False: uniform starts.
    """

    def __init__(self, capacity: int, directory: str | os.PathLike | None = None, prioritize_ends: bool = True):
        if int(capacity) < 2:
            raise ReplayError(f"replay capacity must be at least 2 steps, got {capacity}")
        self.capacity = int(capacity)
        self.directory = None if directory is None else Path(directory)
        if self.directory is not None:
            self.directory.mkdir(parents=True, exist_ok=True)
        self.prioritize_ends = bool(prioritize_ends)
        self._lock = threading.Lock()  # guards the held episodes (sampling may run in another thread)
        self._io_lock = threading.Lock()  # orders episode files against prune_files
        self._episodes: collections.OrderedDict[str, dict[str, np.ndarray]] = collections.OrderedDict()
        self._num_steps = 0
        self._total_episodes = 0
        self._ongoing: dict[int, list[dict[str, np.ndarray]]] = {}  # env index -> steps so far
        # Snapshot for sampling, rebuilt lazily after a change: (episodes, lengths int64 [N]).
        self._snapshot: tuple[list[dict[str, np.ndarray]], np.ndarray] | None = None

    # ----------------------------------------------------------------------------------- counters

    @property
    def num_episodes(self) -> int:
        """Episodes held now."""
        return len(self._episodes)

    @property
    def num_steps(self) -> int:
        """Frames held now, summed over episodes (what `capacity` bounds)."""
        return self._num_steps

    @property
    def total_episodes(self) -> int:
        """Episodes ever added, evicted ones included; also the index of the next episode's file."""
        return self._total_episodes

    def episode_names(self) -> list[str]:
        """File names of the held episodes, oldest first (set even without a directory)."""
        with self._lock:
            return list(self._episodes)

    def get_episode(self, name: str) -> dict[str, np.ndarray]:
        """The held episode `name` (read-only arrays, not copies); KeyError if it is not held."""
        with self._lock:
            return dict(self._episodes[name])

    def ongoing_length(self, env_index: int) -> int:
        """Steps collected so far in env `env_index`'s unfinished episode (0 if none)."""
        return len(self._ongoing.get(env_index, ()))

    # ------------------------------------------------------------------------------------- adding

    def add_step(self, env_index: int, step: Mapping[str, Any]) -> str | None:
        """Append one step of env `env_index`; returns the episode's file name when `step` ends it.

        `step`: image uint8 [H, W, 3], action [A], reward, is_first, is_last, is_terminal, success;
        other keys are ignored. `is_first` starts a new episode (an unfinished one of that env is
        dropped); `is_last` finishes it and stores it.
        """
        missing = [k for k in EPISODE_KEYS if k not in step]
        if missing:
            raise ReplayError(f"env {env_index}: step is missing key(s) {missing}; a step needs {list(EPISODE_KEYS)}")
        image = np.asarray(step["image"])
        if image.dtype != np.uint8 or image.ndim != 3:
            raise ReplayError(f"env {env_index}: step image must be uint8 [H, W, 3], got {image.dtype} {image.shape}")
        row = {"image": image, "action": np.asarray(step["action"], np.float32)}
        for key in ("reward",) + _FLAGS:
            row[key] = np.asarray(step[key], _DTYPES[key])
            if row[key].ndim != 0:
                raise ReplayError(f"env {env_index}: step {key} must be a scalar, got shape {row[key].shape}")
        if row["is_first"]:
            self._ongoing[env_index] = []
        elif env_index not in self._ongoing:
            raise ReplayError(
                f"env {env_index}: got a step without is_first but that env has no episode in progress "
                "(its first step was never added, or it was discarded); add the reset step first"
            )
        steps = self._ongoing[env_index]
        if steps:
            first = steps[0]
            for key in ("image", "action"):
                if row[key].shape != first[key].shape:
                    raise ReplayError(
                        f"env {env_index}: step {len(steps)} has {key} shape {row[key].shape}, "
                        f"but the episode started with {first[key].shape}"
                    )
        steps.append(row)
        if not row["is_last"]:
            return None
        del self._ongoing[env_index]
        episode = {k: np.stack([s[k] for s in steps]) for k in EPISODE_KEYS}
        return self._store(_validate_episode(episode, f"episode of env {env_index}"))

    def add_batch(self, obs: Mapping[str, np.ndarray], actions: np.ndarray) -> list[str]:
        """`add_step` for envs 0..N-1 from batched arrays: obs[key] is [N, ...], actions [N, A].

        `actions[i]` is the action that produced `obs[...][i]` (zeros on reset steps). Returns the
        names of the episodes this batch finished.
        """
        actions = np.asarray(actions)
        n = len(actions)
        for key in EPISODE_KEYS:
            if key != "action" and (key not in obs or len(obs[key]) != n):
                raise ReplayError(f"add_batch: obs[{key!r}] must be present with {n} rows (one per action)")
        names = []
        for i in range(n):
            step = {k: obs[k][i] for k in EPISODE_KEYS if k != "action"}
            step["action"] = actions[i]
            name = self.add_step(i, step)
            if name is not None:
                names.append(name)
        return names

    def discard(self, env_index: int) -> int:
        """Drop env `env_index`'s unfinished episode (its worker crashed); returns the steps dropped."""
        return len(self._ongoing.pop(env_index, ()))

    def add_episode(self, episode: Mapping[str, np.ndarray]) -> str:
        """Store a whole episode (arrays of `EPISODE_KEYS`, all [L, ...]); returns its file name.

        The arrays are copied, so the caller may reuse its buffers.
        """
        checked = _validate_episode(episode, "add_episode")
        return self._store({k: np.array(v, copy=True) for k, v in checked.items()})

    def _store(self, episode: dict[str, np.ndarray], name: str | None = None) -> str:
        """Hold a validated episode (arrays we own), write its file unless `name` is given, evict."""
        length = len(episode["image"])
        if length > self.capacity:
            raise ReplayError(
                f"an episode of {length} steps does not fit in a replay capacity of {self.capacity} steps; "
                "raise the replay capacity"
            )
        with self._lock:
            if self._episodes:
                ref = next(iter(self._episodes.values()))
                for key in ("image", "action"):
                    if episode[key].shape[1:] != ref[key].shape[1:]:
                        raise ReplayError(
                            f"episode {key} shape per step {episode[key].shape[1:]} differs from the stored "
                            f"episodes' {ref[key].shape[1:]}"
                        )
        for value in episode.values():
            value.setflags(write=False)  # samples and snapshots rely on stored episodes never changing
        # The file and the memory entry appear together with respect to prune_files (io lock), so a
        # prune in another thread never deletes a file whose episode is about to be held.
        with self._io_lock:
            if name is None:
                name = episode_filename(self._total_episodes, length)
                if self.directory is not None:
                    self._write(name, episode)
                self._total_episodes += 1
            with self._lock:
                self._episodes[name] = episode
                self._num_steps += length
                while self._num_steps > self.capacity:
                    _, old = self._episodes.popitem(last=False)  # memory only: see prune_files
                    self._num_steps -= len(old["image"])
                self._snapshot = None
        return name

    def _write(self, name: str, episode: dict[str, np.ndarray]) -> None:
        """Atomic write: a crash leaves either no file or the whole file under `name`."""
        assert self.directory is not None
        tmp = self.directory / f".{name}.tmp"
        with open(tmp, "wb") as f:
            np.savez_compressed(f, **episode)
        os.replace(tmp, self.directory / name)

    # ----------------------------------------------------------------------------------- sampling

    def _snapshot_now(self) -> tuple[list[dict[str, np.ndarray]], np.ndarray]:
        """(held episodes, their lengths int64 [N]); rebuilt only after the store changed."""
        with self._lock:
            if self._snapshot is None:
                episodes = list(self._episodes.values())
                self._snapshot = (episodes, np.array([len(e["image"]) for e in episodes], np.int64))
            return self._snapshot

    def _too_small(self, length: int, lengths: np.ndarray) -> ReplayTooSmallError:
        counts = collections.Counter(lengths.tolist())
        shown = ", ".join(f"{n} x {L}" for L, n in sorted(counts.items())) or "none"
        ongoing = {e: len(s) for e, s in dict(self._ongoing).items() if s}  # copy: may run in a sampler thread
        return ReplayTooSmallError(
            f"cannot sample sequences of length {length}: the replay holds {len(lengths)} complete "
            f"episode(s) (count x steps: {shown}) and none has at least {length} steps"
            + (f"; unfinished episodes (env: steps so far) {ongoing} are not sampled" if ongoing else "")
            + ". Collect more data first (prefill) or use a shorter sequence length."
        )

    def sample(self, rng: np.random.Generator, batch_size: int, length: int) -> dict[str, np.ndarray]:
        """A batch of `SAMPLE_KEYS` arrays [B, T, ...]; each row is one contiguous slice of one episode.

        image uint8 [B, T, H, W, 3], action float32 [B, T, A], reward float32 [B, T], is_first /
        is_last / is_terminal bool [B, T] with is_first[:, 0] True. The only copy is into the batch.
        """
        if batch_size < 1 or length < 1:
            raise ValueError(f"batch_size and length must be positive, got {batch_size} and {length}")
        episodes, lengths = self._snapshot_now()
        eligible = np.flatnonzero(lengths >= length)  # [E]
        if not len(eligible):
            raise self._too_small(length, lengths)
        chosen = eligible[rng.integers(0, len(eligible), size=batch_size)]  # [B] uniform over eligible
        total = lengths[chosen]  # [B]
        upper = total - length + 1 + (length if self.prioritize_ends else 0)  # [B] exclusive bounds
        starts = np.minimum(rng.integers(0, upper), total - length)  # [B]
        ref = episodes[chosen[0]]
        batch = {k: np.empty((batch_size, length) + ref[k].shape[1:], ref[k].dtype) for k in SAMPLE_KEYS}
        for b, (i, s) in enumerate(zip(chosen.tolist(), starts.tolist())):
            episode = episodes[i]
            for key in SAMPLE_KEYS:
                batch[key][b] = episode[key][s : s + length]
        batch["is_first"][:, 0] = True
        return batch

    # -------------------------------------------------------------------------------- persistence

    def state_dict(self) -> dict[str, Any]:
        """JSON-able record of what the replay holds, for the run's checkpoint metadata."""
        with self._lock:
            return {
                "version": _STATE_VERSION,
                "episodes": list(self._episodes),
                "total_episodes": self._total_episodes,
                "capacity": self.capacity,
            }

    @classmethod
    def restore(
        cls,
        directory: str | os.PathLike,
        state: Mapping[str, Any],
        capacity: int,
        prioritize_ends: bool = True,
    ) -> "Replay":
        """A replay holding exactly the episodes `state` names, read from `directory`.

        Files in `directory` that `state` does not name (episodes written after the checkpoint) are
        not loaded; new episodes continue the numbering at `state["total_episodes"]` (a leftover file
        with the same name is overwritten). If `capacity` is smaller than before, the oldest restored
        episodes are dropped. A named file that is missing, corrupt or holds pickled objects raises
        `ReplayFileError` naming it.
        """
        try:
            names = [str(n) for n in state["episodes"]]
            total = int(state["total_episodes"])
        except (KeyError, TypeError, ValueError) as exc:
            raise ReplayError(
                f"replay state must have 'episodes' (list of file names) and 'total_episodes'; got keys "
                f"{sorted(state) if isinstance(state, Mapping) else type(state).__name__} ({exc})"
            ) from None
        if state.get("version", _STATE_VERSION) != _STATE_VERSION:
            raise ReplayError(f"replay state version {state.get('version')} is not {_STATE_VERSION}")
        if len(set(names)) != len(names):
            raise ReplayError(f"replay state names some episode file more than once: {names}")
        replay = cls(capacity, directory, prioritize_ends)
        assert replay.directory is not None
        for name in names:
            match = _NAME_RE.match(name)
            if match is None or "/" in name:
                raise ReplayError(f"replay state names {name!r}, which is not an episode file name like 000012-500.npz")
            if int(match.group(1)) >= total:
                raise ReplayError(f"replay state names {name!r} but counts only {total} episodes ever added")
            replay._store(replay._load(name), name=name)
        replay._total_episodes = total
        return replay

    def _load(self, name: str) -> dict[str, np.ndarray]:
        assert self.directory is not None
        path = self.directory / name
        if not path.is_file():
            raise ReplayFileError(
                f"replay episode file {path} is missing; the checkpoint's replay needs it. Restore from the "
                "workdir the checkpoint was written in, with its episode directory intact."
            )
        if not zipfile.is_zipfile(path):  # np.load would otherwise take it for a pickle
            raise ReplayFileError(f"replay episode file {path} is unreadable: not an .npz (zip) file")
        try:
            with np.load(path, allow_pickle=False) as data:
                episode = {k: data[k] for k in data.files if k in EPISODE_KEYS}
        except ValueError as exc:  # object arrays need pickle, which is refused
            raise ReplayFileError(f"replay episode file {path} cannot be loaded without pickle: {exc}") from None
        except (OSError, zipfile.BadZipFile, EOFError) as exc:
            raise ReplayFileError(f"replay episode file {path} is unreadable: {exc}") from None
        try:
            return _validate_episode(episode, f"replay episode file {path}")
        except ReplayError as exc:
            raise ReplayFileError(str(exc)) from None

    def prune_files(self, keep_names: Iterable[str]) -> list[str]:
        """Delete episode files that neither `keep_names` nor the memory holds; returns the deleted names.

        Call it only after a checkpoint is completely written (wait for asynchronous saves), with the
        episode names of every checkpoint you may still restore from. Files of episodes held in
        memory are always kept (the next checkpoint will name them), as are files that are not
        episode files. Leftover temporary files of interrupted writes are deleted too.
        """
        if isinstance(keep_names, str):
            raise TypeError("keep_names must be a collection of file names, not one string")
        if self.directory is None:
            return []
        keep_names = set(keep_names)
        deleted = []
        with self._io_lock:  # no episode file is being written meanwhile
            keep = keep_names | set(self.episode_names())
            for entry in sorted(os.listdir(self.directory)):
                if (_NAME_RE.match(entry) and entry not in keep) or _TMP_RE.match(entry):
                    try:
                        os.remove(self.directory / entry)
                    except FileNotFoundError:
                        continue
                    deleted.append(entry)
        return deleted
