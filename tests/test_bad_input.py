"""Bad input gives one clear error, and loading never unpickles (README "Reliability").

Every case here must end in a ``UserError`` subclass whose message names the problem and says
what to do, raised before any expensive work; the command-line entry points print such an error
as ``error: <message>`` without a traceback and exit with status 2 (``errors.exit_on_user_error``).
Most cases call the library in-process; a few run the real command lines to prove the exit path.
A full disk is simulated by making orbax's writer fail the way tensorstore does, and, where
unprivileged user namespaces are allowed, by a real 1 MiB tmpfs.
"""

from __future__ import annotations

import errno
import functools
import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
import warnings

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from prelar_jax.runtime import checkpoint, config as config_lib, finetune_loop, logger as logger_lib, parallel
from prelar_jax import errors
from prelar_jax.learners import pretrain
from prelar_jax.runtime import pretrain_loop
from prelar_jax.runtime.pretrained import PretrainedNotFoundError
from prelar_jax.data import videos
from prelar_jax.envs import metaworld as mw
from prelar_jax.envs.workers import EnvWorkerError, ParallelEnvs, make_metaworld_env

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PRETRAIN = "configs/prelar_pretrain.py:tiny"
FINETUNE = "configs/prelar_finetune.py:tiny"
DREAMER = "configs/dreamerv2.py:tiny"


def pretrain_config(data_root, **overrides):
    return config_lib.load_config(PRETRAIN, {"data.root": str(data_root), "log.wandb_mode": "disabled", **overrides})


def finetune_config(spec=FINETUNE, **overrides):
    return config_lib.load_config(spec, {"log.wandb_mode": "disabled", **overrides})


def write_video(path, frames: int, seed: int = 0, **extra) -> str:
    """A Dreamer-format episode file with ``frames`` random 64x64 frames (plus ``extra`` keys)."""
    image = np.random.default_rng(seed).integers(0, 256, (frames, 64, 64, 3), dtype=np.uint8)
    np.savez(path, image=image, **extra)
    return str(path)


def run_cli(script: str, *flags: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, os.path.join(ROOT, "experiments", script), *flags],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=180,
    )


def assert_one_clear_error(proc: subprocess.CompletedProcess, *needles: str) -> str:
    """Exit status 2, no traceback, exactly one ``error:`` message holding every needle."""
    stderr = proc.stderr
    assert proc.returncode == 2, stderr[-3000:]
    assert "Traceback" not in stderr, stderr[-3000:]
    assert len(re.findall(r"^error: ", stderr, flags=re.M)) == 1, stderr[-3000:]
    message = stderr[stderr.index("error: ") :]
    for needle in needles:
        assert needle in message, (needle, message)
    return message


def _raise(error: BaseException):
    raise error


def test_exit_on_user_error_prints_one_line_for_user_errors_and_a_full_disk(capsys):
    assert errors.exit_on_user_error(lambda: 7) == 7
    with pytest.raises(SystemExit) as info:
        errors.exit_on_user_error(lambda: _raise(config_lib.ConfigError("config.steps: must be positive")))
    assert info.value.code == 2 and capsys.readouterr().err == "error: config.steps: must be positive\n"
    full = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), "/runs/a/metrics.jsonl")
    with pytest.raises(SystemExit) as info:
        errors.exit_on_user_error(lambda: _raise(full))
    err = capsys.readouterr().err
    assert info.value.code == 2 and err.count("\n") == 1 and err.startswith("error: the disk is full while")
    assert "/runs/a/metrics.jsonl" in err and "No space left on device" in err and "re-run" in err
    for bug in (OSError(errno.EACCES, "Permission denied"), ValueError("a bug")):  # keep their traceback
        with pytest.raises(type(bug)):
            errors.exit_on_user_error(lambda bug=bug: _raise(bug))


