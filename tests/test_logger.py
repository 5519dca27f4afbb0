"""MetricsLogger, config checks and prediction-grid media."""

import io
import json
import os
import sys
import types
import warnings

import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from prelar_jax.runtime.logger import (
    ConfigMismatchError,
    MetricsLogger,
    check_config_matches,
    config_differences,
    write_config,
)
from prelar_jax.runtime.media import prediction_grid, save_gif, save_png


def read_jsonl(path):
    def reject(constant):  # Bare NaN/Infinity tokens are not valid JSON.
        raise AssertionError(f"invalid JSON constant {constant}")

    with open(path, encoding="utf-8") as handle:
        return [json.loads(line, parse_constant=reject) for line in handle]


def make_logger(workdir, **kwargs):
    kwargs.setdefault("wandb_mode", "disabled")
    kwargs.setdefault("stream", io.StringIO())
    return MetricsLogger(workdir, **kwargs)


def test_jsonl_has_step_and_plain_values(tmp_path):
    with make_logger(tmp_path, total_steps=10) as logger:
        logger.log(1, {"loss": jnp.float32(0.25), "kl": np.float64(1.5), "count": np.int32(3), "ok": np.bool_(True)})
        logger.log(2, {"loss": float("nan"), "grad": float("inf"), "neg": -float("inf"), "step_time": 0.5})
    records = read_jsonl(tmp_path / "metrics.jsonl")
    assert records == [
        {"step": 1, "loss": 0.25, "kl": 1.5, "count": 3, "ok": True},
        {"step": 2, "loss": "nan", "grad": "inf", "neg": "-inf", "step_time": 0.5},
    ]
    assert type(records[0]["count"]) is int and type(records[0]["loss"]) is float


def test_non_scalar_metric_is_rejected(tmp_path):
    with make_logger(tmp_path, total_steps=10) as logger:
        with pytest.raises(TypeError, match="'image' must be a scalar"):
            logger.log(1, {"image": np.zeros((2, 2))})


def test_resume_removes_lines_logged_after_the_checkpoint(tmp_path):
    with make_logger(tmp_path, total_steps=20) as logger:
        for step in range(1, 11):
            logger.log(step, {"loss": float(step)})
    with open(tmp_path / "metrics.jsonl", "a", encoding="utf-8") as handle:
        handle.write('{"step": 11, "lo')  # Cut short by the crash.

    with make_logger(tmp_path, total_steps=20, start_step=6) as logger:
        logger.log(7, {"loss": 70.0})
    records = read_jsonl(tmp_path / "metrics.jsonl")
    assert [record["step"] for record in records] == [1, 2, 3, 4, 5, 6, 7]
    assert records[-1]["loss"] == 70.0


def test_console_lines_when_not_a_terminal(tmp_path):
    stream = io.StringIO()
    with make_logger(tmp_path, total_steps=12, console_every=5, console_keys=["loss"], stream=stream) as logger:
        for step in range(1, 13):
            logger.log(step, {"loss": 1.0 / step, "hidden": 3.0})
    lines = stream.getvalue().splitlines()
    assert [line.split(" | ")[0] for line in lines] == [
        "step 5/12 (41.7%)",
        "step 10/12 (83.3%)",
        "step 12/12 (100.0%)",
    ]
    assert "loss 0.2 |" in lines[0] and "hidden" not in lines[0]
    assert "steps/s" in lines[0] and "ETA" in lines[0]


def test_progress_bar_on_a_terminal(tmp_path):
    class Terminal(io.StringIO):
        def isatty(self):
            return True

    stream = Terminal()
    with make_logger(tmp_path, total_steps=4, stream=stream) as logger:
        for step in range(1, 5):
            logger.log(step, {"loss": 0.5})
    output = stream.getvalue()
    assert "4/4" in output and "loss=0.5" in output
    assert "step 4/4 (" not in output  # No plain lines when the bar is shown.


