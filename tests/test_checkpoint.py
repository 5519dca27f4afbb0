"""Checkpointer: round trips of a replicated flax/optax train state, retention, crash safety, errors."""

import logging
import os
import subprocess
import sys

import chex
import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from prelar_jax.runtime.checkpoint import CheckpointMismatchError, Checkpointer, read_metadata


@flax.struct.dataclass
class TrainState:
    step: jax.Array  # [] int32
    params: dict
    batch_stats: dict
    opt_state: optax.OptState


def make_mesh(num_devices: int) -> Mesh:
    return Mesh(np.array(jax.devices()[:num_devices]), ("data",))


def make_state(mesh: Mesh, seed: int = 0, hidden: int = 4, extra_layer: bool = False) -> TrainState:
    """A small state shaped like the trainers' one, replicated over `mesh`, with non-trivial values."""
    rng = np.random.default_rng(seed)
    params = {
        "encoder": {
            "kernel": jnp.asarray(rng.normal(size=(3, hidden)), jnp.float32),
            "bias": jnp.asarray(rng.normal(size=(hidden,)), jnp.float32),
        },
        "head": {"kernel": jnp.asarray(rng.normal(size=(hidden, 2)), jnp.float32)},
    }
    if extra_layer:
        params["extra"] = {"kernel": jnp.ones((hidden, hidden), jnp.float32)}
    tx = optax.adam(1e-3)
    opt_state = tx.init(params)
    # One real update so mu/nu/count are not their zero initial values.
    grads = jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape), p.dtype), params)
    _, opt_state = tx.update(grads, opt_state, params)
    state = TrainState(
        step=jnp.asarray(seed + 7, jnp.int32),
        params=params,
        batch_stats={"norm": {"mean": jnp.asarray(rng.normal(size=(hidden,)), jnp.float32)}},
        opt_state=opt_state,
    )
    return jax.device_put(state, NamedSharding(mesh, P()))


@pytest.mark.parametrize("num_devices", [1, 4])
def test_round_trip_restores_identical_replicated_state(tmp_path, num_devices):
    mesh = make_mesh(num_devices)
    saved = make_state(mesh, seed=1)
    with Checkpointer(tmp_path / "ckpt") as checkpointer:
        assert checkpointer.latest_step() is None
        assert checkpointer.save(10, saved, {"env_steps": 1234, "loss": np.float32(0.5)})
        checkpointer.wait_until_finished()
        assert checkpointer.latest_step() == 10

        target = make_state(mesh, seed=2)  # Same structure, different values.
        restored, metadata = checkpointer.restore(target)

    assert isinstance(restored, TrainState)
    chex.assert_trees_all_equal(restored, saved)
    chex.assert_trees_all_equal_dtypes(restored, saved)
    assert metadata == {"env_steps": 1234, "loss": 0.5}
    replicated = NamedSharding(mesh, P())
    for leaf in jax.tree.leaves(restored):
        assert leaf.sharding == replicated
        assert leaf.sharding.is_fully_replicated


def test_resume_on_four_device_mesh_from_abstract_target_and_on_another_mesh(tmp_path):
    mesh4 = make_mesh(4)
    saved = make_state(mesh4, seed=3)
    with Checkpointer(tmp_path / "ckpt") as checkpointer:
        checkpointer.save(5, saved, {"note": "four devices"})

    # A new process would build the target abstractly; the shardings come from the target.
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), saved)
    resumed = Checkpointer(tmp_path / "ckpt")
    restored, metadata = resumed.restore(abstract)
    chex.assert_trees_all_equal(restored, saved)
    assert metadata == {"note": "four devices"}
    for leaf in jax.tree.leaves(restored):
        assert leaf.sharding == NamedSharding(mesh4, P())
        assert len(leaf.sharding.device_set) == 4

    # The same checkpoint resumed on one device lands on that device.
    mesh1 = make_mesh(1)
    on_one, _ = resumed.restore(make_state(mesh1, seed=9))
    chex.assert_trees_all_equal(on_one, saved)
    assert all(leaf.sharding == NamedSharding(mesh1, P()) for leaf in jax.tree.leaves(on_one))
    resumed.close()


def test_async_save_survives_the_caller_deleting_its_arrays(tmp_path):
    """Trainers donate the state to the next step right after save() returns."""
    mesh = make_mesh(4)
    state = make_state(mesh, seed=4)
    expected = jax.tree.map(np.asarray, state)
    checkpointer = Checkpointer(tmp_path / "ckpt", async_save=True)
    checkpointer.save(1, state, {})
    for leaf in jax.tree.leaves(state):
        leaf.delete()  # What buffer donation does.
    checkpointer.close()
    restored, _ = Checkpointer(tmp_path / "ckpt").restore(make_state(mesh, seed=5))
    chex.assert_trees_all_equal(jax.tree.map(np.asarray, restored), expected)


