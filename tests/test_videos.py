"""Video datasets and the prefetcher, on small files built in tmp_path (no rendering)."""

from __future__ import annotations

import threading
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from prelar_jax.data.videos import (
    SKIP_REASONS,
    BatchPrefetcher,
    NoVideoDataError,
    NpzEpisodeDataset,
    SomethingSomethingDataset,
    VideoDataWarning,
    make_video_dataset,
)


def _episode_images(file_id: int, frames: int, seed: int = 0) -> np.ndarray:
    """Random frames whose pixel (0, 0) encodes (file_id, frame index) so samples can be traced."""
    img = np.random.default_rng(seed + 1000 * file_id).integers(0, 256, (frames, 64, 64, 3), dtype=np.uint8)
    img[:, 0, 0, 0] = file_id
    img[:, 0, 0, 1] = np.arange(frames)
    return img  # [L+1, 64, 64, 3]


def _write_episode(path: Path, image: np.ndarray, **extra: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    n = len(image)
    np.savez_compressed(
        path,
        image=image,
        action=np.zeros((n, 4), np.float32),
        reward=np.zeros(n, np.float32),
        is_first=np.arange(n) == 0,
        **extra,
    )
    return path


def _trace(batch: dict) -> tuple[np.ndarray, np.ndarray]:
    """(file ids [B], frame indices [B, T]) decoded from pixel (0, 0)."""
    img = batch["image"]
    return img[:, 0, 0, 0, 0].astype(int), img[:, :, 0, 0, 1].astype(int)


@pytest.fixture
def episodes_dir(tmp_path: Path) -> Path:
    root = tmp_path / "eps"
    for k in range(3):  # nested dirs: the search is recursive
        _write_episode(root / f"task{k}" / f"20240101T000000-{k:032x}-29.npz", _episode_images(k, 30))
    return root


def _check_batch(batch: dict, batch_size: int, length: int) -> None:
    assert set(batch) == {"image", "is_first"}
    assert batch["image"].shape == (batch_size, length, 64, 64, 3) and batch["image"].dtype == np.uint8
    assert batch["is_first"].shape == (batch_size, length) and batch["is_first"].dtype == bool
    assert batch["is_first"][:, 0].all() and not batch["is_first"][:, 1:].any()


def test_npz_sample_is_a_contiguous_slice_of_a_source_episode(episodes_dir: Path) -> None:
    ds = NpzEpisodeDataset(episodes_dir)
    batch = ds.sample(np.random.default_rng(0), 6, 10)
    _check_batch(batch, 6, 10)
    ids, frames = _trace(batch)
    for b in range(6):
        start = frames[b, 0]
        assert 0 <= start <= 30 - 10
        np.testing.assert_array_equal(batch["image"][b], _episode_images(ids[b], 30)[start : start + 10])
    assert ds.file_counts()["files_ok"] == 3 and ds.file_counts()["files_skipped"] == 0
    assert ds.file_counts()["frames_ok"] == 90


def test_sampling_covers_files_and_start_positions(episodes_dir: Path) -> None:
    ds = NpzEpisodeDataset(str(episodes_dir))
    ids, frames = _trace(ds.sample(np.random.default_rng(1), 300, 25))
    assert set(ids) == {0, 1, 2}
    assert set(frames[:, 0]) == set(range(6))  # every start 0..30-25
    counts = np.bincount(ids, minlength=3)
    assert counts.min() > 60  # uniform over 3 files: about 100 each


def test_same_generator_seed_gives_same_batch(episodes_dir: Path) -> None:
    ds = NpzEpisodeDataset(episodes_dir)
    a = ds.sample(np.random.default_rng([7, 3]), 4, 8)
    b = ds.sample(np.random.default_rng([7, 3]), 4, 8)
    c = ds.sample(np.random.default_rng([7, 4]), 4, 8)
    np.testing.assert_array_equal(a["image"], b["image"])
    assert not np.array_equal(a["image"], c["image"])


def test_factory_takes_comma_separated_roots(tmp_path: Path) -> None:
    _write_episode(tmp_path / "a" / "x-1-29.npz", _episode_images(1, 30))
    _write_episode(tmp_path / "b" / "y-2-29.npz", _episode_images(2, 30))
    ds = make_video_dataset("npz", f"{tmp_path / 'a'}, {tmp_path / 'b'}")
    ids, _ = _trace(ds.sample(np.random.default_rng(0), 64, 5))
    assert set(ids) == {1, 2}
    with pytest.raises(ValueError, match="video_list"):
        make_video_dataset("something", str(tmp_path))
    with pytest.raises(ValueError, match="npz"):
        make_video_dataset("mp4", str(tmp_path))


def test_bad_files_are_skipped_named_and_counted(tmp_path: Path) -> None:
    good = _write_episode(tmp_path / "good.npz", _episode_images(5, 30))
    garbage = tmp_path / "garbage.npz"
    garbage.write_bytes(b"this is not a zip file" * 10)
    wrong_dtype = _write_episode(tmp_path / "float.npz", _episode_images(6, 30).astype(np.float32))
    wrong_shape = _write_episode(tmp_path / "small.npz", np.zeros((30, 32, 32, 3), np.uint8))
    short = _write_episode(tmp_path / "short.npz", _episode_images(7, 5))
    no_image = tmp_path / "noimage.npz"
    np.savez_compressed(no_image, reward=np.zeros(30, np.float32))
    with pytest.warns(VideoDataWarning) as record:
        ds = NpzEpisodeDataset(tmp_path, min_length=10)
    text = "\n".join(str(w.message) for w in record)
    for path in (garbage, wrong_dtype, wrong_shape, short, no_image):
        assert str(path) in text
    assert str(good) not in text
    stats = ds.file_counts()
    assert stats["files_ok"] == 1
    assert stats["files_skipped"] == 5
    assert stats["skipped_corrupt"] == 1
    assert stats["skipped_bad_format"] == 2
    assert stats["skipped_too_short"] == 1
    assert stats["skipped_missing_image"] == 1
    assert stats["files_ok"] + stats["files_skipped"] == 6  # every file counted once
    assert set(stats) >= {f"skipped_{r}" for r in SKIP_REASONS}
    ids, _ = _trace(ds.sample(np.random.default_rng(0), 16, 10))
    assert set(ids) == {5}


def test_too_short_for_a_longer_request_is_skipped_later(tmp_path: Path) -> None:
    _write_episode(tmp_path / "long.npz", _episode_images(1, 30))
    _write_episode(tmp_path / "short.npz", _episode_images(2, 12))
    ds = NpzEpisodeDataset(tmp_path)
    assert ds.file_counts()["files_ok"] == 2
    with pytest.warns(VideoDataWarning, match="short.npz"):
        ids, _ = _trace(ds.sample(np.random.default_rng(0), 32, 20))
    assert set(ids) == {1}
    assert ds.file_counts()["skipped_too_short"] == 1 and ds.file_counts()["files_ok"] == 1
    with pytest.warns(VideoDataWarning, match="long.npz"), pytest.raises(NoVideoDataError, match="at least 31"):
        ds.sample(np.random.default_rng(0), 1, 31)
    assert ds.file_counts()["files_ok"] == 0 and ds.file_counts()["skipped_too_short"] == 2


def test_corrupt_data_behind_a_valid_header_is_skipped_deterministically(tmp_path: Path) -> None:
    _write_episode(tmp_path / "good.npz", _episode_images(1, 30))
    bad = _write_episode(tmp_path / "bad.npz", _episode_images(2, 30))
    raw = bytearray(bad.read_bytes())
    mid = len(raw) // 2  # inside the compressed image data, well after the .npy header
    raw[mid : mid + 64] = bytes(64)
    bad.write_bytes(bytes(raw))
    fresh = NpzEpisodeDataset(tmp_path)  # the header still reads fine
    assert fresh.file_counts()["files_ok"] == 2
    with pytest.warns(VideoDataWarning, match="bad.npz"):
        first = fresh.sample(np.random.default_rng(3), 12, 10)
    assert set(_trace(first)[0]) == {1}
    assert fresh.file_counts()["skipped_unreadable"] == 1 and fresh.file_counts()["files_ok"] == 1
    with pytest.warns(VideoDataWarning, match="good.npz"), pytest.raises(NoVideoDataError):
        fresh.sample(np.random.default_rng(0), 1, 31)  # now both are too short: bad.npz counted once
    assert fresh.file_counts()["files_skipped"] == 2 and fresh.file_counts()["skipped_too_short"] == 2
    # Same draws whether the bad file is already known (fresh) or found now (other): same batch.
    other = NpzEpisodeDataset(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", VideoDataWarning)
        again = other.sample(np.random.default_rng(3), 12, 10)
    np.testing.assert_array_equal(fresh.sample(np.random.default_rng(3), 12, 10)["image"], again["image"])
    np.testing.assert_array_equal(first["image"], again["image"])


def _corrupt_behind_header(path: Path) -> Path:
    """Zero bytes inside the compressed image data: the header (checked at indexing) still reads."""
    raw = bytearray(path.read_bytes())
    mid = len(raw) // 2
    raw[mid : mid + 64] = bytes(64)
    path.write_bytes(bytes(raw))
    return path


def test_blocks_of_rows_concatenate_to_the_whole_batch_also_with_an_unreadable_item(tmp_path: Path) -> None:
    # A multi-host run: each process loads its own block of rows, with its own dataset object
    # (so only the process whose rows draw the bad item finds it); the blocks together must be
    # the one-process batch.
    for k in range(3):
        _write_episode(tmp_path / f"good{k}.npz", _episode_images(k, 30))
    _corrupt_behind_header(_write_episode(tmp_path / "bad.npz", _episode_images(9, 30)))
    batch_size, length, blocks = 8, 10, [range(0, 2), range(2, 4), range(4, 6), range(6, 8)]
    found_bad = 0
    for step in range(4):
        whole_ds = NpzEpisodeDataset(tmp_path)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", VideoDataWarning)
            whole = whole_ds.sample(np.random.default_rng([5, step]), batch_size, length)
            parts = [
                NpzEpisodeDataset(tmp_path).sample(np.random.default_rng([5, step]), batch_size, length, rows=rows)
                for rows in blocks
            ]
        found_bad += whole_ds.file_counts()["skipped_unreadable"]
        for key in ("image", "is_first"):
            np.testing.assert_array_equal(np.concatenate([p[key] for p in parts]), whole[key])
        assert 9 not in set(_trace(whole)[0])  # the bad episode never appears
        # The same dataset object asked for the blocks one by one: the same rows again.
        again = [
            whole_ds.sample(np.random.default_rng([5, step]), batch_size, length, rows=rows)
            for rows in reversed(blocks)
        ][::-1]
        np.testing.assert_array_equal(np.concatenate([p["image"] for p in again]), whole["image"])
    assert found_bad > 0  # some row did draw the unreadable episode and re-drew
    ds = NpzEpisodeDataset(tmp_path)
    with pytest.raises(ValueError, match="rows must lie in 0..7"):
        ds.sample(np.random.default_rng(0), 8, 5, rows=range(6, 9))


def test_only_the_requested_rows_are_read(episodes_dir: Path) -> None:
    ds = NpzEpisodeDataset(episodes_dir)
    loads = []
    load_frames = ds._load_frames
    ds._load_frames = lambda i, start, length: loads.append((i, start)) or load_frames(i, start, length)
    whole = ds.sample(np.random.default_rng([1, 2]), 6, 5)
    assert len(loads) == 6
    loads.clear()
    part = ds.sample(np.random.default_rng([1, 2]), 6, 5, rows=[4, 1])  # any rows, in the order given
    assert len(loads) == 2
    assert part["image"].shape == (2, 5, 64, 64, 3) and part["is_first"].shape == (2, 5)
    np.testing.assert_array_equal(part["image"], whole["image"][[4, 1]])


def test_empty_or_only_corrupt_dataset_raises_one_clear_error(tmp_path: Path) -> None:
    with pytest.raises(NoVideoDataError, match="generate_videos.py") as info:
        NpzEpisodeDataset(tmp_path)
    assert str(tmp_path) in str(info.value) and isinstance(info.value, ValueError)
    with pytest.raises(NoVideoDataError, match="missing"):
        NpzEpisodeDataset(tmp_path / "nowhere")
    (tmp_path / "x.npz").write_bytes(b"garbage")
    with pytest.warns(VideoDataWarning), pytest.raises(NoVideoDataError, match="none usable"):
        NpzEpisodeDataset(tmp_path)


def test_episode_cache_is_bounded(episodes_dir: Path) -> None:
    ds = NpzEpisodeDataset(episodes_dir, cache_bytes=1)
    for s in range(5):
        ds.sample(np.random.default_rng(s), 4, 5)
    assert len(ds._cache) == 1  # at most one episode kept when the budget is below one episode


# ------------------------------------------------------------------------------------- prefetcher
def test_prefetcher_batches_are_a_function_of_seed_and_step(episodes_dir: Path) -> None:
    ds = NpzEpisodeDataset(episodes_dir)
    with BatchPrefetcher(ds, 3, 7, seed=11, start_step=0, num_steps=8, num_threads=3, buffer=2) as it:
        full = list(it)
    assert [s for s, _ in full] == list(range(8))
    for step, batch in full:
        _check_batch(batch, 3, 7)
        want = ds.sample(np.random.default_rng([11, step]), 3, 7)
        np.testing.assert_array_equal(batch["image"], want["image"])
    with BatchPrefetcher(ds, 3, 7, seed=11, start_step=5, num_steps=3, num_threads=1) as it:
        resumed = list(it)
    assert [s for s, _ in resumed] == [5, 6, 7]
    for (s1, b1), (s2, b2) in zip(full[5:], resumed):
        assert s1 == s2
        np.testing.assert_array_equal(b1["image"], b2["image"])
    assert not np.array_equal(full[0][1]["image"], full[1][1]["image"])
    # One process's rows of each step (a multi-host run): those rows of the whole batches.
    with BatchPrefetcher(ds, 3, 7, seed=11, start_step=2, num_steps=4, num_threads=2, rows=range(1, 3)) as it:
        block = list(it)
    assert [s for s, _ in block] == [2, 3, 4, 5]
    for (_, whole), (_, part) in zip(full[2:6], block):
        _check_batch(part, 2, 7)
        np.testing.assert_array_equal(part["image"], whole["image"][1:3])


class _FailingDataset:
    """Raises on the step whose generator was seeded with [seed, fail_step]."""

    def __init__(self, fail_step: int, slow_steps: float = 0.0) -> None:
        self.fail_step = fail_step
        self.slow_steps = slow_steps  # seconds every other step takes: the failing one finishes first

    def sample(self, rng: np.random.Generator, batch_size: int, length: int, rows=None) -> dict:
        if rng.bit_generator.seed_seq.entropy[1] == self.fail_step:  # type: ignore[attr-defined]
            raise RuntimeError("boom at the failing step")
        time.sleep(self.slow_steps)
        return {
            "image": np.zeros((batch_size, length, 64, 64, 3), np.uint8),
            "is_first": np.zeros((batch_size, length), bool),
        }


def test_prefetcher_reraises_worker_exceptions_in_the_consumer() -> None:
    it = BatchPrefetcher(_FailingDataset(fail_step=2), 1, 2, seed=0, start_step=0, num_steps=10, num_threads=2)
    assert next(it)[0] == 0
    with pytest.raises(RuntimeError, match="boom"):
        for _ in range(10):
            next(it)
    assert not any(th.is_alive() for th in it._threads)


def test_prefetcher_delivers_the_steps_before_a_failure_that_finished_first() -> None:
    # Step 1 fails at once while step 0 is still being sampled on the other thread: the consumer
    # must still get step 0 (in order), and the error only when it asks for step 1.
    it = BatchPrefetcher(
        _FailingDataset(fail_step=1, slow_steps=0.3), 1, 2, seed=0, start_step=0, num_steps=10, num_threads=2
    )
    assert next(it)[0] == 0
    with pytest.raises(RuntimeError, match="boom"):
        next(it)
    assert not any(th.is_alive() for th in it._threads)


def test_prefetcher_close_stops_threads_early(episodes_dir: Path) -> None:
    ds = NpzEpisodeDataset(episodes_dir)
    before = threading.active_count()
    with BatchPrefetcher(ds, 2, 5, seed=0, start_step=0, num_steps=1000, num_threads=2, buffer=3) as it:
        step, _ = next(it)
        assert step == 0
    assert not any(th.is_alive() for th in it._threads)
    assert threading.active_count() == before
    with pytest.raises(StopIteration):
        next(it)


# ------------------------------------------------------------------------------------- SSv2 folders
def _write_video(root: Path, video_id: str, frames: int, size: tuple[int, int], green: int) -> None:
    folder = root / video_id
    folder.mkdir(parents=True)
    for t in range(frames):
        # flat colours survive JPEG: red encodes the frame index, green the video
        Image.new("RGB", size, (10 + 20 * t, green, 128)).save(folder / f"{t + 1:06d}.jpg", quality=95)


def test_frame_stride_samples_every_kth_frame_from_uniform_starts(episodes_dir: Path) -> None:
    ds = make_video_dataset("npz", str(episodes_dir), frame_stride=3)
    batch = ds.sample(np.random.default_rng(0), 200, 8)  # spans (8 - 1) * 3 + 1 = 22 of 30 frames
    _check_batch(batch, 200, 8)
    ids, frames = _trace(batch)
    np.testing.assert_array_equal(frames, frames[:, :1] + 3 * np.arange(8))
    assert set(frames[:, 0]) == set(range(30 - 22 + 1))  # every start that fits
    for b in range(5):
        np.testing.assert_array_equal(batch["image"][b], _episode_images(ids[b], 30)[frames[b, 0] :: 3][:8])


def test_frame_stride_length_check_counts_the_span(tmp_path: Path) -> None:
    _write_episode(tmp_path / "long.npz", _episode_images(1, 30))
    _write_episode(tmp_path / "short.npz", _episode_images(2, 20))
    ds = NpzEpisodeDataset(tmp_path, frame_stride=4)
    with pytest.warns(VideoDataWarning, match="short.npz"):  # 7 frames at stride 4 span 25 > 20
        ids, _ = _trace(ds.sample(np.random.default_rng(0), 16, 7))
    assert set(ids) == {1}
    # 9 frames span 33 > 30: the error names the span and the longest length that fits ((30 - 1) // 4 + 1 = 8)
    with pytest.warns(VideoDataWarning), pytest.raises(NoVideoDataError, match=r"at least 33 frames.*at most 8"):
        ds.sample(np.random.default_rng(0), 1, 9)
    for bad in (0, -1, 1.5):
        with pytest.raises(NoVideoDataError, match=r"\(--config.data.frame_stride\) must be a positive integer"):
            NpzEpisodeDataset(tmp_path, frame_stride=bad)


def test_something_something_folders(tmp_path: Path) -> None:
    root = tmp_path / "frames-64"
    _write_video(root, "101", 10, (64, 64), green=50)
    _write_video(root, "202", 8, (96, 80), green=150)  # resized to 64x64
    _write_video(root, "303", 4, (64, 64), green=250)  # too short for T=6
    listing = tmp_path / "train_video_folder.txt"
    listing.write_text("101 10 93\n202 8 94\nbad-line\n303 4 1\n")
    with pytest.warns(VideoDataWarning) as record:
        ds = SomethingSomethingDataset(root, listing, min_length=6)
    text = "\n".join(str(w.message) for w in record)
    assert "bad-line" in text and str(root / "303") in text
    batch = ds.sample(np.random.default_rng(0), 40, 6)
    _check_batch(batch, 40, 6)
    img = batch["image"].astype(int)
    green = img[:, :, 32, 32, 1]  # [B, T]
    long_video = np.abs(green[:, 0] - 50) < 10  # video 101 (green 50) vs 202 (green 150)
    assert long_video.any() and (np.abs(green[~long_video, 0] - 150) < 10).all() and (~long_video).any()
    red = img[:, :, 32, 32, 0]  # [B, T]
    frame_index = np.round((red - 10) / 20).astype(int)
    np.testing.assert_array_equal(frame_index, frame_index[:, :1] + np.arange(6))  # consecutive frames
    assert frame_index[long_video, 0].max() <= 4 and frame_index[~long_video, 0].max() <= 2
    stats = ds.file_counts()
    assert stats["files_ok"] == 2 and stats["skipped_too_short"] == 1 and stats["skipped_malformed_line"] == 1


def test_something_something_frame_stride(tmp_path: Path) -> None:
    root = tmp_path / "frames-64"
    _write_video(root, "101", 10, (64, 64), green=50)
    listing = tmp_path / "list.txt"
    listing.write_text("101 10 93\n")
    batch = SomethingSomethingDataset(root, listing, frame_stride=2).sample(np.random.default_rng(0), 20, 4)
    frame_index = np.round((batch["image"].astype(int)[:, :, 32, 32, 0] - 10) / 20).astype(int)  # [B, T]
    np.testing.assert_array_equal(frame_index, frame_index[:, :1] + 2 * np.arange(4))
    assert set(frame_index[:, 0]) == {0, 1, 2, 3}  # 4 frames at stride 2 span 7 of 10


def test_something_something_missing_folder_and_errors(tmp_path: Path) -> None:
    root = tmp_path / "frames"
    _write_video(root, "1", 6, (64, 64), green=0)
    listing = tmp_path / "list.txt"
    listing.write_text("1 6 0\n2 6 0\n")  # video 2 has no folder
    ds = make_video_dataset("something", str(root), str(listing))
    with pytest.warns(VideoDataWarning, match="FileNotFoundError"):
        for s in range(4):
            ds.sample(np.random.default_rng(s), 4, 6)
    assert ds.file_counts()["skipped_unreadable"] == 1 and ds.file_counts()["files_ok"] == 1
    with pytest.raises(NoVideoDataError, match="generate_videos.py"):
        SomethingSomethingDataset(tmp_path / "absent", listing)
    listing.write_text("2 6 0\n")
    ds = SomethingSomethingDataset(root, listing)
    with pytest.warns(VideoDataWarning), pytest.raises(NoVideoDataError, match="unreadable"):
        ds.sample(np.random.default_rng(0), 1, 6)