def test_wandb_disabled_imports_and_creates_nothing(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # Any `import wandb` would now raise.
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with make_logger(tmp_path, total_steps=3, wandb_mode="disabled") as logger:
            logger.log(1, {"loss": 1.0})
            image = tmp_path / "grid.png"
            save_png(image, np.zeros((2, 2, 3), np.uint8))
            logger.log_media(1, "grid", image)
    assert sorted(os.listdir(tmp_path)) == ["grid.png", "metrics.jsonl"]


def fake_wandb(fail_init=False):
    """A stand-in wandb module recording what the logger sends."""
    module = types.ModuleType("wandb")
    module.inits, module.logged, module.finished = [], [], []

    class Run:
        def log(self, data, step=None):
            module.logged.append((step, data))

        def finish(self):
            module.finished.append(True)

    def init(**kwargs):
        if fail_init:
            raise RuntimeError("no network")
        module.inits.append(kwargs)
        return Run()

    module.init = init
    module.Image = lambda path: ("image", path)
    module.Video = lambda path, format=None, caption=None: ("video", path, format, caption)
    return module


def test_wandb_run_id_is_stable_across_resumes(tmp_path, monkeypatch):
    wandb = fake_wandb()
    monkeypatch.setitem(sys.modules, "wandb", wandb)
    config = {"lr": 1e-3}
    with make_logger(tmp_path, total_steps=5, wandb_mode="offline", run_name="run", config=config) as logger:
        logger.log(1, {"loss": np.float32(2.0)})
        logger.log_media(1, "open_loop", tmp_path / "grid.png")
        logger.log_video(1, "eval/video", tmp_path / "eval.gif", caption="step 1")
    with make_logger(tmp_path, total_steps=5, start_step=1, wandb_mode="offline") as logger:
        logger.log(2, {"loss": 1.0})

    first, second = wandb.inits
    assert first["id"] == second["id"] and first["id"]
    assert first["resume"] == "allow" and first["mode"] == "offline"
    assert first["dir"] == os.fspath(tmp_path) and first["config"] == config and first["project"] == "prelar-jax"
    assert wandb.logged == [
        (1, {"loss": 2.0}),
        (1, {"open_loop": ("image", os.fspath(tmp_path / "grid.png"))}),
        (1, {"eval/video": ("video", os.fspath(tmp_path / "eval.gif"), "gif", "step 1")}),
        (2, {"loss": 1.0}),
    ]
    assert len(wandb.finished) == 2


def test_wandb_failure_warns_once_and_keeps_logging(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", fake_wandb(fail_init=True))
    with pytest.warns(RuntimeWarning, match="wandb could not start") as record:
        with make_logger(tmp_path, total_steps=5, wandb_mode="online") as logger:
            logger.log(1, {"loss": 1.0})
            logger.log(2, {"loss": 2.0})
    assert len([warning for warning in record if "wandb" in str(warning.message)]) == 1
    assert [entry["step"] for entry in read_jsonl(tmp_path / "metrics.jsonl")] == [1, 2]


CONFIG = {
    "steps": 1000,
    "model": {"deter": 200, "stoch": [32, 32], "kind": "resnet"},
    "wandb": {"project": "a", "mode": "offline"},
    "lr": 3e-4,
}


def test_write_config_writes_json_and_yaml(tmp_path):
    import yaml

    config = dict(CONFIG, model=dict(CONFIG["model"], stoch=(32, 32)))  # A tuple is stored as a list.
    write_config(tmp_path, config)
    assert json.loads((tmp_path / "config.json").read_text()) == CONFIG
    assert yaml.safe_load((tmp_path / "config.yaml").read_text()) == CONFIG
    assert check_config_matches(tmp_path, config, allow_override=False) == []


def test_config_mismatch_lists_the_keys_that_matter(tmp_path):
    write_config(tmp_path, CONFIG)
    changed = {
        "steps": 5000,
        "model": {"deter": 512, "stoch": [32, 32], "kind": "resnet"},
        "wandb": {"project": "b"},
        "lr": 3e-4,
        "new_flag": True,
    }
    ignore = ["steps", "wandb"]
    with pytest.raises(ConfigMismatchError) as info:
        check_config_matches(tmp_path, changed, allow_override=False, ignore=ignore)
    message = str(info.value)
    assert isinstance(info.value, ValueError)
    assert "model.deter: 200 (saved) -> 512 (now)" in message
    assert "new_flag: '<missing>' (saved) -> True (now)" in message
    assert "steps" not in message.split("differ:")[1].split("Pass")[0] and "wandb.project" not in message
    assert "--workdir" in message and "--allow_config_override" in message

    with pytest.warns(RuntimeWarning, match="model.deter"):
        changed_keys = check_config_matches(tmp_path, changed, allow_override=True, ignore=ignore)
        assert changed_keys == ["model.deter", "new_flag"]
    assert config_differences(CONFIG, changed, ignore=["*.deter", "new_flag", "steps", "wandb"]) == {}
    assert check_config_matches(tmp_path / "fresh", changed, allow_override=False) == []


def test_a_key_added_since_the_run_was_saved_matches_at_its_old_value(tmp_path):
    """A run saved before the code gained a key ran with the key's old value: it resumes when the
    new config has that value, and is refused when the new config sets another."""
    write_config(tmp_path, CONFIG)
    added = {"env.repeat": 1, "other.key": "x"}  # other.key: in neither config, so not compared
    now = dict(CONFIG, env={"repeat": 1})
    assert check_config_matches(tmp_path, now, allow_override=False, added=added) == []
    with pytest.raises(ConfigMismatchError, match="env.repeat: '<missing>' .saved. -> 1 .now."):
        check_config_matches(tmp_path, now, allow_override=False)  # not declared added
    with pytest.raises(ConfigMismatchError, match=r"env.repeat: 1 \(saved\) -> 2 \(now\)"):
        check_config_matches(tmp_path, dict(CONFIG, env={"repeat": 2}), allow_override=False, added=added)
    # A saved value wins over the declared one.
    assert config_differences(dict(CONFIG, env={"repeat": 3}), now, added=added) == {"env.repeat": (3, 1)}
    # The real table: a fine-tuning config saved before env.action_repeat existed resumes.
    from prelar_jax.runtime import config as config_lib

    finetune = config_lib.load_config("configs/prelar_finetune.py:tiny").to_dict()
    old = json.loads(json.dumps(finetune))
    del old["env"]["action_repeat"]
    assert config_differences(old, finetune, added=config_lib.ADDED_KEYS) == {}
    assert config_differences(old, finetune) != {}
    pretrain = config_lib.load_config("configs/prelar_pretrain.py:tiny").to_dict()
    assert config_differences(pretrain, pretrain, added=config_lib.ADDED_KEYS) == {}


def test_prediction_grid_layout_and_error_row(tmp_path):
    rng = np.random.default_rng(0)
    n, t, h, w = 2, 3, 4, 5
    truth = rng.integers(0, 256, size=(n, t, h, w, 3), dtype=np.uint8)
    model = truth.copy()
    model[1, 2, 0, 0] = truth[1, 2, 0, 0] ^ 0x10  # Differs by exactly 16 in each channel.
    grid = prediction_grid(truth, model, gain=4.0, separator=1, group_separator=3)

    assert grid.dtype == np.uint8
    assert grid.shape == (3 * n * h + 2 * n * 1 + (n - 1) * 3, t * w + (t - 1) * 1, 3)

    def frame(sequence, row, index):
        top = sequence * (3 * h + 2 + 3) + row * (h + 1)
        left = index * (w + 1)
        return grid[top : top + h, left : left + w]

    for sequence in range(n):
        for index in range(t):
            np.testing.assert_array_equal(frame(sequence, 0, index), truth[sequence, index])
            np.testing.assert_array_equal(frame(sequence, 1, index), model[sequence, index])
    expected_error = np.zeros((n, t, h, w, 3), np.uint8)
    expected_error[1, 2, 0, 0] = 64  # 4 * |16|
    for sequence in range(n):
        for index in range(t):
            np.testing.assert_array_equal(frame(sequence, 2, index), expected_error[sequence, index])
    assert (grid[h, :] == 255).all()  # The separator line below the first truth row.

    with pytest.raises(ValueError, match="uint8"):
        prediction_grid(truth.astype(np.float32), model)


def test_save_png_and_gif_round_trip(tmp_path):
    image = np.arange(4 * 6 * 3, dtype=np.uint8).reshape(4, 6, 3)
    save_png(tmp_path / "media" / "deep" / "grid.png", image)
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "media" / "deep" / "grid.png")), image)

    frames = np.stack([np.full((4, 6, 3), value, np.uint8) for value in (0, 128, 255)])
    save_gif(tmp_path / "media" / "video.gif", frames, fps=5)
    with Image.open(tmp_path / "media" / "video.gif") as gif:
        assert gif.n_frames == 3