# ------------------------------------------------------------------------------------------------
# Config: unknown keys and presets, invalid values
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("spec", [PRETRAIN, FINETUNE, DREAMER])
def test_unknown_preset_or_file_or_key_is_a_config_error(spec):
    path = spec.split(":")[0]
    with pytest.raises(config_lib.ConfigError, match=r"unknown preset 'huge'.*'paper', 'small', 'cpu', 'tiny'"):
        config_lib.load_config(f"{path}:huge")
    # What the command lines check before absl parses the flags (it would print a traceback).
    with pytest.raises(config_lib.ConfigError, match="unknown preset 'huge'"):
        config_lib.check_override_flags(["prog", f"--config={path}:huge"], spec)
    with pytest.raises(config_lib.ConfigError, match="not found"):
        config_lib.check_override_flags(["prog", "--config=configs/nope.py:tiny"], spec)
    with pytest.raises(config_lib.ConfigError) as info:
        config_lib.check_override_flags(["prog", f"--config={spec}", "--config.model.detr=3"], spec)
    assert "unknown config key --config.model.detr" in str(info.value) and "'deter'" in str(info.value)
    config_lib.check_override_flags(["prog", f"--config={spec}", "--config.model.deter=16"], spec)


@pytest.mark.parametrize(
    "key, value, needle",
    [
        ("steps", 0, "positive integer"),
        ("batch_size", -4, "positive integer"),
        ("sequence_length", 1, "at least 2"),
        ("image_size", 0, "positive integer"),
        ("model.deter", 0, "positive integer"),
        ("implicit_action.stoch", 0, "must be positive"),
        ("log.media_examples", 0, "positive integer"),
        ("data.prefetch_threads", 0, "positive integer"),
        ("log.checkpoint_every", -1, "positive integer"),
    ],
)
def test_invalid_pretrain_values_name_the_key(key, value, needle):
    with pytest.raises(config_lib.ConfigError, match=f"config.{re.escape(key)}: .*{needle}"):
        config_lib.validate_pretrain_config(pretrain_config("videos", **{key: value}))


@pytest.mark.parametrize(
    "key, value, needle",
    [
        ("steps", 0, "positive integer"),
        ("batch_size", 0, "positive integer"),
        ("image_size", -64, "positive integer"),
        ("env.num_envs", 0, "positive integer"),
        ("heads.units", 0, "positive integer"),
        ("replay.capacity", 0, "positive integer"),
        ("log.media_examples", 0, "positive integer"),
        ("env.step_timeout", 0.0, "must be positive"),
        ("sequence_length", 52, r"must be in \[2, 51\]: sequences are cut from single episodes"),  # tiny: time_limit 50
    ],
)
def test_invalid_finetune_values_name_the_key(key, value, needle):
    with pytest.raises(config_lib.ConfigError, match=f"config.{re.escape(key)}: .*{needle}"):
        config_lib.validate_finetune_config(finetune_config(**{key: value}))


@pytest.mark.parametrize("dtype", ["float16", "float64", "bf16"])
def test_compute_dtype_other_than_float32_or_bfloat16_is_refused(dtype):
    """float16 has no loss scaling here, so its gradients would silently underflow: it is refused
    (as is any other name) with one message that says what to use instead, in both trainers."""
    validators = [
        (config_lib.validate_pretrain_config, pretrain_config("videos", **{"model.compute_dtype": dtype})),
        (config_lib.validate_finetune_config, finetune_config(**{"model.compute_dtype": dtype})),
        (config_lib.validate_finetune_config, finetune_config(DREAMER, **{"model.compute_dtype": dtype})),
    ]
    for validate, config in validators:
        with pytest.raises(config_lib.ConfigError) as info:
            validate(config)
        message = str(info.value)
        assert message.startswith(f"config.model.compute_dtype: {dtype!r} is not supported"), message
        assert "use 'float32' or 'bfloat16'" in message and "loss scaling" in message, message
    for dtype in ("float32", "bfloat16"):  # the two supported values still pass
        config_lib.validate_pretrain_config(pretrain_config("videos", **{"model.compute_dtype": dtype}))
        config_lib.validate_finetune_config(finetune_config(**{"model.compute_dtype": dtype}))


def test_batch_not_divisible_by_the_device_count_fails_before_any_work(tmp_path):
    four = jax.devices()[:4]
    with pytest.raises(parallel.DeviceCountError, match=r"batch_size=6 .* 4 devices.*multiple of 4"):
        pretrain_loop.run(pretrain_config(tmp_path, batch_size=6), str(tmp_path / "pre"), devices=four)
    with pytest.raises(parallel.DeviceCountError, match=r"batch_size=6 .* 4 devices.*multiple of 4"):
        finetune_loop.run(finetune_config(DREAMER, batch_size=6), str(tmp_path / "ft"), devices=four)
    assert not (tmp_path / "pre").exists() and not (tmp_path / "ft").exists()


