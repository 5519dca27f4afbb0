"""Fine-tuning replay: episode assembly, DreamerV2 sampling distribution, capacity, files and restore.

Every test episode encodes where each step came from (reward = 1000 * episode id + t, image and action
carry the same numbers), so a sampled row can be traced back to its episode and start step.
"""

import json
import os

import numpy as np
import pytest
from scipy import stats

from prelar_jax.data.replay import (
    EPISODE_KEYS,
    SAMPLE_KEYS,
    Replay,
    ReplayError,
    ReplayFileError,
    ReplayTooSmallError,
)
from prelar_jax.errors import UserError

H, W, A = 4, 3, 2


def make_episode(ep_id: int, length: int) -> dict[str, np.ndarray]:
    """An episode whose every step is identifiable: [L, ...] arrays of EPISODE_KEYS."""
    t = np.arange(length)
    image = np.zeros((length, H, W, 3), np.uint8)
    image[:, 0, 0, 0] = ep_id
    image[:, 0, 0, 1] = t % 256
    image[:, 1:, :, 2] = (7 * ep_id + t[:, None, None]) % 256
    action = np.stack([np.full(length, ep_id), t], -1).astype(np.float32)
    action[0] = 0.0  # a_0 = 0 on the reset step
    flags = np.zeros(length, bool)
    is_first, is_last = flags.copy(), flags.copy()
    is_first[0], is_last[-1] = True, True
    return {
        "image": image,
        "action": action,
        "reward": (1000.0 * ep_id + t).astype(np.float32),
        "is_first": is_first,
        "is_last": is_last,
        "is_terminal": (t % 5 == 4) & (ep_id % 2 == 1),  # some True values, to check they are copied
        "success": t > length // 2,
    }


def steps_of(episode: dict[str, np.ndarray]) -> list[dict]:
    """The episode as env-driver step dicts, with an extra key the replay must ignore."""
    n = len(episode["image"])
    return [
        {**{k: episode[k][i] for k in EPISODE_KEYS}, "reward": float(episode["reward"][i]), "state": np.ones(39)}
        for i in range(n)
    ]


def assert_episode_equal(got: dict[str, np.ndarray], want: dict[str, np.ndarray]) -> None:
    assert set(got) == set(EPISODE_KEYS)
    for k in EPISODE_KEYS:
        assert got[k].dtype == want[k].dtype, k
        np.testing.assert_array_equal(got[k], want[k], err_msg=k)


def trace(batch: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """(episode id [B], start step [B]) of each sampled row, read from the reward encoding."""
    first = batch["reward"][:, 0].astype(np.int64)
    return first // 1000, first % 1000


def filled(lengths: list[int], **kwargs) -> tuple[Replay, dict[int, dict]]:
    replay = Replay(**{"capacity": 10**6, **kwargs})
    episodes = {i: make_episode(i, n) for i, n in enumerate(lengths)}
    for ep in episodes.values():
        replay.add_episode(ep)
    return replay, episodes


# ------------------------------------------------------------------------------ episode assembly


def test_interleaved_envs_build_episodes_in_completion_order(tmp_path):
    replay = Replay(capacity=1000, directory=tmp_path)
    ep_a, ep_b, ep_c = make_episode(1, 7), make_episode(2, 5), make_episode(3, 9)
    a, b, c = steps_of(ep_a), steps_of(ep_b), steps_of(ep_c)
    # env 0 runs episode a then starts c; env 1 runs b, which finishes first.
    names = []
    for i in range(7):
        names.append(replay.add_step(0, a[i]))
        if i < 5:
            names.append(replay.add_step(1, b[i]))
    for step in c[:4]:
        names.append(replay.add_step(0, step))
    finished = [n for n in names if n is not None]
    assert finished == ["000000-4.npz", "000001-6.npz"]  # index-<frames - 1>, in completion order
    assert replay.episode_names() == finished
    assert (replay.num_episodes, replay.num_steps, replay.total_episodes) == (2, 12, 2)
    assert_episode_equal(replay.get_episode(finished[0]), ep_b)
    assert_episode_equal(replay.get_episode(finished[1]), ep_a)
    assert replay.ongoing_length(0) == 4 and replay.ongoing_length(1) == 0

    # Files hold the same arrays, readable without pickle, and no temporary file is left behind.
    assert sorted(os.listdir(tmp_path)) == finished
    with np.load(tmp_path / finished[1], allow_pickle=False) as data:
        assert_episode_equal({k: data[k] for k in data.files}, ep_a)

    # The unfinished episode c is never sampled.
    ids, _ = trace(replay.sample(np.random.default_rng(0), 200, 3))
    assert set(ids.tolist()) == {1, 2}

    # discard drops it; the env then needs a reset step before anything else.
    assert replay.discard(0) == 4 and replay.ongoing_length(0) == 0
    with pytest.raises(ReplayError, match="no episode in progress"):
        replay.add_step(0, c[4])
    # A reset step throws away an unfinished episode: only the second run of c is stored.
    for step in c[:3] + c:
        replay.add_step(0, step)
    assert replay.episode_names()[-1] == "000002-8.npz"
    assert_episode_equal(replay.get_episode("000002-8.npz"), ep_c)


def test_add_batch_is_add_step_per_env():
    ep0, ep1 = make_episode(1, 4), make_episode(2, 4)
    replay = Replay(capacity=100)
    finished = []
    for t in range(4):
        obs = {k: np.stack([ep0[k][t], ep1[k][t]]) for k in EPISODE_KEYS if k != "action"}
        finished += replay.add_batch(obs, np.stack([ep0["action"][t], ep1["action"][t]]))
    assert finished == ["000000-3.npz", "000001-3.npz"]
    assert_episode_equal(replay.get_episode(finished[0]), ep0)
    assert_episode_equal(replay.get_episode(finished[1]), ep1)


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda e: e.update(reward=e["reward"][:-1]), "same length"),
        (lambda e: e.update(image=e["image"].astype(np.float32)), "uint8"),
        (lambda e: e["is_first"].__setitem__(0, False), "is_first must be True on step 0"),
        (lambda e: e["is_last"].__setitem__(-1, False), "is_last"),
        (lambda e: e.pop("success"), "missing key"),
        (lambda e: e.update(action=e["action"][:, 0]), r"action must be \[L, A\]"),
    ],
)
def test_add_episode_rejects_malformed_episodes(change, message):
    episode = make_episode(1, 6)
    change(episode)
    with pytest.raises(ReplayError, match=message):
        Replay(capacity=100).add_episode(episode)


