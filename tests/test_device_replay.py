"""Device-resident replay: exact windows, the host replay's (closed-form) distribution, ring
overwrite against the host replay's eviction, sharding over 4 devices, config checks, and a tiny
fine-tuning run with ``replay.on_device=True``.

Episodes come from tests/test_replay.py's `make_episode` (reward = 1000 * episode id + t), so a
sampled row traces back to its episode and start step.
"""

import json

import jax
import numpy as np
import pytest

from prelar_jax.runtime import checkpoint, config as config_lib, finetune_loop, parallel
from prelar_jax.runtime.device_replay import DeviceReplay
from prelar_jax.data.replay import SAMPLE_KEYS, Replay, ReplayTooSmallError
from tests.test_replay import A, H, W, assert_start_distribution, make_episode, trace


def device_filled(lengths, devices=1, capacity=10**4, prioritize_ends=True, max_len=None):
    mesh = parallel.make_mesh(jax.devices()[:devices])
    replay = DeviceReplay(capacity, max_len or max(lengths), (H, W, 3), A, mesh, prioritize_ends)
    episodes = {i: make_episode(i, n) for i, n in enumerate(lengths)}
    for ep in episodes.values():
        replay.add_episode(ep)
    return replay, episodes, mesh


def host(batch):
    return {k: np.asarray(v) for k, v in batch.items()}


def assert_exact_windows(batch, episodes, T):
    ids, starts = trace(batch)
    for b in range(len(ids)):
        ep, s = episodes[int(ids[b])], int(starts[b])
        assert s + T <= len(ep["image"])  # never crosses the episode's end
        for k in SAMPLE_KEYS:
            want = ep[k][s : s + T].copy()
            if k == "is_first":
                want[0] = True  # forced, as the host replay does
            np.testing.assert_array_equal(batch[k][b], want, err_msg=f"row {b} key {k}")
    return ids, starts


def test_windows_are_exact_slices_and_short_episodes_are_never_sampled():
    replay, episodes, _ = device_filled([9, 6, 12, 3])
    B, T = 64, 5
    batch = host(replay.sample(jax.random.key(1), B, T))
    want = {"image": (np.uint8, (B, T, H, W, 3)), "action": (np.float32, (B, T, A)), "reward": (np.float32, (B, T))}
    want.update({k: (np.bool_, (B, T)) for k in ("is_first", "is_last", "is_terminal")})
    assert set(batch) == set(SAMPLE_KEYS)
    for k, (dtype, shape) in want.items():
        assert batch[k].dtype == dtype and batch[k].shape == shape, k
    assert batch["is_first"][:, 0].all() and not batch["is_first"][:, 1:].any()
    ids, _ = assert_exact_windows(batch, episodes, T)
    assert 3 not in ids  # 3 steps < T: stored but never eligible, as on the host
    with pytest.raises(ReplayTooSmallError, match="none has at least 13 steps"):
        replay.sample(jax.random.key(0), 4, 13)


