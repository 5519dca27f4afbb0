"""Action-free video datasets for world-model pre-training, and a deterministic background prefetcher.

Two sources, one sampling contract (`sample(rng, batch_size, length, rows=None)`):
- `NpzEpisodeDataset`: DreamerV2 episode files (`*.npz` with an `image` key), as written by
  `experiments/generate_videos.py` and as in APV's RLBench `train_episodes/` directory.
- `SomethingSomethingDataset`: Something-Something-V2 frame folders `<root>/<video_id>/%06d.jpg`.

Each sampled sequence is `length` consecutive frames from a uniformly chosen episode/video with a
uniform start (with `frame_stride` k > 1, every k-th frame: the video at 1/k of its frame rate),
and `is_first[:, 0] = True` (spec section 0: every training sequence starts a new episode).
Unusable files are skipped with a `VideoDataWarning` naming them and counted in `stats()`.

Determinism: every row of a batch draws from its own generator (row b from child b of the
generator's seed sequence, `rng.spawn`), which file is unusable is a fixed property of the data, and
a draw that lands on an unusable item is re-drawn from that row's generator. So a row depends only on
the generator's seed and its row index: not on which thread found a corrupt file first, nor on which
other rows were loaded. `sample(..., rows=...)` loads just the given rows (one process's share of a
multi-host batch) and they equal the same rows of the whole batch.
"""

from __future__ import annotations

import collections
import logging
import os
import threading
import warnings
import zipfile
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from prelar_jax.errors import UserError

log = logging.getLogger(__name__)

IMAGE_SIZE = 64
_HOW_TO_MAKE_DATA = (
    "Make Meta-World expert videos with `python experiments/generate_videos.py --out data/videos` "
    "(DreamerV2 .npz episodes), or point the loader at APV's RLBench `train_episodes/` directory or at "
    "Something-Something-V2 frame folders (`--kind something` with a video list file)."
)
_MAX_NAMES = 50  # names listed in one warning
# Keys of stats()["skipped_<reason>"]; always all present so metrics have a stable set of names.
SKIP_REASONS = ("corrupt", "bad_format", "missing_image", "too_short", "unreadable", "malformed_line")


class VideoDataWarning(UserWarning):
    """A video file or list entry was skipped."""


class NoVideoDataError(UserError, ValueError):
    """A video dataset has no usable episode or video for the requested sequence length."""


def _warn_skipped(reason: str, names: Sequence[str]) -> None:
    if not names:
        return
    shown = ", ".join(names[:_MAX_NAMES])
    more = f" ... and {len(names) - _MAX_NAMES} more" if len(names) > _MAX_NAMES else ""
    msg = f"Skipped {len(names)} video file(s): {reason}: {shown}{more}"
    log.warning(msg)
    warnings.warn(msg, VideoDataWarning, stacklevel=3)


def _length_summary(lengths: np.ndarray, limit: int = 8) -> str:
    """'[12, 20, 24]' or, for many items, 'min 12, median 20, max 24' (frames per item)."""
    if lengths.size <= limit:
        return str(sorted(int(n) for n in lengths))
    return f"min {int(lengths.min())}, median {int(np.median(lengths))}, max {int(lengths.max())}"


