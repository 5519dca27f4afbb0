"""Multi-host start-up: which environment starts ``jax.distributed``, and a real two-process
pre-training run on CPU (two local processes x 2 fake devices) that must equal a one-process run
on 4 fake devices."""

import os
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest

from prelar_jax.runtime import config as config_lib, parallel, pretrain_loop
from test_pretrain_loop import read_metrics, restore_state, tiny_config, write_moving_squares

pytestmark = pytest.mark.slow  # subprocesses or long training: skipped by -m "not slow"

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 3
# The same overrides on the command line (two processes) and in-process (the reference run).
OVERRIDES = {
    "steps": STEPS,
    "log.every": 1,
    "log.checkpoint_every": 2,
    "log.media_every": 1000,
    "log.wandb_mode": "disabled",
}


@pytest.fixture
def no_cluster_env(monkeypatch):
    """An environment without any multi-host variable, whatever the test machine has."""
    for name in [*parallel._EXPLICIT_VARS, *parallel._SLURM_VARS, "SLURM_NTASKS"]:
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def slurm_env(ntasks: int, procid: int) -> dict[str, str]:
    return {
        "SLURM_JOB_ID": "4242",
        "SLURM_STEP_NODELIST": "node[001-002]",
        "SLURM_NTASKS": str(ntasks),
        "SLURM_PROCID": str(procid),
        "SLURM_LOCALID": "0",
    }


def test_settings_from_explicit_variables():
    env = {"JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234", "JAX_NUM_PROCESSES": "4", "JAX_PROCESS_ID": "3"}
    assert parallel.distributed_settings(env) == parallel.DistributedSettings("10.0.0.1:1234", 4, 3, None)
    assert parallel.distributed_settings({}) is None
    assert parallel.distributed_settings({**env, "JAX_NUM_PROCESSES": "1", "JAX_PROCESS_ID": "0"}) is None


def test_settings_from_slurm_leave_the_rest_to_jax():
    assert parallel.distributed_settings(slurm_env(8, 5)) == parallel.DistributedSettings(None, 8, None, "slurm")
    # One task, or SLURM_NTASKS without srun's step variables (an sbatch script): single process.
    assert parallel.distributed_settings(slurm_env(1, 0)) is None
    assert parallel.distributed_settings({"SLURM_NTASKS": "4"}) is None
    # Explicit variables win over SLURM's.
    explicit = {**slurm_env(8, 5), "JAX_COORDINATOR_ADDRESS": "head:999", "JAX_NUM_PROCESSES": "2"}
    assert parallel.distributed_settings(explicit) == parallel.DistributedSettings("head:999", 2, None, "slurm")