def test_unknown_metaworld_task_lists_the_valid_names(tmp_path):
    with pytest.raises(config_lib.ConfigError) as info:
        finetune_loop.run(finetune_config(task="open-the-fridge"), str(tmp_path / "run"))
    message = str(info.value)
    assert "config.task" in message and "'open-the-fridge'" in message
    assert "drawer-open" in message and "window-close" in message
    assert "Did you mean" not in message  # nothing close to suggest
    config_lib.validate_finetune_config(finetune_config(task="Drawer_Open-v3"))  # spelling variants work
    with pytest.raises(config_lib.ConfigError, match=r"'drawer-opne'\. Did you mean 'drawer-open'"):
        config_lib.validate_finetune_config(finetune_config(task="drawer-opne"))


@pytest.mark.parametrize("kind", ["file", "file as parent"])
def test_workdir_that_is_a_file_is_one_clear_error(kind, tmp_path):
    """``--workdir`` naming a regular file (or a path under one) is refused before anything is
    written, and the file is left as it was."""
    target = tmp_path / "notes.txt"
    target.write_text("keep me")
    workdir = target if kind == "file" else target / "run"
    with pytest.raises(errors.UserError, match="is a file, not a directory|a component of the path is a file"):
        pretrain_loop.run(pretrain_config(tmp_path), str(workdir))
    assert target.read_text() == "keep me"


# ------------------------------------------------------------------------------------------------
# Video datasets: missing, empty, corrupt, too short, pickled
# ------------------------------------------------------------------------------------------------

UNPICKLED: list[str] = []


def _record_unpickle() -> str:
    UNPICKLED.append("an object was unpickled")
    return "payload"


class _Payload:
    """Unpickling it records the fact: a stand-in for a pickle that runs arbitrary code."""

    def __reduce__(self):
        return (_record_unpickle, ())