class _VideoSource:
    """Shared sampling, skip bookkeeping and caching; subclasses index items and load frames.

    Subclasses set `self._names` (for messages) and `self._lengths` (frames per item, int64 [N]) for
    the items that passed their construction checks, and implement `_load_frames(i, start, length)`.
    """

    _what: str = "videos"  # used in messages

    def __init__(self, min_length: int, size: int, frame_stride: int = 1) -> None:
        if int(frame_stride) != frame_stride or frame_stride < 1:
            raise NoVideoDataError(
                f"frame_stride (--config.data.frame_stride) must be a positive integer (1: every "
                f"frame), got {frame_stride!r}"
            )
        self.size = size
        self.frame_stride = int(frame_stride)
        self._lock = threading.Lock()
        self._names: list[str] = []
        self._lengths = np.zeros((0,), np.int64)
        self._skipped: collections.Counter[str] = collections.Counter()  # reason -> count
        self._bad: set[int] = set()  # items found unreadable while loading
        self._eligible: dict[int, np.ndarray] = {}  # length -> indices of items with >= length frames
        self._max_length = 0  # longest sequence length requested; defines "too short"
        self._min_length = max(1, int(min_length))

    # ---------------------------------------------------------------- subclass interface
    def _load_frames(self, i: int, start: int, length: int) -> np.ndarray:
        """Frames start, start + k, ..., start + (length - 1) k (k = frame_stride) of item i,
        [length, size, size, 3] uint8; raise on unreadable data."""
        raise NotImplementedError

    def _span(self, length: int) -> int:
        """Source frames a sequence of `length` sampled frames covers."""
        return (length - 1) * self.frame_stride + 1

    def _where(self) -> str:
        raise NotImplementedError

    # ---------------------------------------------------------------- shared logic
    def _finish_index(self) -> None:
        """Apply `min_length` right after indexing so construction fails early on unusable data."""
        self._eligible_indices(self._min_length)

    def _eligible_indices(self, length: int) -> np.ndarray:
        """Items with at least `length` source frames (a span: see `_span`)."""
        with self._lock:
            if length in self._eligible:
                ok = self._eligible[length]
            else:
                ok = np.flatnonzero(self._lengths >= length)
                self._eligible[length] = ok
            newly_short: list[str] = []
            if length > self._max_length:
                was_short = self._lengths < self._max_length
                now_short = self._lengths < length
                newly_short = [self._names[i] for i in np.flatnonzero(now_short & ~was_short)]
                self._max_length = length
        _warn_skipped(f"fewer than {length} frames", newly_short)
        if ok.size == 0:
            longest = int(self._lengths.max()) if self._lengths.size else 0
            k = self.frame_stride
            strided = f" (a sequence of T frames at frame_stride {k} spans (T - 1) * {k} + 1 of them)" if k > 1 else ""
            most = (longest - 1) // k + 1 if longest else 0
            raise self._no_data(
                f"none has at least {length} frames{strided}: the longest of {self._lengths.size} has {longest}, "
                f"lengths {_length_summary(self._lengths)}; use a sequence length of at most {most} "
                "(pre-training: --config.sequence_length)"
                + (", a smaller --config.data.frame_stride" if k > 1 else "")
                + " or longer videos"
            )
        return ok

    def _no_data(self, why: str) -> NoVideoDataError:
        counts = ", ".join(f"{k}: {v}" for k, v in sorted(self.file_counts().items()))
        return NoVideoDataError(f"No usable {self._what} in {self._where()} ({why}; {counts}). {_HOW_TO_MAKE_DATA}")

    def _mark_bad(self, i: int, exc: BaseException) -> None:
        with self._lock:
            if i in self._bad:
                return
            self._bad.add(i)
        _warn_skipped(f"unreadable ({type(exc).__name__}: {exc})", [self._names[i]])

    def _all_bad(self, eligible: np.ndarray) -> bool:
        with self._lock:
            if len(self._bad) < len(eligible):  # cheap common case
                return False
            return all(int(i) in self._bad for i in eligible)

    def sample(
        self, rng: np.random.Generator, batch_size: int, length: int, rows: Sequence[int] | None = None
    ) -> dict[str, np.ndarray]:
        """A batch of `length` consecutive frames from uniformly chosen items with uniform starts.

        Returns {'image': uint8 [R, T, size, size, 3], 'is_first': bool [R, T]} with is_first[:, 0]
        True, for the rows `rows` (indices in 0..batch_size-1, in the order given; default all
        batch_size rows). Row b draws its item and start (and re-draws after an unreadable item) from
        `rng.spawn(batch_size)[b]` alone, so `sample(rng, B, T, rows=r)` equals `sample(rng, B, T)[r]` for
        generators seeded alike, and only the requested rows' frames are read. Like any draw, it
        advances `rng` (its seed sequence's spawn counter): seed a fresh generator for a repeatable batch.
        """
        if batch_size < 1 or length < 1:
            raise ValueError(f"batch_size and length must be positive, got {batch_size} and {length}")
        rows = range(batch_size) if rows is None else [int(r) for r in rows]
        if any(not 0 <= r < batch_size for r in rows):
            raise ValueError(f"rows must lie in 0..{batch_size - 1}, got {list(rows)}")
        span = self._span(length)
        eligible = self._eligible_indices(span)
        # Row b's generator is rng.spawn(batch_size)[b] whichever rows are loaded; only the requested
        # rows' generators are built.
        children = rng.bit_generator.seed_seq.spawn(batch_size)
        images = np.empty((len(rows), length, self.size, self.size, 3), np.uint8)  # [R, T, H, W, 3]
        for k, row in enumerate(rows):
            row_rng = np.random.Generator(type(rng.bit_generator)(children[row]))
            while True:
                i = int(eligible[row_rng.integers(len(eligible))])
                start = int(row_rng.integers(self._lengths[i] - span + 1))
                # A bad item is re-drawn with the same draws whether or not it was already known bad.
                if i not in self._bad:
                    try:
                        images[k] = self._load_frames(i, start, length)
                        break
                    except Exception as exc:  # corrupt zip/JPEG, missing frame, wrong decoded shape
                        self._mark_bad(i, exc)
                if self._all_bad(eligible):
                    raise self._no_data(f"every item with at least {span} frames is unreadable")
        is_first = np.zeros((len(rows), length), bool)  # [R, T]
        is_first[:, 0] = True
        return {"image": images, "is_first": is_first}

    def file_counts(self) -> dict[str, int]:
        """Counts for logging: usable files and frames, and skipped files (total and by reason)."""
        with self._lock:
            long_enough = self._lengths >= max(self._max_length, 1)  # [N]
            bad = np.zeros_like(long_enough)
            bad[list(self._bad)] = True
            usable = long_enough & ~bad
            skipped = {k: int(self._skipped[k]) for k in SKIP_REASONS}
            skipped["too_short"] = int((~long_enough).sum())
            skipped["unreadable"] = int((long_enough & bad).sum())  # each skipped file counted once
            out = {
                "files_ok": int(usable.sum()),
                "frames_ok": int(self._lengths[usable].sum()),
                "files_skipped": int(sum(skipped.values())),
            }
        out.update({f"skipped_{k}": int(v) for k, v in skipped.items()})
        return out

    def __len__(self) -> int:
        return int(self._lengths.size)