def test_keeps_only_the_newest_checkpoints(tmp_path):
    mesh = make_mesh(1)
    with Checkpointer(tmp_path / "ckpt", max_to_keep=2) as checkpointer:
        for step in (1, 2, 3, 4):
            checkpointer.save(step, make_state(mesh, seed=step), {"step": step})
            checkpointer.wait_until_finished()
        assert checkpointer.all_steps() == [3, 4]
        # A step that is not newer than the latest is skipped, not overwritten.
        assert not checkpointer.save(4, make_state(mesh, seed=99), {"step": -1})
    assert sorted(name for name in os.listdir(tmp_path / "ckpt") if name.isdigit()) == ["3", "4"]
    assert read_metadata(tmp_path / "ckpt") == {"step": 4}
    assert read_metadata(tmp_path / "ckpt", step=3) == {"step": 3}


def test_half_written_temporary_directory_is_never_latest(tmp_path):
    mesh = make_mesh(1)
    saved = make_state(mesh, seed=6)
    with Checkpointer(tmp_path / "ckpt") as checkpointer:
        checkpointer.save(3, saved, {"good": True})
    # What a crash in the middle of saving step 8 leaves behind.
    partial = tmp_path / "ckpt" / "8.orbax-checkpoint-tmp-1700000000000000"
    (partial / "state").mkdir(parents=True)
    (partial / "state" / "garbage").write_bytes(b"\x00" * 16)

    assert read_metadata(tmp_path / "ckpt") == {"good": True}
    with Checkpointer(tmp_path / "ckpt") as checkpointer:
        assert checkpointer.latest_step() == 3
        assert checkpointer.all_steps() == [3]
        restored, metadata = checkpointer.restore(make_state(mesh, seed=7))
    chex.assert_trees_all_equal(restored, saved)
    assert metadata == {"good": True}


def test_unfinished_saves_are_removed_before_the_constructor_returns(tmp_path):
    """Orbax's own clean-up of a previous run's unfinished saves ran in a background thread that
    ``close`` does not wait for: a process that opened the directory and exited soon after (an
    error, a run with nothing to do) raced it and printed orbax's traceback ("cannot schedule new
    futures after shutdown"). Many leftovers make that race near certain."""
    directory = tmp_path / "ckpt"
    with Checkpointer(directory) as checkpointer:
        checkpointer.save(3, {"w": jnp.ones((4,))}, {"step": 3})
    for step in range(4, 64):
        (directory / f"{step}.orbax-checkpoint-tmp-1" / "state").mkdir(parents=True)
    script = (
        "import sys; sys.path.insert(0, sys.argv[2]); "
        "from prelar_jax.runtime.checkpoint import Checkpointer; "
        "import os; c = Checkpointer(sys.argv[1]); print(sorted(os.listdir(sys.argv[1]))); c.close()"
    )
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run(
        [sys.executable, "-c", script, str(directory), root],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "JAX_PLATFORMS": "cpu"},
    )
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert proc.stdout.strip() == "['3']", proc.stdout  # gone before the constructor returned


def _bytes_read_from_files() -> int:
    """Bytes tensorstore (orbax's array reader) has read from local files in this process."""
    import tensorstore as ts

    metrics = ts.experimental_collect_matching_metrics("/tensorstore/kvstore/file/bytes_read")
    return int(sum(value.get("value", 0) for metric in metrics for value in metric["values"]))