@pytest.mark.parametrize(
    "env, message",
    [
        ({"JAX_COORDINATOR_ADDRESS": "h:1"}, "JAX_NUM_PROCESSES, JAX_PROCESS_ID are not set"),
        ({"JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "0"}, "JAX_COORDINATOR_ADDRESS is not set"),
        ({"JAX_COORDINATOR_ADDRESS": "h:1", "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "2"}, "between 0 and 1"),
        ({"JAX_COORDINATOR_ADDRESS": "h:1", "JAX_NUM_PROCESSES": "two", "JAX_PROCESS_ID": "0"}, "not an integer"),
        ({"JAX_COORDINATOR_ADDRESS": "h", "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "0"}, "host:port"),
    ],
)
def test_incomplete_or_bad_variables_are_one_clear_error(env, message):
    with pytest.raises(parallel.DistributedSetupError, match=message):
        parallel.distributed_settings(env)


def test_initialize_distributed_passes_the_settings_to_jax(no_cluster_env):
    calls = []
    no_cluster_env.setattr(jax.distributed, "is_initialized", lambda: False)
    no_cluster_env.setattr(jax.distributed, "initialize", lambda **kwargs: calls.append(kwargs))
    assert parallel.initialize_distributed() is None and calls == []  # nothing set: single process
    for name, value in [
        ("JAX_COORDINATOR_ADDRESS", "127.0.0.1:5555"),
        ("JAX_NUM_PROCESSES", "2"),
        ("JAX_PROCESS_ID", "1"),
    ]:
        no_cluster_env.setenv(name, value)
    parallel.initialize_distributed()
    assert calls == [
        {"coordinator_address": "127.0.0.1:5555", "num_processes": 2, "process_id": 1, "cluster_detection_method": None}
    ]
    calls.clear()
    parallel.initialize_distributed(slurm_env(4, 2))
    assert calls == [
        {"coordinator_address": None, "num_processes": 4, "process_id": None, "cluster_detection_method": "slurm"}
    ]


def test_finetuning_refuses_several_processes_before_starting_anything(no_cluster_env, tmp_path):
    def must_not_start(**kwargs):
        raise AssertionError("fine-tuning must not connect to a coordinator")

    no_cluster_env.setattr(jax.distributed, "initialize", must_not_start)
    for key, value in slurm_env(2, 0).items():
        no_cluster_env.setenv(key, value)
    from prelar_jax.runtime import finetune_loop

    config = config_lib.load_config("configs/dreamerv2.py:tiny", {})
    with pytest.raises(parallel.MultiProcessNotSupportedError, match="fine-tuning runs in one process only"):
        finetune_loop.run(config, str(tmp_path / "ft"))
    assert not (tmp_path / "ft").exists()


def test_one_process_holds_every_row_and_local_equals_global_put():
    mesh = parallel.make_mesh(jax.devices()[:4])
    assert parallel.process_rows(mesh, 8) == range(0, 8)
    batch = {"image": np.arange(8 * 3, dtype=np.uint8).reshape(8, 3), "is_first": np.arange(8) % 2 == 0}
    local, whole = parallel.put_local_batch(batch, mesh), parallel.put_batch(batch, mesh)
    for key in batch:
        assert local[key].sharding == whole[key].sharding == parallel.batch_sharding(mesh)
        np.testing.assert_array_equal(np.asarray(local[key]), batch[key])
        np.testing.assert_array_equal(np.asarray(whole[key]), batch[key])


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def two_process_command(data_root: str, workdir: str) -> list[str]:
    # experiments/pretrain.py as is, run through multihost_child.py so that process 1 too writes
    # the compilation cache (JAX writes it from process 0 only; see that file).
    return [
        sys.executable,
        os.path.join(ROOT, "tests", "multihost_child.py"),
        os.path.join(ROOT, "experiments", "pretrain.py"),
        "--config=configs/prelar_pretrain.py:tiny",
        f"--workdir={workdir}",
        f"--config.data.root={data_root}",
        *[f"--config.{k}={v}" for k, v in OVERRIDES.items()],
    ]


# Run in each of two processes (2 CPU devices each): its rows of an 8-row batch, and both ways of
# handing them over put the same values on its devices.
ROWS_SCRIPT = """
import sys
import jax
import numpy as np
from prelar_jax.runtime import parallel
parallel.initialize_distributed()
mesh = parallel.make_mesh()
index = jax.process_index()
rows = parallel.process_rows(mesh, 8)
assert rows == range(4 * index, 4 * index + 4), rows
batch = {"image": np.arange(8 * 3).reshape(8, 3), "is_first": np.arange(8) % 3 == 0}
for put in (parallel.put_batch(batch, mesh), parallel.put_local_batch({k: v[4 * index:4 * index + 4]
                                                                         for k, v in batch.items()}, mesh)):
    for key, value in put.items():
        assert value.shape == batch[key].shape, (key, value.shape)
        for shard in value.addressable_shards:
            np.testing.assert_array_equal(np.asarray(shard.data), batch[key][shard.index])
print("rows ok", index, list(rows))
"""


def start_two_processes(command: list[str]) -> list[subprocess.Popen]:
    """``command`` as processes 0 and 1 of a two-process JAX job (2 fake CPU devices each)."""
    port = free_port()
    return [
        subprocess.Popen(
            command,
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=dict(
                os.environ,
                JAX_PLATFORMS="cpu",
                XLA_FLAGS="--xla_force_host_platform_device_count=2",
                JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}",
                JAX_NUM_PROCESSES="2",
                JAX_PROCESS_ID=str(index),
            ),
        )
        for index in range(2)
    ]


def finish_processes(procs: list[subprocess.Popen], timeout: float) -> list[str]:
    """Each process's output once it has exited with status 0; stragglers are killed."""
    try:
        outputs = [proc.communicate(timeout=timeout)[0] for proc in procs]
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
    for index, (proc, output) in enumerate(zip(procs, outputs)):
        assert proc.returncode == 0, f"process {index} failed:\n{output[-4000:]}"
    return outputs


def test_each_process_holds_its_block_of_rows():
    procs = start_two_processes([sys.executable, "-c", ROWS_SCRIPT])
    outputs = finish_processes(procs, timeout=300)
    for index, output in enumerate(outputs):
        assert f"rows ok {index} {list(range(4 * index, 4 * index + 4))}" in output


def test_two_processes_equal_one_process_on_as_many_devices(tmp_path, monkeypatch):
    # Direct oneDNN kernels (inherited by the child processes): Winograd's weight gradients depend on
    # how the batch is split about 4x more (tests/test_pretrain_step.py,
    # test_four_device_step_equals_one_device_step, says why that matters here).
    monkeypatch.setenv("PRELAR_CONV_ALGORITHM", "direct")
    squares = write_moving_squares(str(tmp_path / "videos"))
    workdir, reference = str(tmp_path / "two"), str(tmp_path / "one")
    procs = start_two_processes(two_process_command(squares, workdir))
    # The one-process reference on 4 devices runs meanwhile (the children mostly wait on compiles).
    pretrain_loop.run(tiny_config(squares, **OVERRIDES), reference, devices=jax.devices()[:4])
    outputs = finish_processes(procs, timeout=900)
    for index, output in enumerate(outputs):
        assert "4 x cpu device(s)" in output  # each process sees the global mesh
        assert f"process {index} of 2 loads rows {2 * index}..{2 * index + 1} of each batch of 4" in output

    # Process 0 alone logs: one line per step (both processes logging would repeat steps).
    rows = [r for r in read_metrics(workdir) if "loss" in r]
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["2", "3"]
    two = restore_state(tiny_config(squares), workdir)
    one = restore_state(tiny_config(squares), reference)
    assert int(two.step) == int(one.step) == STEPS
    # Each process loaded only its half of every batch (rows drawn from per-row generators), and
    # the halves are the one-process batch (a whole batch handed to put_local_batch would not fit
    # the compiled step's shape). Both runs split the same global batch the same way over 4
    # devices and draw the same random numbers (keys folded with global example indices), so they
    # compute the same per-device gradients; only the cross-device means (pmean) are reduced by
    # different implementations (gloo across processes vs. XLA's in-process all-reduce), which may
    # sum in another order: float32 differences of a few ulps. The losses (forward passes) therefore agree to 1e-5.
    reference_rows = [r for r in read_metrics(reference) if "loss" in r]
    np.testing.assert_allclose([r["loss"] for r in rows], [r["loss"] for r in reference_rows], rtol=1e-5)
    # Parameters: Adam divides each gradient component by its running RMS, so a component that is
    # zero up to rounding (|g| ~ eps = 1e-5) gets an update of up to lr whose size is decided by
    # that rounding: elementwise rtol cannot hold for those few. Almost every element agrees to
    # rtol 1e-5, and every element to 0.1 lr (observed: at most ~0.01 lr after 3 steps).
    lr = tiny_config(squares).optimizer.lr
    for tree_two, tree_one in [(two.params, one.params), (two.batch_stats, one.batch_stats)]:
        a = np.concatenate([np.ravel(x) for x in jax.tree.leaves(tree_two)])
        b = np.concatenate([np.ravel(x) for x in jax.tree.leaves(tree_one)])
        np.testing.assert_allclose(a, b, rtol=0, atol=0.1 * lr)
        close = np.isclose(a, b, rtol=1e-5, atol=1e-7)
        assert close.mean() > 0.999, f"{(~close).sum()} of {a.size} elements differ by more than rtol 1e-5"