def test_missing_empty_or_wholly_corrupt_video_dataset(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(videos.NoVideoDataError, match=rf"missing: {re.escape(str(missing))}.*generate_videos"):
        pretrain_loop.run(pretrain_config(missing), str(tmp_path / "a"), devices=jax.devices()[:1])
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(videos.NoVideoDataError, match=r"found 0 \*\.npz file\(s\).*generate_videos"):
        pretrain_loop.run(pretrain_config(empty), str(tmp_path / "b"), devices=jax.devices()[:1])
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    for i in range(3):
        (corrupt / f"{i}.npz").write_bytes(b"PK\x03\x04 truncated" * i)
    with (
        pytest.warns(videos.VideoDataWarning, match="corrupt"),
        pytest.raises(videos.NoVideoDataError, match=r"found 3 \*\.npz.*skipped_corrupt: 3"),
    ):
        pretrain_loop.run(pretrain_config(corrupt), str(tmp_path / "c"), devices=jax.devices()[:1])


def test_sequence_longer_than_every_video_names_the_lengths(tmp_path):
    write_video(tmp_path / "a.npz", 10, seed=1)
    write_video(tmp_path / "b.npz", 12, seed=2)
    config = pretrain_config(tmp_path, sequence_length=20)
    with (
        pytest.warns(videos.VideoDataWarning, match="fewer than 20 frames"),
        pytest.raises(videos.NoVideoDataError) as info,
    ):
        pretrain_loop.run(config, str(tmp_path / "run"), devices=jax.devices()[:1])
    message = str(info.value)
    assert "none has at least 20 frames" in message
    assert "the longest of 2 has 12" in message and "[10, 12]" in message
    assert "at most 12" in message and "--config.sequence_length" in message


def test_pickled_object_arrays_in_videos_are_never_loaded(tmp_path):
    UNPICKLED.clear()
    good = write_video(tmp_path / "good.npz", 9, seed=3, action=np.array([_Payload()] * 9, dtype=object))
    pickled = tmp_path / "pickled.npz"
    np.savez(pickled, image=np.array([_Payload()] * 9, dtype=object))
    with pytest.warns(videos.VideoDataWarning, match=r"pickled object array.*never loaded.*pickled\.npz"):
        dataset = videos.NpzEpisodeDataset(tmp_path)
    assert dataset.file_counts()["files_ok"] == 1 and dataset.file_counts()["skipped_bad_format"] == 1
    batch = dataset.sample(np.random.default_rng(0), 4, 5)  # reads good.npz's image, not its action
    with np.load(good, allow_pickle=False) as data:
        frames = data["image"]
    starts = [next(s for s in range(5) if np.array_equal(frames[s : s + 5], seq)) for seq in batch["image"]]
    assert len(starts) == 4
    # Only the pickled file: one clear error, and nothing was ever unpickled.
    (tmp_path / "good.npz").unlink()
    with (
        pytest.warns(videos.VideoDataWarning),
        pytest.raises(videos.NoVideoDataError, match="none usable.*skipped_bad_format: 1"),
    ):
        videos.NpzEpisodeDataset(tmp_path)
    assert UNPICKLED == []
    # Proof that the files really hold pickles that a permissive loader would run.
    with np.load(pickled, allow_pickle=True) as data:
        data["image"]
    assert UNPICKLED


def test_no_loader_in_the_package_can_unpickle():
    """Loading-safety audit as a guard: every np.load refuses pickles, and nothing else unpickles
    (orbax restores arrays through tensorstore and metadata through JSON; configs are JSON)."""
    loads = []
    for folder, _, files in [*os.walk(os.path.join(ROOT, "prelar_jax")), *os.walk(os.path.join(ROOT, "experiments"))]:
        for name in files:
            if not name.endswith(".py"):
                continue
            path = os.path.join(folder, name)
            with open(path, encoding="utf-8") as handle:
                source = handle.read()
            for forbidden in (
                "allow_pickle=True",
                "pickle.load",
                "cloudpickle",
                "torch.load",
                "yaml.load(",
                "yaml.unsafe_load",
                "msgpack_restore",
            ):
                assert forbidden not in source, f"{path} uses {forbidden}"
            for match in re.finditer(r"np\.load\(([^)]*)\)", source):
                loads.append(path)
                assert "allow_pickle=False" in match.group(1), f"{path}: {match.group(0)}"
    assert len(loads) >= 2  # videos and replay


# ------------------------------------------------------------------------------------------------
# Workdirs and pre-trained checkpoints
# ------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_resuming_with_another_config_is_refused_unless_overridden(tmp_path):
    pre_dir, ft_dir = tmp_path / "pre", tmp_path / "ft"
    logger_lib.write_config(pre_dir, pretrain_config(tmp_path).to_dict())
    with pytest.raises(
        logger_lib.ConfigMismatchError, match=r"(?s)model\.deter: 32 \(saved\) -> 16 \(now\).*--allow_config_override"
    ):
        pretrain_loop.run(pretrain_config(tmp_path, **{"model.deter": 16}), str(pre_dir), devices=jax.devices()[:1])
    logger_lib.write_config(ft_dir, finetune_config().to_dict())
    changed = finetune_config(seed=5, pretrained=str(tmp_path / "no-pretraining-here"))
    with pytest.raises(
        logger_lib.ConfigMismatchError, match=r"(?s)seed: 0 \(saved\) -> 5 \(now\).*--allow_config_override"
    ):
        finetune_loop.run(changed, str(ft_dir), devices=jax.devices()[:1])
    # With the flag it goes on (and then stops at the missing pre-training workdir).
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        with pytest.raises(PretrainedNotFoundError, match=r"config\.json does not exist.*pre-training run"):
            finetune_loop.run(changed, str(ft_dir), allow_config_override=True, devices=jax.devices()[:1])
    assert json.load(open(ft_dir / "config.json"))["seed"] == 5


@pytest.fixture(scope="module")
def other_architecture_pretraining(tmp_path_factory):
    """A pre-training workdir of a narrower world model (deter 16) with one checkpoint."""
    workdir = tmp_path_factory.mktemp("pretrain16")
    config = config_lib.load_config(PRETRAIN, {"data.root": "unused", "model.deter": 16, "model.hidden": 16})
    model = pretrain.PretrainModel(config)
    shapes = jax.eval_shape(lambda k: model.init_state(k, pretrain.make_optimizer(config)), jax.random.key(0))
    state = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), shapes)
    logger_lib.write_config(workdir, config.to_dict())
    with checkpoint.Checkpointer(workdir / "checkpoints") as ckpt:
        ckpt.save(3, state, {"step": 3})
    return str(workdir)