def test_add_episode_rejects_too_short_and_mismatched_shapes():
    replay = Replay(capacity=100)
    short = {k: v[:1] for k, v in make_episode(1, 6).items()}
    short["is_last"] = np.ones(1, bool)
    with pytest.raises(ReplayError, match="at least 2 steps"):
        replay.add_episode(short)
    replay.add_episode(make_episode(1, 6))
    other = make_episode(2, 6)
    other["image"] = np.zeros((6, H + 1, W, 3), np.uint8)
    with pytest.raises(ReplayError, match="image shape per step"):
        replay.add_episode(other)


def test_add_episode_copies_the_callers_arrays():
    episode = make_episode(1, 6)
    replay = Replay(capacity=100)
    name = replay.add_episode(episode)
    episode["image"][:] = 99
    assert replay.get_episode(name)["image"][0, 0, 0, 0] == 1
    assert not replay.get_episode(name)["image"].flags.writeable


# ------------------------------------------------------------------------------------- sampling


def test_sampled_sequences_are_contiguous_slices_of_one_episode():
    replay, episodes = filled([9, 6, 12, 3])
    B, T = 64, 5
    batch = replay.sample(np.random.default_rng(1), B, T)
    assert set(batch) == set(SAMPLE_KEYS)
    want = {"image": (np.uint8, (B, T, H, W, 3)), "action": (np.float32, (B, T, A)), "reward": (np.float32, (B, T))}
    want.update({k: (np.bool_, (B, T)) for k in ("is_first", "is_last", "is_terminal")})
    for k, (dtype, shape) in want.items():
        assert batch[k].dtype == dtype and batch[k].shape == shape, k
    assert batch["is_first"][:, 0].all() and not batch["is_first"][:, 1:].any()
    ids, starts = trace(batch)
    assert 3 not in ids  # 3 steps < T: never eligible
    for b in range(B):
        ep = episodes[int(ids[b])]
        s = int(starts[b])
        assert s + T <= len(ep["image"])  # never crosses the episode's end
        for k in SAMPLE_KEYS:
            want_k = ep[k][s : s + T].copy()
            if k == "is_first":
                want_k[0] = True  # forced on every sequence
            np.testing.assert_array_equal(batch[k][b], want_k, err_msg=f"row {b} key {k}")
    # Same generator state, same batch.
    again = replay.sample(np.random.default_rng(1), B, T)
    for k in SAMPLE_KEYS:
        np.testing.assert_array_equal(again[k], batch[k])


def exact_start_probs(total: int, T: int, prioritize_ends: bool) -> np.ndarray:
    """P(start = s), s = 0..total-T, as DreamerV2 defines it (closed form, independent of the code)."""
    n = total - T + 1
    if not prioritize_ends:
        return np.full(n, 1.0 / n)
    # start = min(u, total - T) with u uniform on {0, ..., total}: every s < total - T has one u,
    # the last window collects u = total - T, ..., total (T + 1 values).
    p = np.full(n, 1.0 / (total + 1))
    p[-1] = (T + 1) / (total + 1)
    return p


