"""Numerical faults: a non-finite loss or gradient skips the update (never writes NaN into the
state), is logged with its step, and too many in a row stop the run naming the last checkpoint."""

import json

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from prelar_jax.learners import finetune as agent_lib
from prelar_jax.runtime import checkpoint, parallel, pretrain_loop, run_utils, steps
from tests.test_finetune import finetune_config, random_batch
from tests.test_pretrain_loop import tiny_config, write_moving_squares


@flax.struct.dataclass
class ToyState:
    step: jax.Array
    params: dict
    batch_stats: dict
    opt_state: optax.OptState


def _toy_loss(params, stats, batch, key, example_index):
    pred = batch["image"].astype(jnp.float32).mean(axis=(1, 2, 3, 4)) * params["w"]
    loss = jnp.mean(jnp.square(pred - batch["target"]))
    return loss, ({}, {"loss": loss})


def test_nonfinite_update_is_skipped_on_every_device():
    """NaN in one device's shard: all four devices skip the update, so the replicated state stays
    identical everywhere, equal to the state before; the next finite update applies."""
    mesh = parallel.make_mesh(jax.devices()[:4])
    optimizer = optax.adam(0.1)
    params = {"w": jnp.ones(())}
    state = parallel.put_replicated(ToyState(jnp.zeros((), jnp.int32), params, {}, optimizer.init(params)), mesh)
    step = steps.make_pretrain_step(_toy_loss, optimizer, mesh, seed=0)
    image = np.ones((8, 2, 2, 2, 3), np.uint8)
    bad = {"image": image, "target": np.array([0, 0, 0, 0, 0, np.nan, 0, 0], np.float32)}
    good = {"image": image, "target": np.zeros(8, np.float32)}
    state, metrics = step(state, parallel.put_batch(bad, mesh))
    assert float(metrics["nonfinite"]) == 1.0 and int(state.step) == 1
    for shard in state.params["w"].addressable_shards:
        assert float(shard.data) == 1.0
    assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(jax.device_get(state.opt_state)))
    state, metrics = step(state, parallel.put_batch(good, mesh))
    assert float(metrics["nonfinite"]) == 0.0 and float(state.params["w"]) < 1.0


@pytest.mark.slow
def test_finetune_update_skips_a_nan_reward_batch():
    config = finetune_config()
    mesh = parallel.make_mesh(jax.devices()[:1])
    agent = agent_lib.FinetuneAgent(config, bn_axis_name=parallel.AXIS)
    state = parallel.put_replicated(agent.init_state(jax.random.key(1)), mesh)
    before = jax.tree.map(np.asarray, state)
    step = steps.make_finetune_step(agent, mesh, seed=0)
    batch = random_batch(config)
    batch["reward"][1, 3] = np.nan
    state, metrics = step(state, parallel.put_batch(batch, mesh))
    assert float(metrics["nonfinite"]) == 1.0 and int(state.step) == 1
    after = jax.tree.map(np.asarray, state)
    for name in ("params", "slow_critic", "batch_stats", "model_opt_state", "actor_critic_opt_state", "intrinsic"):
        jax.tree.map(np.testing.assert_array_equal, getattr(after, name), getattr(before, name))


class _Logger:
    def __init__(self):
        self.lines = []

    def log(self, step, metrics):
        self.lines.append((step, dict(metrics)))


def test_monitor_counts_streaks_and_names_the_last_checkpoint():
    logger = _Logger()
    monitor = run_utils.NonFiniteMonitor(3, logger, "/runs/x/checkpoints", lambda: 40)
    for step, flag in enumerate([1.0, 1.0, 0.0, 1.0, 1.0], start=1):
        monitor.observe(step, jnp.float32(flag))
    monitor.check()
    assert [s for s, _ in logger.lines] == [1, 2, 4, 5]
    assert [m["nonfinite/skipped_in_a_row"] for _, m in logger.lines] == [1, 2, 1, 2]
    with pytest.raises(run_utils.NonFiniteError, match=r"3 updates in a row .*/runs/x/checkpoints/40"):
        monitor.observe(6, jnp.float32(1.0))
        monitor.check()


@pytest.mark.slow
def test_pretraining_with_nan_loss_stops_and_never_writes_nan(tmp_path):
    squares = write_moving_squares(tmp_path / "videos", episodes=3, length=12)
    config = tiny_config(
        squares, **{"loss.kl_scale": float("nan"), "nonfinite_limit": 4, "steps": 20, "log.checkpoint_every": 2}
    )
    with pytest.raises(run_utils.NonFiniteError, match="4 updates in a row"):
        pretrain_loop.run(config, str(tmp_path / "run"), devices=jax.devices()[:1])
    with open(tmp_path / "run" / "metrics.jsonl") as handle:
        records = [json.loads(line) for line in handle]
    skipped = [r["step"] for r in records if "nonfinite/skipped_in_a_row" in r]
    assert skipped == [1, 2, 3, 4]
    # Checkpoints written during the streak stay (the message names the newest one).
    ckpt = checkpoint.Checkpointer(tmp_path / "run" / "checkpoints")
    assert ckpt.latest_step() in (2, 4)
    ckpt.close()
