"""Loading and validating ml_collections configs outside of absl flags (tests, scripts).

The command-line entry points use ``ml_collections.config_flags`` (``--config=FILE:PRESET`` and
``--config.a.b=value`` overrides); this module gives the same result from Python and checks the
values every trainer relies on, so bad input fails at start-up with one clear message.
"""

from __future__ import annotations

import importlib.util
import os
from typing import Any, Mapping

import ml_collections

from prelar_jax.learners import consistency
from prelar_jax.model.nets.implicit_action import CODE_TYPES, INPUTS
from prelar_jax.errors import UserError

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


class ConfigError(UserError, ValueError):
    """A config value that cannot work; the message names the key and what to do."""


MODEL_PRESETS = ("paper", "small", "cpu", "tiny")
COMPUTE_DTYPES = ("float32", "bfloat16")  # model.compute_dtype; float16 is refused (no loss scaling)


def model_config(preset: str) -> ml_collections.ConfigDict:
    """The world model's sizes for a preset: one definition shared by the pre-training and the
    fine-tuning configs, so a fine-tuning preset loads the pre-training preset of the same name.
    """
    if preset not in MODEL_PRESETS:
        raise ConfigError(f"unknown preset {preset!r}; choose one of {MODEL_PRESETS}")
    m = ml_collections.ConfigDict()
    m.encoder = "resnet"  # 'resnet' (PreLAR, APV repo) or 'plain' (DreamerV2 CNN)
    m.depth = 48
    m.stages = 3
    m.deter = 1024
    m.hidden = 1024
    m.stoch = 32
    m.classes = 32
    m.compute_dtype = "float32"  # 'bfloat16' for mixed precision; parameters stay float32
    # Recompute ResNet activations in the backward pass (same results, less memory, more compute).
    m.remat = False
    if preset == "small":
        m.depth = 16
        m.deter = m.hidden = 256
        m.stoch = m.classes = 16
    elif preset == "cpu":  # sizes that learn on a 2-core CPU (README "Learning")
        # The plain DreamerV2 CNN for every method: at CPU step counts the ResNet decoder stays far
        # above the mean-frame error (experiments/BENCHMARKS.md, "Decoder learning speed").
        m.encoder = "plain"
        m.depth = 16
        m.deter = m.hidden = 200
        m.stoch = m.classes = 16
    elif preset == "tiny":
        m.depth = 4
        m.stages = 2
        m.deter = m.hidden = 32
        m.stoch = m.classes = 4
    return m


def action_sizes(preset: str) -> tuple[int, int]:
    """``(code, hidden)``: the width of the action code the RSSM is conditioned on (the implicit
    action in pre-training, the real-action encoder's output in fine-tuning) and the hidden width
    of the networks that produce it."""
    model_config(preset)  # validates the name
    return {"paper": (64, 1024), "small": (16, 256), "cpu": (16, 256), "tiny": (8, 32)}[preset]