def assert_start_distribution(ids, starts, lengths, T, prioritize_ends) -> list[int]:
    """Chi-square of the sampled (episode, start) cells against the closed form (uniform episode
    choice among episodes of at least T steps, then ``exact_start_probs``), and against the other
    start rule, which must be rejected on the same samples (the test has power). Returns the
    eligible episodes."""
    n = len(ids)
    eligible = [i for i, L in enumerate(lengths) if L >= T]
    cells, expected, expected_other = [], [], []
    for i in eligible:
        p = exact_start_probs(lengths[i], T, prioritize_ends) / len(eligible)
        q = exact_start_probs(lengths[i], T, not prioritize_ends) / len(eligible)
        for s in range(lengths[i] - T + 1):
            cells.append(np.sum((ids == i) & (starts == s)))
            expected.append(p[s] * n)
            expected_other.append(q[s] * n)
    cells = np.array(cells)
    assert cells.sum() == n  # every sample falls in a valid (episode, start) cell
    assert stats.chisquare(cells, expected).pvalue > 1e-3
    assert stats.chisquare(cells, expected_other).pvalue < 1e-6
    return eligible


@pytest.mark.parametrize("prioritize_ends", [True, False])
def test_episode_and_start_distribution_match_dreamerv2(prioritize_ends):
    lengths, T, n = [10, 14, 6, 4], 6, 24_000
    replay, _ = filled(lengths, prioritize_ends=prioritize_ends)
    rng = np.random.default_rng(1234)
    ids, starts = [], []
    for _ in range(8):
        i, s = trace(replay.sample(rng, n // 8, T))
        ids.append(i)
        starts.append(s)
    ids, starts = np.concatenate(ids), np.concatenate(starts)

    eligible = assert_start_distribution(ids, starts, lengths, T, prioritize_ends)  # episode 3 is too short
    # Episode choice alone is uniform over the eligible episodes.
    per_episode = np.array([np.sum(ids == i) for i in eligible])
    assert stats.chisquare(per_episode).pvalue > 1e-3


def test_too_small_error_says_what_exists_and_what_is_needed():
    replay, _ = filled([5, 5, 8])
    replay.add_step(0, steps_of(make_episode(9, 30))[0])  # an unfinished episode
    with pytest.raises(ReplayTooSmallError) as info:
        replay.sample(np.random.default_rng(0), 4, 9)
    msg = str(info.value)
    assert isinstance(info.value, UserError)
    assert "length 9" in msg and "3 complete episode(s)" in msg and "2 x 5" in msg and "1 x 8" in msg
    assert "unfinished" in msg
    with pytest.raises(ReplayTooSmallError, match="holds 0 complete"):
        Replay(capacity=10).sample(np.random.default_rng(0), 1, 2)
    assert replay.sample(np.random.default_rng(0), 4, 8)["image"].shape[:2] == (4, 8)


# ------------------------------------------------------------------------------------- capacity


def test_capacity_evicts_oldest_episodes():
    replay = Replay(capacity=25)
    held = []
    for i, L in enumerate([10, 8, 10, 6, 12]):
        held.append(replay.add_episode(make_episode(i, L)))
        assert replay.num_steps <= 25
        assert replay.num_steps == sum(int(n.split("-")[1].split(".")[0]) + 1 for n in replay.episode_names())
    # 10+8 -> +10 = 28 evicts ep0 -> 18; +6 = 24; +12 = 36 evicts ep1 (28), ep2 (18).
    assert replay.episode_names() == [held[3], held[4]]
    assert (replay.num_episodes, replay.num_steps, replay.total_episodes) == (2, 18, 5)
    ids, _ = trace(replay.sample(np.random.default_rng(0), 100, 3))
    assert set(ids.tolist()) == {3, 4}
    with pytest.raises(ReplayError, match="capacity"):
        replay.add_episode(make_episode(5, 26))


# --------------------------------------------------------------------------------- persistence


def test_restore_reproduces_samples_and_ignores_later_episodes(tmp_path):
    replay = Replay(capacity=1000, directory=tmp_path)
    for i, L in enumerate([9, 12, 7]):
        replay.add_episode(make_episode(i, L))
    state = json.loads(json.dumps(replay.state_dict()))  # must survive checkpoint metadata
    assert state["episodes"] == replay.episode_names() and state["total_episodes"] == 3
    replay.add_episode(make_episode(3, 11))  # written after the checkpoint
    assert len(os.listdir(tmp_path)) == 4

    restored = Replay.restore(tmp_path, state, capacity=1000)
    assert restored.episode_names() == state["episodes"]
    assert (restored.num_episodes, restored.num_steps, restored.total_episodes) == (3, 28, 3)
    for name in state["episodes"]:
        assert_episode_equal(restored.get_episode(name), replay.get_episode(name))
    before = Replay.restore(tmp_path, state, capacity=1000)
    reference, _ = filled([9, 12, 7])
    for r in (restored, reference):  # the same held episodes sample the same batch
        got = r.sample(np.random.default_rng(5), 16, 6)
        want = before.sample(np.random.default_rng(5), 16, 6)
        for k in SAMPLE_KEYS:
            np.testing.assert_array_equal(got[k], want[k])
    # Numbering continues from the checkpoint; the crashed run's file of the same name is replaced.
    assert restored.add_episode(make_episode(7, 5)) == "000003-4.npz"

    # A smaller capacity keeps the newest restored episodes.
    small = Replay.restore(tmp_path, state, capacity=20)
    assert small.episode_names() == state["episodes"][1:]


def test_restore_refuses_missing_corrupt_and_pickled_files(tmp_path):
    replay = Replay(capacity=1000, directory=tmp_path)
    names = [replay.add_episode(make_episode(i, 6)) for i in range(3)]
    state = replay.state_dict()

    pickled = {**make_episode(1, 6), "success": np.array([{"a": 1}] * 6, dtype=object)}
    with open(tmp_path / names[1], "wb") as f:  # an episode key stored as a pickled object array
        np.savez(f, **pickled)
    with pytest.raises(ReplayFileError, match=f"{names[1]}.*pickle"):
        Replay.restore(tmp_path, state, capacity=1000)

    (tmp_path / names[1]).write_bytes(b"not a zip file")
    with pytest.raises(ReplayFileError, match=f"{names[1]}.*unreadable"):
        Replay.restore(tmp_path, state, capacity=1000)

    os.remove(tmp_path / names[1])
    with pytest.raises(ReplayFileError, match=f"{names[1]} is missing"):
        Replay.restore(tmp_path, state, capacity=1000)

    with pytest.raises(ReplayError, match="'episodes'"):
        Replay.restore(tmp_path, {"total_episodes": 3}, capacity=1000)
    with pytest.raises(ReplayError, match="only 1 episodes"):
        Replay.restore(tmp_path, {"episodes": [names[0], names[2]], "total_episodes": 1}, capacity=1000)


def test_files_of_the_last_checkpoint_survive_eviction_until_pruned(tmp_path):
    replay = Replay(capacity=20, directory=tmp_path)
    for i in range(2):
        replay.add_episode(make_episode(i, 8))
    state1 = replay.state_dict()  # checkpoint 1 holds episodes 0, 1
    for i in range(2, 5):
        replay.add_episode(make_episode(i, 8))  # evicts 0, 1, 2 from memory
    assert replay.episode_names() == ["000003-7.npz", "000004-7.npz"]
    assert len(os.listdir(tmp_path)) == 5  # eviction deletes nothing

    # "Crash" before the next checkpoint: checkpoint 1 is restorable, everything after it is ignored.
    crashed = Replay.restore(tmp_path, state1, capacity=20)
    assert crashed.episode_names() == state1["episodes"]

    # Checkpoint 2 is on disk: prune keeps its names and what memory holds, deletes evicted episode 2.
    state2 = replay.state_dict()
    replay.add_episode(make_episode(5, 4))  # held, not yet in any checkpoint: must be kept
    (tmp_path / ".000006-3.npz.tmp").write_bytes(b"half-written")
    (tmp_path / "notes.txt").write_text("not an episode")
    deleted = replay.prune_files(state1["episodes"] + state2["episodes"])
    assert deleted == [".000006-3.npz.tmp", "000002-7.npz"]
    deleted = replay.prune_files(state2["episodes"])
    assert deleted == ["000000-7.npz", "000001-7.npz"]
    assert sorted(os.listdir(tmp_path)) == ["000003-7.npz", "000004-7.npz", "000005-3.npz", "notes.txt"]
    Replay.restore(tmp_path, replay.state_dict(), capacity=20)  # the current state is complete on disk

    # After resuming from checkpoint 1, the crashed run's later files are orphans and get pruned,
    # except those the resumed run overwrote with its own episodes.
    resumed_dir = tmp_path / "resumed"
    first = Replay(capacity=20, directory=resumed_dir)
    for i in range(2):
        first.add_episode(make_episode(i, 8))
    ckpt = first.state_dict()
    for i in range(2, 4):
        first.add_episode(make_episode(i, 6))  # lost in the crash
    resumed = Replay.restore(resumed_dir, ckpt, capacity=20)
    assert resumed.add_episode(make_episode(9, 6)) == "000002-5.npz"  # replaces the orphan 000002-5
    assert resumed.prune_files(ckpt["episodes"]) == ["000003-5.npz"]
    reloaded = Replay.restore(resumed_dir, resumed.state_dict(), capacity=20)
    assert_episode_equal(reloaded.get_episode("000002-5.npz"), make_episode(9, 6))