def _read_npy_header(fp) -> tuple[tuple[int, ...], np.dtype]:
    """Shape and dtype of a .npy stream from its header only (no pickles, no data read)."""
    version = np.lib.format.read_magic(fp)
    if version == (1, 0):
        shape, _, dtype = np.lib.format.read_array_header_1_0(fp)
    elif version in ((2, 0), (3, 0)):
        shape, _, dtype = np.lib.format.read_array_header_2_0(fp)
    else:
        raise ValueError(f"unsupported .npy version {version}")
    return tuple(int(s) for s in shape), np.dtype(dtype)


class NpzEpisodeDataset(_VideoSource):
    """DreamerV2 `.npz` episodes found recursively under `paths` (directories or files).

    Only the `image` key is used (uint8 [L+1, size, size, 3]). Construction reads just each file's
    `image.npy` header; episodes are decoded on demand and kept in an LRU cache of `cache_bytes`.
    """

    _what = "episodes (*.npz with an 'image' key)"

    def __init__(
        self,
        paths: str | os.PathLike | Sequence[str | os.PathLike],
        min_length: int = 1,
        size: int = IMAGE_SIZE,
        cache_bytes: int = 1 << 30,
        frame_stride: int = 1,
    ) -> None:
        super().__init__(min_length, size, frame_stride)
        if isinstance(paths, (str, os.PathLike)):
            paths = [paths]
        self._roots = [Path(p).expanduser() for p in paths]
        self._cache: collections.OrderedDict[int, np.ndarray] = collections.OrderedDict()
        self._cache_bytes = int(cache_bytes)
        self._cached = 0
        files: list[Path] = []
        for root in self._roots:
            if root.is_file():
                files.append(root)
            elif root.is_dir():
                files.extend(sorted(p for p in root.rglob("*.npz") if p.is_file()))
        self._files: list[Path] = []
        lengths: list[int] = []
        bad: dict[str, list[str]] = collections.defaultdict(list)
        for path in files:
            reason, n = self._index_file(path)
            if reason:
                bad[reason].append(str(path))
                self._skipped[reason.split(" ")[0]] += 1
            else:
                self._files.append(path)
                lengths.append(n)
        for reason, names in bad.items():
            _warn_skipped(reason, names)
        self._names = [str(p) for p in self._files]
        self._lengths = np.asarray(lengths, np.int64)
        if not self._files:
            raise self._no_data(f"found {len(files)} *.npz file(s), none usable")
        self._finish_index()

    def _where(self) -> str:
        missing = [str(r) for r in self._roots if not r.exists()]
        where = ", ".join(str(r) for r in self._roots) or "(no paths given)"
        return where + (f" (missing: {', '.join(missing)})" if missing else "")

    def _index_file(self, path: Path) -> tuple[str, int]:
        """('', frames) for a usable file, else (reason, 0). Reasons start with their stats key."""
        try:
            with zipfile.ZipFile(path) as zf:
                if "image.npy" not in zf.namelist():
                    return "missing_image (no 'image' key)", 0
                with zf.open("image.npy") as fp:
                    shape, dtype = _read_npy_header(fp)
        except Exception as exc:  # not a zip, truncated, bad header
            return f"corrupt ({type(exc).__name__})", 0
        want = (self.size, self.size, 3)
        if dtype.hasobject:  # loading it would need pickle, which can run arbitrary code
            return "bad_format (image is a pickled object array; it is never loaded: store uint8 frames)", 0
        if dtype != np.uint8 or len(shape) != 4 or shape[1:] != want:
            return f"bad_format (image must be uint8 [L, {self.size}, {self.size}, 3]; got {dtype} {list(shape)})", 0
        return "", shape[0]

    def _episode(self, i: int) -> np.ndarray:
        with self._lock:
            if i in self._cache:
                self._cache.move_to_end(i)
                return self._cache[i]
        with np.load(self._files[i], allow_pickle=False) as data:
            image = data["image"]  # [L+1, H, W, 3] uint8
        if image.dtype != np.uint8 or image.shape != (self._lengths[i], self.size, self.size, 3):
            raise ValueError(f"decoded image {image.dtype} {image.shape} does not match its header")
        with self._lock:
            if i not in self._cache:
                self._cache[i] = image
                self._cached += image.nbytes
                while self._cached > self._cache_bytes and len(self._cache) > 1:
                    _, old = self._cache.popitem(last=False)
                    self._cached -= old.nbytes
        return image

    def _load_frames(self, i: int, start: int, length: int) -> np.ndarray:
        return self._episode(i)[start : start + self._span(length) : self.frame_stride]