def config_module(path: str, relative_to: str | None = None):
    """Executes a Python file (a config file, or an experiments script) and returns it as a
    module. Relative paths are tried next to ``relative_to`` (a file, e.g. a config's own
    ``__file__``) when given, else from the working directory, then from the repository root.
    Config files are Python and run as code: load only files you trust."""
    if relative_to is not None and not os.path.isabs(path):
        path = os.path.join(os.path.dirname(os.path.abspath(relative_to)), path)
    elif not os.path.exists(path) and os.path.exists(os.path.join(REPO_ROOT, path)):
        path = os.path.join(REPO_ROOT, path)
    if not os.path.exists(path):
        raise ConfigError(f"config file {path!r} not found (expected e.g. configs/prelar_pretrain.py:tiny)")
    module_spec = importlib.util.spec_from_file_location(f"_config_{abs(hash(os.path.abspath(path)))}", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module


def load_config(spec: str, overrides: Mapping[str, Any] | None = None) -> ml_collections.ConfigDict:
    """``load_config('configs/prelar_pretrain.py:tiny', {'steps': 10, 'data.root': 'x'})``.

    Relative paths are tried from the working directory, then from the repository root.
    Overrides use dotted keys; unknown keys are errors, as with ``--config.x`` flags.
    """
    path, _, preset = spec.partition(":")
    module = config_module(path)
    presets = getattr(module, "PRESETS", None)
    if preset and presets is not None and preset not in presets:
        raise ConfigError(
            f"unknown preset {preset!r} in --config={spec}; choose one of {tuple(presets)} "
            f"(e.g. --config={path}:{presets[-1]})"
        )
    config = module.get_config(preset) if preset else module.get_config()
    for key, value in (overrides or {}).items():
        set_path(config, key, value)
    config.lock()
    return config


def _parent(config: ml_collections.ConfigDict, dotted: str, label: str, source: str) -> ml_collections.ConfigDict:
    """The node holding the last part of ``dotted``; a ConfigError naming the valid keys if any
    part of the path does not exist."""
    parts = dotted.split(".")
    node = config
    for depth, name in enumerate(parts):
        if not isinstance(node, ml_collections.ConfigDict) or name not in node:
            where = ".".join(parts[:depth]) or "the top level"
            valid = sorted(node.keys()) if isinstance(node, ml_collections.ConfigDict) else []
            raise ConfigError(
                f"unknown config key {label}: {name!r} does not exist at {where} of {source}; valid keys there: {valid}"
            )
        if depth < len(parts) - 1:
            node = node[name]
    return node


def check_override_flags(argv: list[str], default_spec: str, flag: str = "config") -> None:
    """Fail early, with one clear ``ConfigError``, on a ``--config=FILE:PRESET`` whose file or
    preset does not exist and on ``--config.some.key=...`` flags whose key does not exist
    (ml_collections would raise a long traceback while parsing flags for each of them)."""
    spec = default_spec
    keys = []
    for arg in argv[1:]:
        if arg.startswith(f"--{flag}="):
            spec = arg.split("=", 1)[1]
        elif arg.startswith(f"--{flag}."):
            keys.append(arg[len(flag) + 3 :].split("=", 1)[0])
    config = load_config(spec)  # the file and the preset, even without overrides
    for dotted in keys:
        _parent(config, dotted, f"--{flag}.{dotted}", spec)


def set_path(config: ml_collections.ConfigDict, dotted: str, value: Any) -> None:
    _parent(config, dotted, repr(dotted), "the config")[dotted.split(".")[-1]] = value


def _check(condition: bool, key: str, message: str) -> None:
    if not condition:
        raise ConfigError(f"config.{key}: {message}")


def validate_pretrain_config(c: ml_collections.ConfigDict) -> None:
    """Checks every value the pre-training run depends on; raises ``ConfigError``."""
    _positive_ints(
        c,
        (
            "steps",
            "batch_size",
            "log.every",
            "log.checkpoint_every",
            "log.media_every",
            "log.keep_checkpoints",
            "nonfinite_limit",
            "log.media_examples",
            "data.prefetch_threads",
            "data.prefetch_buffer",
            *(("data.frame_stride",) if "frame_stride" in c.data else ()),  # absent from older saved configs
        ),
    )
    _check(
        isinstance(c.sequence_length, int) and c.sequence_length >= 2,
        "sequence_length",
        f"must be at least 2 (implicit actions need frame pairs), got {c.sequence_length}",
    )
    _validate_model(c)
    implicit_cfg = c.implicit_action
    _check(
        implicit_cfg.code_type in CODE_TYPES,
        "implicit_action.code_type",
        f"{implicit_cfg.code_type!r} is not one of {CODE_TYPES}",
    )
    _check(implicit_cfg.input in INPUTS, "implicit_action.input", f"{implicit_cfg.input!r} is not one of {INPUTS}")
    _check(implicit_cfg.prior_std > 0, "implicit_action.prior_std", "must be positive")
    _check(
        implicit_cfg.get("head_init_scale", 1.0) >= 0,
        "implicit_action.head_init_scale",
        f"must be >= 0, got {implicit_cfg.get('head_init_scale', 1.0)}",
    )
    for key in ("stoch", "deter", "hidden", "action_dim", "embed_layers"):
        _check(implicit_cfg[key] > 0, f"implicit_action.{key}", f"must be positive, got {implicit_cfg[key]}")
    _check(
        c.loss.consistency in consistency.VARIANTS,
        "loss.consistency",
        f"{c.loss.consistency!r} is not one of {consistency.VARIANTS}",
    )
    _check(c.loss.consistency_temperature > 0, "loss.consistency_temperature", "must be positive")
    _check(c.loss.implicit_kl_free >= 0, "loss.implicit_kl_free", f"must be >= 0, got {c.loss.implicit_kl_free}")
    _check(
        c.loss.get("code_forward_scale", 0.0) >= 0,
        "loss.code_forward_scale",
        f"must be >= 0 (0 = off), got {c.loss.get('code_forward_scale')}",
    )
    _check(
        c.loss.get("code_forward_space", "pixels") in ("pixels", "embed"),
        "loss.code_forward_space",
        f"{c.loss.get('code_forward_space')!r} is not 'pixels' or 'embed'",
    )
    _check(c.data.kind in ("npz", "something"), "data.kind", f"{c.data.kind!r} is not 'npz' or 'something'")
    _check(
        bool(c.data.root),
        "data.root",
        "no video directory given. Generate videos with `python experiments/generate_videos.py "
        "--out DIR` (or point to RLBench episodes / SSv2 frames) and pass --config.data.root=DIR",
    )
    if c.data.kind == "something":
        _check(
            bool(c.data.video_list),
            "data.video_list",
            "Something-Something-V2 needs the list file (train_video_folder.txt)",
        )
    _check(
        1 <= c.log.media_context < c.sequence_length,
        "log.media_context",
        f"must be in [1, sequence_length) = [1, {c.sequence_length})",
    )


def config_from_json(path: str) -> ml_collections.ConfigDict:
    """A run's resolved ``config.json`` (written by ``logger.write_config``) as a ConfigDict."""
    import json

    with open(path, encoding="utf-8") as handle:
        return ml_collections.ConfigDict(json.load(handle))


# Keys the configs gained after runs were saved, with the value a run saved without one ran
# with: such a run resumes under the new code (its config.json then gains the key).
ADDED_KEYS = {"env.action_repeat": 1}


def episode_frames(c: ml_collections.ConfigDict) -> int:
    """Frames in one fine-tuning episode, the reset frame included: one per action, each action
    ``env.action_repeat`` control steps, ``env.time_limit`` control steps in all."""
    return c.env.time_limit // c.env.get("action_repeat", 1) + 1


def frame_stride(c: ml_collections.ConfigDict) -> int:
    """A pre-training config's ``data.frame_stride`` (every k-th video frame); 1 for configs saved
    before the key existed."""
    return int(c.get("data", {}).get("frame_stride", 1))


def _positive_ints(c: ml_collections.ConfigDict, keys: tuple[str, ...]) -> None:
    for key in keys:
        value = c
        for part in key.split("."):
            value = value[part]
        _check(
            isinstance(value, int) and not isinstance(value, bool) and value > 0,
            key,
            f"must be a positive integer, got {value!r}",
        )


def _validate_model(c: ml_collections.ConfigDict) -> None:
    _positive_ints(
        c, ("image_size", "model.depth", "model.stages", "model.deter", "model.hidden", "model.stoch", "model.classes")
    )
    _check(
        c.model.encoder in ("resnet", "plain"), "model.encoder", f"{c.model.encoder!r} is not one of 'resnet', 'plain'"
    )
    if c.model.encoder == "plain":
        _check(c.image_size == 64, "image_size", "the plain CNN decoder only produces 64x64 images")
    else:
        factor = 2 ** (c.model.stages + 1)
        _check(
            c.image_size % factor == 0,
            "image_size",
            f"{c.image_size} must be divisible by 2**(model.stages+1) = {factor}",
        )
    # float16 is refused: its 5-bit exponent underflows small gradients to zero unless the loss is
    # scaled, and nothing here scales it. bfloat16 keeps float32's exponent range and needs no scaling.
    _check(
        c.model.compute_dtype in COMPUTE_DTYPES,
        "model.compute_dtype",
        f"{c.model.compute_dtype!r} is not supported; use 'float32' or 'bfloat16' (mixed precision). "
        "float16 would need loss scaling, which is not implemented; bfloat16 has float32's exponent "
        "range and needs none",
    )
    _check(0.0 <= c.loss.kl_balance <= 1.0, "loss.kl_balance", "must be in [0, 1]")
    _check(
        c.optimizer.lr >= 0 and c.optimizer.eps > 0 and c.optimizer.clip > 0,
        "optimizer",
        "lr must be >= 0, eps and clip > 0",
    )
    _check(
        c.log.wandb_mode in ("online", "offline", "disabled"),
        "log.wandb_mode",
        f"{c.log.wandb_mode!r} is not one of online, offline, disabled",
    )


def _check_render(c: ml_collections.ConfigDict) -> None:
    """``env.render`` must be a ``{setting: bool}`` block naming every ``RenderSettings`` field."""
    from prelar_jax.envs.rendering import SETTING_NAMES, RenderSettings, RenderSettingsError

    render = c.env.get("render")
    _check(
        render is not None and hasattr(render, "keys"),
        "env.render",
        f"must be a block with the boolean keys {', '.join(SETTING_NAMES)} (e.g. "
        "--config.env.render.shadows=False); got "
        + repr(render)
        + (". env.lean_rendering was replaced by it" if "lean_rendering" in c.env else ""),
    )
    try:
        RenderSettings.from_mapping(dict(render), where="config.env.render")
    except RenderSettingsError as error:
        raise ConfigError(str(error)) from error


def validate_finetune_config(c: ml_collections.ConfigDict) -> None:
    """Checks every value the fine-tuning run depends on; raises ``ConfigError``."""
    from prelar_jax.envs.metaworld import UnknownTaskError, canonical_task_name

    _positive_ints(
        c,
        (
            "steps",
            "batch_size",
            "sequence_length",
            "train_every",
            "train_steps",
            "eval_every",
            "eval_eps",
            "env.num_envs",
            "env.eval_envs",
            "env.time_limit",
            "replay.capacity",
            "action_dim",
            "heads.layers",
            "heads.units",
            "log.every",
            "log.media_every",
            "log.checkpoint_every",
            "log.keep_checkpoints",
            "actor_critic.horizon",
            "actor_critic.slow_update_every",
            "nonfinite_limit",
            "log.media_examples",
        ),
    )
    _validate_model(c)
    _check(
        c.env.step_timeout > 0,
        "env.step_timeout",
        f"must be positive (seconds before a silent worker is restarted), got {c.env.step_timeout}",
    )
    _check_render(c)
    try:
        canonical_task_name(c.task)
    except UnknownTaskError as error:
        raise ConfigError(f"config.task: {error}") from error
    _check(c.prefill >= 0 and c.pretrain >= 0, "prefill", "prefill and pretrain must be >= 0")
    _check(c.env.time_limit <= 500, "env.time_limit", "Meta-World episodes end after at most 500 steps")
    repeat = c.env.get("action_repeat", 1)
    _check(
        isinstance(repeat, int) and not isinstance(repeat, bool) and repeat >= 1 and c.env.time_limit % repeat == 0,
        "env.action_repeat",
        f"must be a positive integer that divides env.time_limit={c.env.time_limit} (every action "
        f"then spans the same number of control steps), got {repeat!r}",
    )
    frames = episode_frames(c)
    _check(
        2 <= c.sequence_length <= frames,
        "sequence_length",
        f"must be in [2, {frames}]: sequences are cut from single episodes of env.time_limit / "
        f"env.action_repeat + 1 = {frames} frames",
    )
    per_env = c.prefill // c.env.num_envs
    _check(
        per_env >= c.env.time_limit,
        "prefill",
        f"{c.prefill} random steps over env.num_envs={c.env.num_envs} environments give each "
        f"{per_env} steps, fewer than one episode (env.time_limit={c.env.time_limit}); learning "
        f"needs finished episodes. Use --config.prefill={c.env.num_envs * c.env.time_limit} or more.",
    )
    _check(
        c.action_encoder.kind in ("mlp", "none", "pad"),
        "action_encoder.kind",
        f"{c.action_encoder.kind!r} is not 'mlp', 'none' or 'pad'",
    )
    if c.action_encoder.kind == "mlp":
        _positive_ints(c, ("action_encoder.code_size", "action_encoder.hidden"))
    if c.action_encoder.kind == "pad":
        _check(
            c.action_encoder.code_size >= c.action_dim,
            "action_encoder.code_size",
            f"'pad' fills actions into code_size slots; it must be >= action_dim={c.action_dim}",
        )
    if c.stacked:
        _check(
            c.action_encoder.kind == "pad",
            "stacked",
            "APV's stacked model feeds the real action zero-padded: set action_encoder.kind='pad'",
        )
    _check(c.intrinsic.beta >= 0, "intrinsic.beta", "must be >= 0 (0 turns the bonus off)")
    if c.intrinsic.beta > 0:
        _positive_ints(c, ("intrinsic.window", "intrinsic.k", "intrinsic.queue_dim", "intrinsic.capacity"))
        _check(
            c.intrinsic.window <= c.sequence_length,
            "intrinsic.window",
            f"must be at most sequence_length={c.sequence_length}",
        )
    _check(c.loss.aux_reward_scale >= 0, "loss.aux_reward_scale", "must be >= 0 (0 removes the head)")
    _check(
        1 <= c.log.media_context < c.sequence_length,
        "log.media_context",
        f"must be in [1, sequence_length) = [1, {c.sequence_length})",
    )
    on_device, device_capacity = c.replay.get("on_device", False), c.replay.get("device_capacity", 0)
    _check(isinstance(on_device, bool), "replay.on_device", f"must be True or False, got {on_device!r}")
    _check(
        isinstance(device_capacity, int) and not isinstance(device_capacity, bool) and device_capacity >= 0,
        "replay.device_capacity",
        f"must be an integer >= 0 (0 = replay.capacity), got {device_capacity!r}",
    )
    if on_device:
        _check(
            (device_capacity or c.replay.capacity) >= episode_frames(c),
            "replay.device_capacity",
            f"the device ring of {device_capacity or c.replay.capacity} steps cannot hold one episode of "
            f"{episode_frames(c)} frames; raise it (0 uses replay.capacity)",
        )
    if c.pretrained:
        _check(
            c.action_encoder.kind != "none",
            "action_encoder.kind",
            "a pre-trained RSSM is conditioned on 50-d or 64-d action codes, not raw actions; use "
            "'mlp' (PreLAR) or 'pad' (APV) with `pretrained`",
        )
