"""The pre-training run end to end on tiny synthetic videos: learning, resume, clear errors."""

import json
import os

import chex
import jax
import numpy as np
import pytest

from prelar_jax.runtime import checkpoint, config as config_lib, pretrain_loop
from prelar_jax.learners import pretrain
from prelar_jax.data import videos


def write_moving_squares(root, episodes=6, length=24, seed=0):
    """Dreamer-format episodes of a coloured square moving at constant speed (learnable dynamics)."""
    rng = np.random.default_rng(seed)
    os.makedirs(root, exist_ok=True)
    for e in range(episodes):
        frames = np.zeros((length + 1, 64, 64, 3), np.uint8)
        frames[:] = rng.integers(0, 80, 3, dtype=np.uint8)
        pos, vel = rng.uniform(8, 48, 2), rng.uniform(-3, 3, 2)
        colour = rng.integers(120, 256, 3, dtype=np.uint8)
        for t in range(length + 1):
            y, x = np.clip(pos, 0, 52).astype(int)
            frames[t, y : y + 12, x : x + 12] = colour
            pos = pos + vel
            vel = np.where((pos < 0) | (pos > 52), -vel, vel)
        np.savez_compressed(
            os.path.join(root, f"20260101T000000-{e:032x}-{length}.npz"),
            image=frames,
            action=np.zeros((length + 1, 4), np.float32),
            reward=np.zeros(length + 1, np.float32),
        )
    return root


def tiny_config(data_root, **overrides):
    values = {
        "data.root": str(data_root),
        "log.wandb_mode": "disabled",
        "log.every": 5,
        "log.media_every": 1000,
        "log.checkpoint_every": 10,
        **overrides,
    }
    return config_lib.load_config("configs/prelar_pretrain.py:tiny", values)