class SomethingSomethingDataset(_VideoSource):
    """Something-Something-V2 frames `<frames_root>/<video_id>/%06d.jpg` (1-indexed), listed in
    `video_list` by lines `<video_id> <num_frames> <class_idx>` (PreLAR's `train_video_folder.txt`).

    Frame counts come from the list (no directory scan of ~170k folders); a missing or unreadable
    frame marks the video unusable when it is first drawn. Frames that are not size x size are resized.
    """

    _what = "videos"

    def __init__(
        self,
        frames_root: str | os.PathLike,
        video_list: str | os.PathLike,
        min_length: int = 1,
        size: int = IMAGE_SIZE,
        frame_stride: int = 1,
    ) -> None:
        super().__init__(min_length, size, frame_stride)
        self._root = Path(frames_root).expanduser()
        self._list = Path(video_list).expanduser()
        if not self._root.is_dir():
            raise self._no_data(f"frames root {self._root} is not a directory")
        if not self._list.is_file():
            raise self._no_data(f"video list {self._list} does not exist")
        ids: list[str] = []
        lengths: list[int] = []
        malformed: list[str] = []
        for lineno, line in enumerate(self._list.read_text().splitlines(), 1):
            parts = line.split()
            if not parts:
                continue
            try:
                if len(parts) < 2:
                    raise ValueError
                n = int(parts[1])
            except ValueError:
                malformed.append(f"{self._list}:{lineno} {line.strip()!r}")
                continue
            ids.append(parts[0])
            lengths.append(n)
        self._skipped["malformed_line"] = len(malformed)
        _warn_skipped("malformed line (want '<video_id> <num_frames> <class_idx>')", malformed)
        self._ids = ids
        self._names = [str(self._root / v) for v in ids]
        self._lengths = np.asarray(lengths, np.int64)
        if not ids:
            raise self._no_data("the video list has no entries")
        self._finish_index()

    def _where(self) -> str:
        return f"{self._root} (list {self._list})"

    def _load_frames(self, i: int, start: int, length: int) -> np.ndarray:
        from PIL import Image

        folder = self._root / self._ids[i]
        out = np.empty((length, self.size, self.size, 3), np.uint8)  # [T, H, W, 3]
        for t in range(length):
            with Image.open(folder / f"{start + t * self.frame_stride + 1:06d}.jpg") as im:  # 1-indexed
                im = im.convert("RGB")
                if im.size != (self.size, self.size):
                    im = im.resize((self.size, self.size), Image.BICUBIC)  # ffmpeg scale's default
                out[t] = np.asarray(im)
        return out