def test_restore_only_some_fields_neither_reads_nor_allocates_the_others(tmp_path):
    """``restore(only=...)`` (fine-tuning takes the parameters, not the Adam moments): the fields
    it names equal a full restore's, the others come back empty, and their bytes are not read."""
    mesh = make_mesh(1)
    saved = make_state(mesh, seed=2, hidden=4096)  # params 98 KiB; Adam's mu and nu twice that
    with Checkpointer(tmp_path / "ckpt") as checkpointer:
        checkpointer.save(3, saved, {"step": 3})
    target = make_state(mesh, seed=5, hidden=4096)
    only = ("step", "params", "batch_stats")
    with Checkpointer(tmp_path / "ckpt") as checkpointer:
        # The partial restore first: a cache of what it read could only make the full one cheaper.
        start = _bytes_read_from_files()
        part, part_metadata = checkpointer.restore(target, only=only)
        middle = _bytes_read_from_files()
        full, metadata = checkpointer.restore(target)
        end = _bytes_read_from_files()
    chex.assert_trees_all_equal(full, saved)
    chex.assert_trees_all_equal((part.step, part.params, part.batch_stats), (full.step, full.params, full.batch_stats))
    assert part_metadata == metadata == {"step": 3}
    assert jax.tree.leaves(part.opt_state) == []  # every moment and count is None
    assert jax.tree.structure(part.opt_state, is_leaf=lambda x: x is None) == jax.tree.structure(saved.opt_state)
    for leaf in jax.tree.leaves(part.params):
        assert leaf.sharding.is_equivalent_to(target.params["head"]["kernel"].sharding, leaf.ndim)
    kept = sum(leaf.nbytes for leaf in jax.tree.leaves((part.step, part.params, part.batch_stats)))
    skipped = sum(leaf.nbytes for leaf in jax.tree.leaves(saved.opt_state))
    part_read, full_read = middle - start, end - middle
    # Orbax compresses the arrays a little (measured: 110 kB read for 115 kB kept, 292 kB in all).
    assert 0.5 * kept < part_read < kept + 0.1 * skipped, (part_read, kept, skipped)
    assert full_read - part_read > 0.75 * skipped, (full_read, part_read, skipped)
    with Checkpointer(tmp_path / "ckpt") as checkpointer:
        with pytest.raises(ValueError, match=r"no fields \['optimizer'\]"):
            checkpointer.restore(target, only=("params", "optimizer"))
    # A field with nothing in it (a model without BatchNorm: batch_stats {}) is still a field.
    empty = saved.replace(batch_stats={})
    with Checkpointer(tmp_path / "empty") as checkpointer:
        checkpointer.save(1, empty, {"step": 1})
        part, _ = checkpointer.restore(target.replace(batch_stats={}), only=only)
    assert part.batch_stats == {}
    chex.assert_trees_all_equal(part.params, saved.params)


def test_readers_do_not_warn_that_the_directory_is_read_only(tmp_path, caplog):
    """Fine-tuning reads its pre-training with ``restore(only=...)`` and tools with
    ``read_metadata``, both through orbax's read-only manager, whose warning "Given directory is
    read only" read like a permissions problem in every fine-tuning log. Other warnings pass."""
    mesh = make_mesh(1)
    saved = make_state(mesh, seed=1)
    with Checkpointer(tmp_path / "ckpt") as checkpointer:
        checkpointer.save(1, saved, {"step": 1})
    with caplog.at_level(logging.INFO):
        assert read_metadata(tmp_path / "ckpt") == {"step": 1}
        with Checkpointer(tmp_path / "ckpt") as checkpointer:
            checkpointer.restore(make_state(mesh, seed=2), only=("params",))
        logging.getLogger("absl").warning("Given directory is read only (not from orbax)")
    messages = [record.getMessage() for record in caplog.records]
    assert not any(m.startswith("Given directory is read only=") for m in messages), messages
    assert "Given directory is read only (not from orbax)" in messages


def test_restoring_into_another_architecture_names_the_differences(tmp_path):
    mesh = make_mesh(1)
    with Checkpointer(tmp_path / "ckpt") as checkpointer:
        checkpointer.save(2, make_state(mesh, hidden=4), {})
        target = make_state(mesh, hidden=8, extra_layer=True)
        with pytest.raises(CheckpointMismatchError) as info:
            checkpointer.restore(target)
        with pytest.raises(CheckpointMismatchError, match="params/encoder/kernel: checkpoint shape"):
            checkpointer.restore(target, only=("params",))  # the skipped fields are checked too
    message = str(info.value)
    assert isinstance(info.value, ValueError)
    assert "different architecture or config" in message
    assert "params/encoder/kernel: checkpoint shape (3, 4) != current shape (3, 8)" in message
    assert "opt_state/0/mu/encoder/bias" in message  # Optimizer state paths are named too.
    assert "params/extra/kernel: in the current state (8, 8), missing from the checkpoint" in message


def test_missing_checkpoint_and_bad_metadata_give_clear_errors(tmp_path):
    mesh = make_mesh(1)
    with Checkpointer(tmp_path / "ckpt") as checkpointer:
        with pytest.raises(FileNotFoundError, match="no finished checkpoint"):
            checkpointer.restore(make_state(mesh))
        with pytest.raises(TypeError, match="JSON-serialisable"):
            checkpointer.save(1, make_state(mesh), {"array": np.zeros(3)})
        checkpointer.save(1, make_state(mesh), {})
        with pytest.raises(FileNotFoundError, match=r"available steps: \[1\]"):
            checkpointer.restore(make_state(mesh), step=5)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_metadata(tmp_path / "nowhere")