@pytest.mark.parametrize(
    "script, flags, needles",
    [
        ("pretrain.py", ["--config=configs/prelar_pretrain.py:huge"], ["unknown preset 'huge'", "'tiny'"]),
        ("finetune.py", ["--config=configs/prelar_finetune.py:huge"], ["unknown preset 'huge'", "'tiny'"]),
        (
            "finetune.py",
            ["--config=configs/dreamerv2.py:tiny", "--config.model.detr=3"],
            ["unknown config key --config.model.detr", "'deter'"],
        ),
        (
            "finetune.py",
            [
                "--config=configs/prelar_finetune.py:tiny",
                "--config.pretrained={pretrained}",
                "--config.log.wandb_mode=disabled",
            ],
            ["do not fit this fine-tuning agent", "model.deter: pre-training 16, fine-tuning 32", "preset"],
        ),
        (
            "finetune.py",
            ["--config=configs/dreamerv2.py:tiny", "--config.task=drawer-opne", "--workdir={file}"],
            ["Unknown Meta-World task 'drawer-opne'", "Did you mean 'drawer-open'"],
        ),
        (
            "pretrain.py",
            ["--config=configs/prelar_pretrain.py:tiny", "--config.data.root={data}", "--workdir={file}"],
            ["is a file, not a directory"],
        ),
    ],
)
@pytest.mark.slow
def test_cli_prints_one_error_and_exits_2(script, flags, needles, tmp_path, request):
    if any("{pretrained}" in flag for flag in flags):
        pretrained = request.getfixturevalue("other_architecture_pretraining")
        flags = [flag.format(pretrained=pretrained) for flag in flags]
    if any("{file}" in flag for flag in flags):  # --workdir names an existing regular file
        (tmp_path / "file").write_text("keep me")
        write_video(tmp_path / "ep.npz", 12)
        flags = [flag.format(file=tmp_path / "file", data=tmp_path) for flag in flags]
    else:
        flags = [*flags, f"--workdir={tmp_path / 'run'}"]
    assert_one_clear_error(run_cli(script, *flags), *needles)
    if (tmp_path / "file").exists():
        assert (tmp_path / "file").read_text() == "keep me"


# ------------------------------------------------------------------------------------------------
# No rendering backend in the fine-tuning environment workers
# ------------------------------------------------------------------------------------------------


def env_without_rendering(seed: int, **kwargs):
    """``make_metaworld_env`` on a machine without EGL and OSMesa (runs in the spawned worker)."""
    import mujoco

    def no_renderer(*args, **kw):
        raise RuntimeError("gladLoadGL error (simulated)")

    mujoco.Renderer = no_renderer
    mw._CHECKED_BACKEND = None
    mw._probe_backend = lambda backend, timeout=60.0: "libEGL.so.1: cannot open shared object file (simulated)"
    return make_metaworld_env(seed, **kwargs)


@pytest.mark.slow
def test_worker_without_rendering_backend_names_the_packages():
    # The factory finetune_loop.run builds its workers with, with rendering made impossible.
    make_env = functools.partial(
        env_without_rendering, task="reach", size=64, camera="corner", lean_rendering=True, time_limit=50
    )
    with pytest.raises(EnvWorkerError) as info:
        ParallelEnvs(make_env, [0], step_timeout=30.0, start_timeout=120.0)
    message = str(info.value)
    assert isinstance(info.value, errors.UserError) and "Traceback" not in message
    assert "RenderingBackendError" in message and "MuJoCo cannot render offscreen" in message
    assert "apt-get install libegl1 libegl-mesa0 libgl1" in message and "libosmesa6" in message
    assert "experiments/setup_env.sh" in message


# ------------------------------------------------------------------------------------------------
# A full disk while saving a checkpoint
# ------------------------------------------------------------------------------------------------