def make_video_dataset(kind: str, root: str, video_list: str = "", **kwargs) -> _VideoSource:
    """Build a dataset: kind 'npz' (root: comma-separated directories) or 'something' (needs video_list)."""
    if kind == "npz":
        return NpzEpisodeDataset([r for r in (s.strip() for s in root.split(",")) if r], **kwargs)
    if kind == "something":
        if not video_list:
            raise ValueError(
                "kind='something' needs video_list: a file of '<video_id> <num_frames> <class_idx>' lines "
                "(PreLAR's data/somethingv2/train_video_folder.txt)"
            )
        return SomethingSomethingDataset(root, video_list, **kwargs)
    raise ValueError(f"Unknown video dataset kind {kind!r}; use 'npz' or 'something'")


class BatchPrefetcher:
    """Yields `(step, batch)` for steps start_step .. start_step + num_steps - 1, in order.

    The batch of step s is `dataset.sample(np.random.default_rng([seed, s]), batch_size, length, rows)`,
    so a run resumed at step s sees exactly the batches the uninterrupted run saw. `rows` (default all
    batch_size) are the rows this process loads: in a multi-host run each process passes its own block
    (`parallel.process_rows`), and the blocks together are the one-process batch. `num_threads` threads
    fill at most `buffer` steps ahead of the consumer; an exception in a thread is re-raised in the
    consumer. Use as a context manager or call `close()`.
    """

    def __init__(
        self,
        dataset: _VideoSource,
        batch_size: int,
        length: int,
        seed: int,
        start_step: int,
        num_steps: int,
        num_threads: int = 2,
        buffer: int = 4,
        rows: Sequence[int] | None = None,
    ) -> None:
        if seed < 0 or start_step < 0 or num_steps < 0:
            raise ValueError(f"seed, start_step and num_steps must be >= 0, got {seed}, {start_step}, {num_steps}")
        if num_threads < 1 or buffer < 1:
            raise ValueError(f"num_threads and buffer must be >= 1, got {num_threads} and {buffer}")
        self._dataset = dataset
        self._batch_size = batch_size
        self._length = length
        self._rows = rows
        self._seed = seed
        self._end = start_step + num_steps
        self._buffer = buffer
        self._cond = threading.Condition()
        self._next_claim = start_step  # next step a thread will sample
        self._next_yield = start_step  # next step the consumer gets
        self._ready: dict[int, dict[str, np.ndarray]] = {}
        self._error: BaseException | None = None
        self._error_step = 0  # the step whose sampling raised ``_error`` (the earliest such)
        self._closed = False
        self._threads = [
            threading.Thread(target=self._work, name=f"BatchPrefetcher-{k}", daemon=True) for k in range(num_threads)
        ]
        for th in self._threads:
            th.start()

    def _work(self) -> None:
        while True:
            with self._cond:
                while (
                    not self._closed
                    and self._error is None
                    and self._next_claim < self._end
                    and self._next_claim >= self._next_yield + self._buffer
                ):
                    self._cond.wait()
                if self._closed or self._error is not None or self._next_claim >= self._end:
                    return
                step = self._next_claim
                self._next_claim += 1
            try:
                batch = self._dataset.sample(
                    np.random.default_rng([self._seed, step]), self._batch_size, self._length, rows=self._rows
                )
            except BaseException as exc:  # handed to the consumer when it reaches this step
                with self._cond:
                    if self._error is None or step < self._error_step:
                        self._error, self._error_step = exc, step
                    self._cond.notify_all()
                return
            with self._cond:
                self._ready[step] = batch
                self._cond.notify_all()

    def __iter__(self) -> Iterator[tuple[int, dict[str, np.ndarray]]]:
        return self

    def __next__(self) -> tuple[int, dict[str, np.ndarray]]:
        with self._cond:
            if self._next_yield >= self._end or self._closed:
                raise StopIteration
            # Steps before a failed one were claimed earlier and still arrive: deliver them first.
            while self._next_yield not in self._ready and (self._error is None or self._next_yield < self._error_step):
                self._cond.wait()
            if self._next_yield in self._ready:
                step = self._next_yield
                batch = self._ready.pop(step)
                self._next_yield += 1
                self._cond.notify_all()
                return step, batch
            error = self._error
        self.close()
        raise error

    def close(self) -> None:
        """Stop the threads (each finishes the batch it is sampling) and drop buffered batches."""
        with self._cond:
            self._closed = True
            self._ready.clear()
            self._cond.notify_all()
        for th in self._threads:
            if th is not threading.current_thread():
                th.join()

    def __enter__(self) -> "BatchPrefetcher":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