@pytest.mark.parametrize("prioritize_ends", [True, False])
def test_start_distribution_matches_the_host_replays_closed_form(prioritize_ends):
    lengths, T, n = [10, 14, 6, 4], 6, 24_000
    replay, _, _ = device_filled(lengths, devices=4, prioritize_ends=prioritize_ends)
    batches = [host(replay.sample(jax.random.key(i), n // 8, T)) for i in range(8)]
    ids = np.concatenate([trace(b)[0] for b in batches])
    starts = np.concatenate([trace(b)[1] for b in batches])
    assert len(ids) == n
    assert_start_distribution(ids, starts, lengths, T, prioritize_ends)
    # The 4 devices draw different rows (keys folded with the device index), not 4 copies.
    quarter = n // 8 // 4
    assert not np.array_equal(batches[0]["reward"][:quarter], batches[0]["reward"][quarter : 2 * quarter])


def test_ring_overwrite_keeps_the_newest_episodes_like_the_host_replay():
    """Capacity 20 steps: the ring wraps (episodes straddle its end) and holds exactly the episodes
    the host replay with the same capacity holds."""
    lengths, capacity, T = [7, 6, 8, 5, 9, 4, 7], 20, 4
    replay, episodes, _ = device_filled(lengths, capacity=capacity)
    host_replay = Replay(capacity)
    for ep in episodes.values():
        host_replay.add_episode(ep)
    held = {int(name.split("-")[0]) for name in host_replay.episode_names()}
    assert held == {4, 5, 6} and replay.lengths() == [9, 4, 7] and replay.num_steps == 20
    batch = host(replay.sample(jax.random.key(3), 256, T))
    ids, _ = assert_exact_windows(batch, episodes, T)
    assert set(ids.tolist()) == held  # evicted episodes are gone, every held one is sampled
    # Episode 6 straddles the ring's end (rows 19, 0..5): its windows still come out whole.
    replay.add_episode(make_episode(7, 9))  # evicts 4 (9 steps) only: 4 + 7 + 9 = 20
    assert replay.lengths() == [4, 7, 9]
    ids, _ = assert_exact_windows(
        host(replay.sample(jax.random.key(4), 256, T)), {**episodes, 7: make_episode(7, 9)}, T
    )
    assert set(ids.tolist()) == {5, 6, 7}


def test_batch_is_sharded_over_four_devices_like_put_batch():
    replay, _, mesh = device_filled([9, 12], devices=4)
    batch = replay.sample(jax.random.key(0), 8, 5)
    reference = parallel.put_batch(host(batch), mesh)
    for k, v in batch.items():
        assert v.sharding.is_equivalent_to(reference[k].sharding, v.ndim), k
        assert v.sharding.spec == reference[k].sharding.spec
        assert len(v.addressable_shards) == 4
        assert all(s.data.shape[0] == 2 for s in v.addressable_shards)
    with pytest.raises(parallel.DeviceCountError):
        replay.sample(jax.random.key(0), 6, 5)


def tiny(**overrides):
    return config_lib.load_config("configs/prelar_finetune.py:tiny", {"log.wandb_mode": "disabled", **overrides})


@pytest.mark.parametrize("key, value", [("on_device", "yes"), ("device_capacity", -1), ("device_capacity", 50)])
def test_bad_device_replay_config_is_one_config_error(key, value):
    config = tiny(**{"replay.on_device": True})
    with config.ignore_type():
        config.replay[key] = value
    with pytest.raises(config_lib.ConfigError, match=rf"replay\.{key}"):
        config_lib.validate_finetune_config(config)
    config_lib.validate_finetune_config(tiny(**{"replay.on_device": True, "replay.device_capacity": 51}))


@pytest.mark.slow
def test_tiny_finetune_with_the_replay_on_device(tmp_path, capsys):
    """A 2-device run samples from a 200-step device ring (it overwrites: 51-step episodes); the
    ring a resumed run rebuilds from the checkpoint's host episodes holds the newest of them."""
    config = tiny(**{"steps": 250, "eval_eps": 1, "replay.on_device": True, "replay.device_capacity": 200})
    workdir = tmp_path / "run"
    summary = finetune_loop.run(config, str(workdir), devices=jax.devices()[:2])
    assert summary["finished"] and summary["updates"] == config.pretrain + 50 // config.train_every
    records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "eval/success_rate" in r] == [200, 250]
    losses = [r["model_loss"] for r in records if "model_loss" in r]
    assert losses and np.all(np.isfinite(losses))
    assert "replay on device: 200 steps" in capsys.readouterr().out

    # What run() does on resume: restore the host replay the checkpoint names, rebuild the ring.
    saved = checkpoint.read_metadata(workdir / "checkpoints")["replay"]
    restored = Replay.restore(workdir / "replay", saved, config.replay.capacity)
    assert restored.num_episodes == 5  # 250 steps of 50-step episodes
    mesh = parallel.make_mesh(jax.devices()[:2])
    ring = finetune_loop._device_replay(config, mesh, restored)
    assert ring.lengths() == [51, 51, 51]
    newest = [restored.get_episode(n) for n in restored.episode_names()[-3:]]
    batch = host(ring.sample(jax.random.key(0), 8, config.sequence_length))
    for b in range(8):  # each row is a window of one of the 3 newest episodes
        assert any(
            np.array_equal(batch["image"][b], ep["image"][s : s + config.sequence_length])
            and np.array_equal(batch["action"][b], ep["action"][s : s + config.sequence_length])
            for ep in newest
            for s in range(51 - config.sequence_length + 1)
        ), b