def read_metrics(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def restore_state(config, workdir):
    model = pretrain.PretrainModel(config)
    target = model.init_state(jax.random.key(0), pretrain.make_optimizer(config))
    with checkpoint.Checkpointer(os.path.join(workdir, "checkpoints")) as ckpt:
        state, _ = ckpt.restore(target)
    return state


@pytest.fixture(scope="module")
def squares(tmp_path_factory):
    return write_moving_squares(str(tmp_path_factory.mktemp("videos")))


@pytest.mark.slow
def test_short_run_lowers_loss_and_writes_workdir(squares, tmp_path):
    workdir = str(tmp_path / "run")
    config = tiny_config(squares, steps=60, **{"log.media_every": 60})
    summary = pretrain_loop.run(config, workdir, devices=jax.devices()[:1])
    assert summary["finished"] and summary["step"] == 60
    rows = [r for r in read_metrics(workdir) if "loss" in r]
    assert [r["step"] for r in rows] == list(range(5, 61, 5))
    assert rows[-1]["loss"] < 0.75 * rows[0]["loss"], (rows[0]["loss"], rows[-1]["loss"])
    assert all(np.isfinite(r["loss"]) for r in rows)
    assert os.path.exists(os.path.join(workdir, "media", "open_loop_00000060.png"))
    saved = json.load(open(os.path.join(workdir, "config.json")))
    assert saved["steps"] == 60 and saved["preset"] == "tiny"
    assert json.load(open(os.path.join(workdir, "summary.json")))["finished"] is True


@pytest.mark.slow
def test_resumed_run_equals_uninterrupted_run(squares, tmp_path):
    straight, split = str(tmp_path / "straight"), str(tmp_path / "split")
    devices = jax.devices()[:1]
    pretrain_loop.run(tiny_config(squares, steps=20), straight, devices=devices)
    first = pretrain_loop.run(tiny_config(squares, steps=10), split, devices=devices)
    assert first["step"] == 10
    second = pretrain_loop.run(tiny_config(squares, steps=20), split, devices=devices)
    assert second["step"] == 20 and second["finished"]
    # Each start records the code it loaded: two attempts, each a commit of this checkout (or None
    # outside git), the same for both here.
    attempts = [json.loads(line) for line in open(os.path.join(split, "attempts.jsonl"))]
    assert len(attempts) == 2 and attempts[0]["commit"] == attempts[1]["commit"]
    assert attempts[0]["commit"] is None or len(attempts[0]["commit"]) == 40
    steps = [r["step"] for r in read_metrics(split)]
    assert len(steps) == len(set(steps)), f"a step was logged twice: {steps}"
    a, b = restore_state(tiny_config(squares), straight), restore_state(tiny_config(squares), split)
    assert int(a.step) == int(b.step) == 20
    chex.assert_trees_all_close(a.params, b.params, rtol=1e-6, atol=1e-6)
    chex.assert_trees_all_close(a.opt_state, b.opt_state, rtol=1e-6, atol=1e-6)
    chex.assert_trees_all_close(a.batch_stats, b.batch_stats, rtol=1e-6, atol=1e-6)
    # A finished run re-run with the same command does nothing more.
    again = pretrain_loop.run(tiny_config(squares, steps=20), split, devices=devices)
    assert again["step"] == 20


@pytest.mark.slow
def test_resume_with_different_model_config_is_refused(squares, tmp_path):
    workdir = str(tmp_path / "run")
    pretrain_loop.run(tiny_config(squares, steps=1, **{"log.checkpoint_every": 1}), workdir, devices=jax.devices()[:1])
    changed = tiny_config(squares, steps=2, **{"model.deter": 48})
    with pytest.raises(ValueError, match="model.deter"):
        pretrain_loop.run(changed, workdir, devices=jax.devices()[:1])


def test_clear_errors_before_any_work(squares, tmp_path):
    with pytest.raises(ValueError, match="does not divide evenly over 4 devices"):
        pretrain_loop.run(tiny_config(squares, batch_size=6), str(tmp_path / "a"), devices=jax.devices()[:4])
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(videos.NoVideoDataError, match="generate_videos"):
        pretrain_loop.run(tiny_config(empty), str(tmp_path / "b"), devices=jax.devices()[:1])
    # the loop samples at data.frame_stride: 8 frames at stride 10 span 71, more than any episode has
    with pytest.raises(videos.NoVideoDataError, match=r"at least 71 frames.*data.frame_stride"):
        pretrain_loop.run(
            tiny_config(squares, **{"data.frame_stride": 10}), str(tmp_path / "s"), devices=jax.devices()[:1]
        )
    with pytest.raises(config_lib.ConfigError, match="data.root"):
        pretrain_loop.run(tiny_config(""), str(tmp_path / "c"))
    with pytest.raises(config_lib.ConfigError, match="steps"):
        pretrain_loop.run(tiny_config(squares, steps=0), str(tmp_path / "d"))
    with pytest.raises(config_lib.ConfigError, match="unknown config key"):
        tiny_config(squares, **{"model.nonsense": 1})


@pytest.mark.parametrize(
    "flag, message",
    [
        ("--config.model.nope=3", "unknown config key --config.model.nope"),
        ("--config.data.root={missing}", "No usable episodes"),
    ],
)
@pytest.mark.slow
def test_cli_reports_bad_input_in_one_line(tmp_path, flag, message):
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    flag = flag.format(missing=tmp_path / "missing")
    proc = subprocess.run(
        [
            sys.executable,
            os.path.join(root, "experiments", "pretrain.py"),
            "--config=configs/prelar_pretrain.py:tiny",
            flag,
            f"--workdir={tmp_path / 'run'}",
        ],
        cwd=root,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("error: ") and message in proc.stderr


@pytest.mark.slow
def test_sigterm_saves_a_checkpoint_and_a_rerun_finishes(squares, tmp_path):
    import signal
    import subprocess
    import sys
    import time

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    workdir = tmp_path / "run"
    command = [
        sys.executable,
        os.path.join(root, "experiments", "pretrain.py"),
        "--config=configs/prelar_pretrain.py:tiny",
        f"--config.data.root={squares}",
        "--config.steps=100000",
        "--config.log.every=1",
        "--config.log.checkpoint_every=100000",
        "--config.log.media_every=100000",
        "--config.log.wandb_mode=disabled",
        f"--workdir={workdir}",
    ]
    proc = subprocess.Popen(command, cwd=root, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + 180
        while time.time() < deadline:  # wait until training is under way
            path = workdir / "metrics.jsonl"
            if path.exists() and sum(1 for line in open(path) if '"loss"' in line) >= 3:
                break
            assert proc.poll() is None, proc.stdout.read()[-3000:]
            time.sleep(0.5)
        proc.send_signal(signal.SIGTERM)
        output, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, output[-3000:]
    assert "saving a checkpoint and stopping" in output
    with checkpoint.Checkpointer(workdir / "checkpoints") as ckpt:
        stopped_at = ckpt.latest_step()
    assert stopped_at is not None and 3 <= stopped_at < 100000
    logged = [r["step"] for r in read_metrics(str(workdir)) if "loss" in r]
    assert max(logged) == stopped_at  # the checkpointed step's metrics were written before exit

    # The same command, asked for a few more steps, resumes at the checkpoint and finishes.
    config = tiny_config(
        squares, steps=stopped_at + 2, **{"log.every": 1, "log.checkpoint_every": 100000, "log.media_every": 100000}
    )
    summary = pretrain_loop.run(config, str(workdir), allow_config_override=False, devices=jax.devices()[:1])
    assert summary["finished"] and summary["step"] == stopped_at + 2
    steps = [r["step"] for r in read_metrics(str(workdir)) if "loss" in r]
    assert steps == list(range(1, stopped_at + 3))