TENSORSTORE_ENOSPC = (
    'RESOURCE_EXHAUSTED: Error writing "w/0" in OCDBT database at local file "{path}": '
    "Failed to write 772829 bytes to file 4: No space left on device [os_error_code='28']"
)


def small_state(seed: int) -> dict:
    rng = np.random.default_rng(seed)
    return {
        "w": jax.numpy.asarray(rng.normal(size=(64, 8)), jax.numpy.float32),
        "step": jax.numpy.asarray(seed, jax.numpy.int32),
    }


def fail_writes(monkeypatch, error: Exception) -> None:
    """Every item write orbax commits (in the background for async saves) raises ``error``."""

    async def failing(self, item, directory):
        raise error

    monkeypatch.setattr(ocp.JsonCheckpointHandler, "_save_fn", failing)


def assert_only_step(directory, step: int, state: dict) -> None:
    """On disk and for a fresh Checkpointer: exactly ``step``, holding ``state``; no leftovers."""
    assert sorted(os.listdir(directory)) == [str(step)], os.listdir(directory)
    with checkpoint.Checkpointer(directory) as fresh:
        assert fresh.all_steps() == [step]
        restored, metadata = fresh.restore(small_state(99))
    np.testing.assert_array_equal(np.asarray(restored["w"]), np.asarray(state["w"]))
    assert metadata == {"step": step}


@pytest.mark.parametrize("found_by", ["wait_until_finished", "next save", "close"])
def test_full_disk_during_async_save_keeps_the_previous_checkpoint(found_by, tmp_path, monkeypatch):
    directory = tmp_path / "ckpt"
    first = small_state(1)
    ckpt = checkpoint.Checkpointer(directory, max_to_keep=1)  # the failed save must not prune step 1
    ckpt.save(1, first, {"step": 1})
    ckpt.wait_until_finished()
    fail_writes(monkeypatch, ValueError(TENSORSTORE_ENOSPC.format(path=directory)))
    assert ckpt.save(2, small_state(2), {"step": 2})  # asynchronous: the failure comes later
    assert ckpt.latest_step() == 1 and ckpt.all_steps() == [1]  # step 2 is not finished
    with pytest.raises(checkpoint.CheckpointSaveError) as info:
        if found_by == "wait_until_finished":
            ckpt.wait_until_finished()
        elif found_by == "next save":
            ckpt.save(3, small_state(3), {"step": 3})
        else:
            ckpt.close()
    error = info.value
    assert isinstance(error, errors.UserError) and isinstance(error, OSError)
    message = str(error)
    assert f"could not write checkpoint step 2 to {directory}: No space left on device" in message
    assert "newest complete checkpoint is step 1" in message
    assert "Free disk space" in message and "re-run" in message
    assert ckpt.latest_step() == 1 and ckpt.all_steps() == [1]
    assert_only_step(directory, 1, first)  # no half-written step 2, step 1 not pruned
    # Space freed: the same Checkpointer saves again (and only now prunes step 1).
    monkeypatch.undo()
    third = small_state(3)
    if found_by != "close":
        ckpt.save(3, third, {"step": 3})
        ckpt.close()
        assert_only_step(directory, 3, third)


def test_a_save_whose_files_vanish_blames_another_writer_and_names_the_real_latest_step(tmp_path, monkeypatch):
    """What two runs on one workdir did before the workdir lock: one deleted the other's temporary
    directory (ENOENT) and finished the step itself. The message must say what happened and name
    the step that really is the newest complete one, not call it "the previous checkpoint"."""
    directory = tmp_path / "ckpt"
    ckpt = checkpoint.Checkpointer(directory, async_save=False)
    ckpt.save(1, small_state(1), {"step": 1})
    missing = str(directory / "2.orbax-checkpoint-tmp-1" / "metadata")

    async def other_writer_wins(self, item, target):  # it finishes step 2 while ours fails
        shutil.copytree(directory / "1", directory / "2")
        raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), missing)

    monkeypatch.setattr(ocp.JsonCheckpointHandler, "_save_fn", other_writer_wins)
    with pytest.raises(checkpoint.CheckpointSaveError) as info:
        ckpt.save(2, small_state(2), {"step": 2})
    message = str(info.value)
    assert "could not write checkpoint step 2" in message and "No such file or directory" in message
    assert "disappeared while it was being written" in message and "another process" in message
    assert "newest complete checkpoint on disk is step 2, written by another process" in message
    assert "previous" not in message and "Free disk space" not in message


