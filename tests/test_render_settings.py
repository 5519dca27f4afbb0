"""Rendering settings (prelar_jax.envs.rendering): specs, the config block, and that they reach MuJoCo.

`paper` frames cost ~1/16 s each in software OpenGL (more on a loaded machine), so the env tests render
only a few frames; the worker test spawns one process.
"""

from __future__ import annotations

import functools
import pickle

import ml_collections
import mujoco
import numpy as np
import pytest

from prelar_jax.runtime import config as config_lib
from prelar_jax.envs.metaworld import MetaWorldTask
from prelar_jax.envs.rendering import (
    LEAN,
    PAPER,
    SETTING_NAMES,
    RenderSettings,
    RenderSettingsError,
    parse_render_settings,
    resolve_render_settings,
)
from prelar_jax.envs.workers import ParallelEnvs, make_metaworld_env

FINETUNE = "configs/prelar_finetune.py"


# ------------------------------------------------------------------------------------------ specs


@pytest.mark.parametrize(
    "spec, on",
    [
        ("paper", set(SETTING_NAMES)),
        ("lean", set()),
        ("lean+shadows", {"shadows"}),
        ("lean+shadows+multisampling", {"shadows", "multisampling"}),
        ("paper-multisampling", set(SETTING_NAMES) - {"multisampling"}),
        (" Paper - full_buffer ", set(SETTING_NAMES) - {"full_buffer"}),
        ("lean+shadows-shadows", set()),  # applied left to right
    ],
)
def test_spec_sets_exactly_the_named_settings(spec: str, on: set[str]) -> None:
    settings = parse_render_settings(spec)
    assert {name for name in SETTING_NAMES if getattr(settings, name)} == on
    assert parse_render_settings(settings.describe()) == settings  # describe() round-trips


@pytest.mark.parametrize(
    "spec, needle",
    [
        ("fancy", "unknown rendering preset 'fancy'"),
        ("lean+shadow", "unknown rendering setting 'shadow'"),
        ("lean+", "unknown rendering setting ''"),
    ],
)
def test_bad_specs_name_the_problem_and_the_valid_settings(spec: str, needle: str) -> None:
    with pytest.raises(RenderSettingsError, match=needle) as info:
        parse_render_settings(spec)
    assert all(name in str(info.value) for name in SETTING_NAMES)


def test_presets_and_the_older_lean_rendering_switch() -> None:
    assert all(getattr(PAPER, n) for n in SETTING_NAMES) and not any(getattr(LEAN, n) for n in SETTING_NAMES)
    assert resolve_render_settings(None, True, default=PAPER) == LEAN
    assert resolve_render_settings(None, False, default=LEAN) == PAPER
    assert resolve_render_settings(None, None, default=PAPER) == PAPER
    assert resolve_render_settings({**LEAN.to_dict(), "shadows": True}, None, LEAN) == RenderSettings(
        shadows=True, reflections=False, multisampling=False, full_buffer=False
    )
    with pytest.raises(RenderSettingsError, match="not both"):
        resolve_render_settings(PAPER, True, default=LEAN)
    with pytest.raises(RenderSettingsError, match="'shadows' must be True or False"):
        RenderSettings(shadows=1)  # type: ignore[arg-type]
    assert pickle.loads(pickle.dumps(PAPER)) == PAPER  # travels to spawned workers


# ------------------------------------------------------------------------------------------ config


def test_config_presets_paper_look_by_default_lean_for_cpu_presets() -> None:
    for preset, expected in (("paper", PAPER), ("small", LEAN), ("tiny", LEAN)):
        config = config_lib.load_config(f"{FINETUNE}:{preset}")
        assert RenderSettings.from_mapping(dict(config.env.render)) == expected, preset
        assert "lean_rendering" not in config.env
    for spec in ("configs/dreamerv2.py:paper", "configs/apv_finetune.py:paper"):  # built on prelar_finetune
        assert RenderSettings.from_mapping(dict(config_lib.load_config(spec).env.render)) == PAPER, spec
    config_lib.validate_finetune_config(config_lib.load_config(f"{FINETUNE}:tiny", {"env.render.shadows": True}))


def _tiny_with(**render) -> ml_collections.ConfigDict:
    """The tiny config with env.render replaced by `render` (removed when empty)."""
    config = config_lib.load_config(f"{FINETUNE}:tiny")
    with config.unlocked():
        del config.env["render"]
        if render:
            config.env.render = dict(render)
    return config