def test_full_disk_during_sync_save_and_with_no_earlier_checkpoint(tmp_path, monkeypatch):
    directory = tmp_path / "ckpt"
    fail_writes(monkeypatch, OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(directory / "metadata")))
    ckpt = checkpoint.Checkpointer(directory, async_save=False)
    with pytest.raises(checkpoint.CheckpointSaveError) as info:
        ckpt.save(5, small_state(5), {"step": 5})
    message = str(info.value)
    assert f"could not write checkpoint step 5 to {directory}: [Errno 28] No space left on device" in message
    assert "no complete checkpoint" in message and "starts from the beginning" in message
    assert ckpt.latest_step() is None and os.listdir(directory) == []
    # A bug (not a storage problem) keeps its own type and traceback.
    fail_writes(monkeypatch, KeyError("a bug"))
    with pytest.raises(KeyError):
        ckpt.save(6, small_state(6), {"step": 6})
    monkeypatch.undo()
    ckpt.save(7, small_state(7), {"step": 7})
    ckpt.close()
    assert_only_step(directory, 7, small_state(7))


_REAL_DISK_FULL = textwrap.dedent("""
    import os, sys
    sys.path.insert(0, {root!r})
    import jax, jax.numpy as jnp
    from absl import logging
    from prelar_jax.runtime import checkpoint
    from prelar_jax import errors
    logging.set_verbosity(logging.WARNING)  # as the training loops do: orbax's errors would show
    directory = os.path.join({mount!r}, "ckpt")
    if sys.argv[1] == "fill":
        ckpt = checkpoint.Checkpointer(directory, max_to_keep=1)
        ckpt.save(1, {{"w": jnp.ones((1000,), jnp.float32)}}, {{"step": 1}})
        ckpt.wait_until_finished()
        with open(os.path.join({mount!r}, "filler"), "wb") as f:  # leave about 60 kB
            st = os.statvfs({mount!r})
            f.write(bytes(st.f_bavail * st.f_frsize - 60_000))
        ckpt.save(2, {{"w": jnp.arange(300_000, dtype=jnp.float32)}}, {{"step": 2}})  # 1.1 MiB
        errors.exit_on_user_error(ckpt.close)
    else:
        ckpt = checkpoint.Checkpointer(directory)
        state, metadata = ckpt.restore({{"w": jnp.zeros((1000,), jnp.float32)}})
        print("CHECK", sorted(os.listdir(directory)), metadata, float(state["w"].sum()))
""")


@pytest.mark.slow
def test_real_full_disk_via_a_tiny_tmpfs(tmp_path):
    """A real ENOSPC from tensorstore on a 1 MiB tmpfs (needs unprivileged user namespaces)."""
    if not shutil.which("unshare") or subprocess.run(["unshare", "-Urm", "true"], capture_output=True).returncode:
        pytest.skip("unprivileged user namespaces (unshare -Urm) are not available here")
    mount = tmp_path / "disk"
    mount.mkdir()
    script = tmp_path / "disk_full.py"
    script.write_text(_REAL_DISK_FULL.format(root=ROOT, mount=str(mount)))
    py = f"{sys.executable} {script}"
    shell = f"mount -t tmpfs -o size=1m none {mount} && {py} fill; echo RC=$? >&2; {py} check"
    proc = subprocess.run(
        ["unshare", "-Urm", "sh", "-c", shell],
        capture_output=True,
        text=True,
        timeout=180,
        env={**os.environ, "JAX_PLATFORMS": "cpu"},
    )
    fill_stderr = proc.stderr.split("RC=")[0]
    assert "RC=2" in proc.stderr, proc.stderr[-3000:]
    assert_one_clear_error(
        subprocess.CompletedProcess([], 2, "", fill_stderr),
        "could not write checkpoint step 2",
        "No space left on device",
        "newest complete checkpoint is step 1",
        "Free disk space",
    )
    assert "CHECK ['1'] {'step': 1} 1000.0" in proc.stdout, proc.stdout + proc.stderr[-3000:]