@pytest.mark.parametrize(
    "render, needle",
    [
        ({**LEAN.to_dict(), "shadows": "yes"}, r"config.env.render: settings must be True or False, got shadows='yes'"),
        ({**LEAN.to_dict(), "fog": False}, r"config.env.render: needs exactly the keys .*; unknown fog"),
        ({"shadows": False}, r"config.env.render: needs exactly the keys .*; missing reflections, multisampling"),
        ({}, r"config.env.render: must be a block with the boolean keys shadows, reflections"),
    ],
)
def test_bad_render_block_gives_one_config_error(render: dict, needle: str) -> None:
    with pytest.raises(config_lib.ConfigError, match=needle):
        config_lib.validate_finetune_config(_tiny_with(**render))


def test_old_lean_rendering_key_is_named_in_the_error() -> None:
    config = config_lib.load_config(f"{FINETUNE}:tiny")
    with config.unlocked():
        del config.env["render"]
        config.env.lean_rendering = True
    with pytest.raises(config_lib.ConfigError, match="env.lean_rendering was replaced by it"):
        config_lib.validate_finetune_config(config)


# ------------------------------------------------------------------------------------------ MuJoCo


def _frames(env: MetaWorldTask, actions: np.ndarray) -> np.ndarray:
    return np.stack([env.reset()["image"]] + [env.step(a)["image"] for a in actions]).astype(np.int16)  # [N, S, S, 3]


def test_settings_reach_the_model_and_scene_and_paper_differs_from_lean_by_shadows_and_msaa() -> None:
    actions = np.random.default_rng(0).uniform(-1, 1, size=(2, 4)).astype(np.float32)  # [2, 4]
    frames, seen = {}, {}
    for spec in ("paper", "lean", "lean+shadows+multisampling"):
        with MetaWorldTask("drawer-open", seed=3, size=64, render=spec) as env:
            model, flags = env.env.model, env._renderer.scene.flags
            seen[spec] = (
                model.vis.quality.offsamples,
                model.vis.quality.shadowsize,
                model.vis.global_.offwidth,
                model.vis.global_.offheight,
                flags[mujoco.mjtRndFlag.mjRND_SHADOW],
                flags[mujoco.mjtRndFlag.mjRND_REFLECTION],
            )
            frames[spec] = _frames(env, actions)
    # The Meta-World model's own values stay for paper (MuJoCo's defaults: 4x MSAA, 4096^2 shadow map,
    # 640x480 buffer); lean turns each off.
    from metaworld.env_dict import ALL_V3_ENVIRONMENTS

    raw = ALL_V3_ENVIRONMENTS["drawer-open-v3"]()
    vis = raw.model.vis
    paper_expected = (vis.quality.offsamples, vis.quality.shadowsize, vis.global_.offwidth, vis.global_.offheight, 1, 1)
    raw.close()
    assert seen["paper"] == paper_expected and paper_expected[:2] == (4, 4096)
    assert seen["lean"] == (0, 0, 64, 64, 0, 0)
    assert seen["lean+shadows+multisampling"] == (4, 4096, 64, 64, 1, 0)

    # Same seed and actions: identical physics, so only rendering differs.
    lean_diff = np.abs(frames["lean"] - frames["paper"]).mean()
    rest_diff = np.abs(frames["lean+shadows+multisampling"] - frames["paper"]).mean()
    assert 0 < lean_diff < 10  # small on a 0-255 scale, but not zero
    # Shadows and anti-aliasing make (nearly) all of it; reflections and the buffer size almost nothing.
    assert rest_diff < 0.15 * lean_diff
    # The drop shadows darken the frame on balance (anti-aliasing only blends edges both ways).
    assert (frames["lean+shadows+multisampling"] - frames["lean"]).mean() < 0


def test_older_lean_rendering_argument_still_maps_to_the_presets() -> None:
    with MetaWorldTask("reach", seed=0, size=16, lean_rendering=False) as env:
        assert env.render_settings == PAPER
    with pytest.raises(RenderSettingsError, match="not both"):
        MetaWorldTask("reach", seed=0, size=16, render="lean", lean_rendering=True)


@pytest.mark.slow
def test_worker_factory_passes_the_settings_to_the_worker_env() -> None:
    # The worker (a spawned process) renders with paper settings: its frames equal an in-process
    # paper env's frames for the same seed, and differ from a lean env's.
    make_env = functools.partial(make_metaworld_env, task="drawer-open", size=32, time_limit=5, render=PAPER)
    with ParallelEnvs(make_env, seeds=[7], step_timeout=120) as envs:
        worker_image = envs.reset()["image"][0]  # [32, 32, 3]
    expected = {}
    for render in (PAPER, LEAN):
        env = make_metaworld_env(7, task="drawer-open", size=32, time_limit=5, render=render)
        try:
            expected[render] = env.reset()["image"]
            assert env.render_settings == render
        finally:
            env.close()
    np.testing.assert_array_equal(worker_image, expected[PAPER])
    assert not np.array_equal(worker_image, expected[LEAN])
