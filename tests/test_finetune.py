"""Fine-tuning: configs, partial restore of pre-trained modules, the update (optimiser groups,
device-count independence), the policy, and a tiny run end to end with resume."""

import json
import os

import chex
import jax
import numpy as np
import pytest

from prelar_jax.learners import finetune as agent_lib
from prelar_jax.runtime import pretrained as pretrained_lib
from prelar_jax.runtime import checkpoint, config as config_lib, finetune_loop, logger as logger_lib, parallel, steps
from tests.model_helpers import write_pretrain_checkpoint


def finetune_config(spec="configs/prelar_finetune.py:tiny", **overrides):
    values = {"log.wandb_mode": "disabled", **overrides}
    return config_lib.load_config(spec, values)


def host_zeros(agent):
    shapes = jax.eval_shape(agent.init, jax.random.key(0))
    return jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), shapes)


@pytest.fixture(scope="module")
def pretrained_dir(tmp_path_factory):
    """A pre-training workdir (tiny PreLAR) with one checkpoint of random, non-zero parameters."""
    workdir = tmp_path_factory.mktemp("pretrain")
    config = config_lib.load_config("configs/prelar_pretrain.py:tiny", {"data.root": "unused"})
    params, stats = write_pretrain_checkpoint(workdir, config, seed=3, step=7)
    return workdir, params, stats


def test_configs_are_configurations_of_one_agent():
    prelar = finetune_config()
    dreamer = finetune_config("configs/dreamerv2.py:tiny")
    for config in (
        prelar,
        dreamer,
        finetune_config("configs/prelar_finetune.py:paper"),
        finetune_config("configs/dreamerv2.py:paper"),
    ):
        config_lib.validate_finetune_config(config)
    prelar_params = jax.eval_shape(agent_lib.FinetuneAgent(prelar).init, jax.random.key(0))[0]
    dreamer_params = jax.eval_shape(agent_lib.FinetuneAgent(dreamer).init, jax.random.key(0))[0]
    assert set(prelar_params) == {
        "encoder",
        "decoder",
        "rssm",
        "action_encoder",
        "reward",
        "aux_reward",
        "actor",
        "critic",
    }
    assert set(dreamer_params) == {"encoder", "decoder", "rssm", "reward", "actor", "critic"}
    # PreLAR's RSSM takes the action code, DreamerV2's the raw 4-d action.
    code, deter = prelar.action_encoder.code_size, prelar.model.deter
    stoch = prelar.model.stoch * prelar.model.classes
    assert prelar_params["rssm"]["img_in"]["kernel"].shape[0] == stoch + code
    assert dreamer_params["rssm"]["img_in"]["kernel"].shape[0] == stoch + 4
    assert deter == dreamer.model.deter
    assert agent_lib.FinetuneAgent(dreamer).pretrained_group() == ()
    assert agent_lib.FinetuneAgent(prelar).pretrained_group() == ("encoder", "rssm")
    # The fine-tuning presets share the pre-training presets' world-model sizes.
    pre = config_lib.load_config("configs/prelar_pretrain.py:paper")
    assert pre.model.to_dict() == finetune_config("configs/prelar_finetune.py:paper").model.to_dict()
    assert pre.implicit_action.stoch == finetune_config("configs/prelar_finetune.py:paper").action_encoder.code_size
    # The cpu preset: one world model (plain CNN, same sizes) for PreLAR, APV and DreamerV2, and each
    # fine-tuning config matches its pre-training config.
    cpu = {name: finetune_config(f"configs/{name}.py:cpu") for name in ("prelar_finetune", "apv_finetune", "dreamerv2")}
    for name, config in cpu.items():
        config_lib.validate_finetune_config(config)
        assert config.model.to_dict() == cpu["dreamerv2"].model.to_dict() and config.model.encoder == "plain", name
    for method in ("prelar", "apv"):
        pre = config_lib.load_config(f"configs/{method}_pretrain.py:cpu", {"data.root": "unused"})
        config_lib.validate_pretrain_config(pre)
        assert pre.model.to_dict() == cpu[f"{method}_finetune"].model.to_dict()
    assert (
        config_lib.load_config("configs/prelar_pretrain.py:cpu").implicit_action.stoch
        == cpu["prelar_finetune"].action_encoder.code_size
    )


@pytest.mark.parametrize(
    "overrides, key",
    [
        ({"task": "open-the-fridge"}, "task"),
        ({"prefill": 10}, "prefill"),
        ({"sequence_length": 60}, "sequence_length"),
        ({"env.num_envs": 0}, "env.num_envs"),
        ({"intrinsic.window": 9}, "intrinsic.window"),
        ({"env.action_repeat": 3}, "env.action_repeat"),  # does not divide time_limit=50
        ({"env.action_repeat": 0}, "env.action_repeat"),
        ({"env.action_repeat": 10}, "sequence_length"),  # episodes of 50 / 10 + 1 = 6 frames < 8
    ],
)
def test_bad_finetune_config_names_the_key(overrides, key):
    with pytest.raises(config_lib.ConfigError, match=key.replace(".", r"\.")):
        config_lib.validate_finetune_config(finetune_config(**overrides))


def test_load_pretrained_copies_the_world_model_and_reports(pretrained_dir):
    workdir, saved_params, saved_stats = pretrained_dir
    config = finetune_config()
    agent = agent_lib.FinetuneAgent(config)
    params, stats = host_zeros(agent)
    new_params, new_stats, report = pretrained_lib.load_pretrained(str(workdir), params, stats, config.model)
    for name in ("encoder", "decoder", "rssm"):
        jax.tree.map(np.testing.assert_array_equal, new_params[name], saved_params[name])
    for name in ("encoder", "decoder"):
        jax.tree.map(np.testing.assert_array_equal, new_stats[name], saved_stats[name])
    for name in ("action_encoder", "reward", "aux_reward", "actor", "critic"):  # untouched
        jax.tree.map(np.testing.assert_array_equal, new_params[name], params[name])
    assert report["step"] == 7
    assert any(p.startswith("params/rssm/") for p in report["loaded"])
    assert any(p.startswith("params/actor/") for p in report["initialised"])
    assert any(p.startswith("params/implicit_action/") for p in report["ignored"])
    assert not any("implicit_action" in p for p in report["loaded"])
    assert "params/encoder" in pretrained_lib.summarise_report(report)
    assert report["frame_stride"] == 1 and "note:" not in pretrained_lib.summarise_report(report)
    # a pre-training on every 4th frame is named unless fine-tuning repeats each action 4 times
    assert "data.frame_stride=4" in pretrained_lib.summarise_report({**report, "frame_stride": 4})
    assert "env.action_repeat=4 would match" in pretrained_lib.summarise_report({**report, "frame_stride": 4}, 2)
    assert "note:" not in pretrained_lib.summarise_report({**report, "frame_stride": 4}, 4)


def test_load_pretrained_reads_the_same_values_as_a_full_restore(pretrained_dir):
    """The pre-trained state is read without its Adam moments (``Checkpointer.restore(only=...)``);
    step, parameters and BatchNorm statistics equal those of restoring the whole TrainState."""
    from prelar_jax.learners.pretrain import PretrainModel, make_optimizer

    workdir, saved_params, saved_stats = pretrained_dir
    # The pre-training may still be running: the reader leaves its save in progress alone.
    in_progress = os.path.join(workdir, "checkpoints", f"9{checkpoint.TEMPORARY_SUFFIX}-1", "state")
    os.makedirs(in_progress)
    config, params, stats, step = pretrained_lib.restore_pretrain_state(workdir)
    assert os.path.isdir(in_progress)
    model = PretrainModel(config)
    cpu = jax.sharding.SingleDeviceSharding(jax.local_devices(backend="cpu")[0])
    target = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=cpu),
        jax.eval_shape(lambda k: model.init_state(k, make_optimizer(config)), jax.random.key(0)),
    )
    with checkpoint.Checkpointer(os.path.join(workdir, "checkpoints"), async_save=False) as ckpt:
        full, metadata = ckpt.restore(target)
    assert not os.path.exists(os.path.dirname(in_progress))  # a writer's Checkpointer removes it
    chex.assert_trees_all_equal((params, stats), (full.params, full.batch_stats))
    chex.assert_trees_all_equal((params, stats), (saved_params, saved_stats))
    assert step == metadata["step"] == int(full.step) == 7
    assert all(leaf.sharding == cpu for leaf in jax.tree.leaves((params, stats)))


def test_pretrained_weights_sum_tells_bit_identical_weights_apart(pretrained_dir):
    """The benchmark's test for "this pre-training repeats that one": the checkpoint's sum equals
    the sum of the arrays it was written from, and a one-ulp change in any one array, or a dtype
    change of the same values, gives another sum."""
    workdir, saved_params, saved_stats = pretrained_dir
    sha, step = pretrained_lib.pretrain_weights_sha256(workdir)
    assert step == 7 and sha == pretrained_lib.weights_sha256(saved_params, saved_stats)
    assert len(sha) == 64 and int(sha, 16) >= 0
    copy = jax.tree.map(np.array, saved_params)
    assert pretrained_lib.weights_sha256(copy, saved_stats) == sha  # the values, not the objects
    kernel = copy["rssm"]["img_in"]["kernel"]
    kernel[0, 0] = np.nextafter(kernel[0, 0], np.float32(np.inf))
    assert pretrained_lib.weights_sha256(copy, saved_stats) != sha
    as_f64 = jax.tree.map(lambda x: np.asarray(x, np.float64), saved_stats)
    assert jax.tree.leaves(saved_stats) and pretrained_lib.weights_sha256(saved_params, as_f64) != sha


def test_load_pretrained_errors(pretrained_dir, tmp_path):
    workdir, _, _ = pretrained_dir
    config = finetune_config(**{"model.deter": 16, "model.hidden": 16})
    agent = agent_lib.FinetuneAgent(config)
    params, stats = host_zeros(agent)
    with pytest.raises(pretrained_lib.PretrainedMismatchError) as error:
        pretrained_lib.load_pretrained(str(workdir), params, stats, config.model)
    message = str(error.value)
    assert "params/rssm/" in message and "model.deter: pre-training 32, fine-tuning 16" in message
    with pytest.raises(pretrained_lib.PretrainedNotFoundError, match="pre-training run"):
        pretrained_lib.load_pretrained(str(tmp_path / "nowhere"), params, stats, config.model)
    finetune_dir = tmp_path / "a_finetuning_run"
    logger_lib.write_config(finetune_dir, config.to_dict())
    with pytest.raises(pretrained_lib.PretrainedNotFoundError, match="not a pre-training workdir"):
        pretrained_lib.load_pretrained(str(finetune_dir), params, stats, config.model)
    (finetune_dir / "config.json").write_text("{ not json")
    with pytest.raises(pretrained_lib.PretrainedNotFoundError, match="cannot read"):
        pretrained_lib.load_pretrained(str(finetune_dir), params, stats, config.model)


def random_batch(config, seed=0):
    rng = np.random.default_rng(seed)
    B, T = config.batch_size, config.sequence_length
    is_first = np.zeros((B, T), bool)
    is_first[:, 0] = True
    return {
        "image": rng.integers(0, 256, (B, T, 64, 64, 3), dtype=np.uint8),
        "action": rng.uniform(-1, 1, (B, T, 4)).astype(np.float32),
        "reward": rng.random((B, T)).astype(np.float32),
        "is_first": is_first,
    }


def _run_updates(config, devices, count, batch):
    mesh = parallel.make_mesh(devices)
    agent = agent_lib.FinetuneAgent(config, bn_axis_name=parallel.AXIS)
    state = parallel.put_replicated(agent.init_state(jax.random.key(1)), mesh)
    step = steps.make_finetune_step(agent, mesh, seed=0)
    history = [jax.tree.map(np.asarray, state.params)]
    for _ in range(count):
        state, metrics = step(state, parallel.put_batch(batch, mesh))
        history.append(jax.tree.map(np.asarray, state.params))
    return history, jax.tree.map(np.asarray, state), {k: float(v) for k, v in metrics.items()}


def _changed(a, b):
    return any(not np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


@pytest.mark.slow
def test_update_groups_and_device_count_independence():
    """Spec 5.2: encoder and RSSM stay put for the first `pretrain` updates while the new modules
    learn; a 4-device update equals the 1-device update."""
    config = finetune_config()
    warmup = config.pretrain
    batch = random_batch(config)
    history, state, metrics = _run_updates(config, jax.devices()[:1], warmup + 1, batch)
    assert all(np.isfinite(v) for v in metrics.values()), metrics
    for t in range(1, warmup + 1):
        for name in ("encoder", "rssm"):
            assert not _changed(history[0][name], history[t][name]), (name, t)
        for name in ("decoder", "action_encoder", "reward", "aux_reward", "actor", "critic"):
            assert _changed(history[t - 1][name], history[t][name]), (name, t)
    assert _changed(history[warmup]["encoder"], history[warmup + 1]["encoder"])
    assert _changed(history[warmup]["rssm"], history[warmup + 1]["rssm"])
    # The slow critic was copied at update 0 and is not again before slow_update_every updates.
    assert config.actor_critic.slow_update_every > warmup + 1
    jax.tree.map(np.testing.assert_array_equal, state.slow_critic, history[1]["critic"])
    assert int(state.intrinsic.count) > 0

    four, _, _ = _run_updates(config, jax.devices()[:4], 2, batch)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-5), four[2], history[2])


def test_policy_modes():
    config = finetune_config()
    agent = agent_lib.FinetuneAgent(config)
    params, stats = jax.jit(agent.init)(jax.random.key(0))
    image = np.random.default_rng(0).integers(0, 256, (3, 64, 64, 3), dtype=np.uint8)
    first = np.array([True, True, True])
    policy = jax.jit(agent.policy, static_argnames="explore")
    carry = agent.initial_carry(3)
    mode_a, carry_a = policy(params, stats, carry, image, first, jax.random.key(1), explore=False)
    mode_b, _ = policy(params, stats, carry, image, first, jax.random.key(1), explore=False)
    sample_a, _ = policy(params, stats, carry, image, first, jax.random.key(1), explore=True)
    sample_b, _ = policy(params, stats, carry, image, first, jax.random.key(2), explore=True)
    np.testing.assert_array_equal(mode_a, mode_b)
    assert not np.array_equal(sample_a, sample_b)
    for action in (mode_a, sample_a, sample_b):
        assert action.shape == (3, 4) and np.all(np.abs(np.asarray(action)) < 1.0)
    np.testing.assert_array_equal(carry_a["action"], mode_a)
    assert carry_a["latent"]["deter"].shape == (3, config.model.deter)


def _metrics(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as handle:
        return [json.loads(line) for line in handle]


@pytest.mark.slow
def test_tiny_finetune_end_to_end_and_resume(pretrained_dir, tmp_path):
    pre_workdir, saved_params, _ = pretrained_dir
    workdir = tmp_path / "finetune"
    config = finetune_config(**{"pretrained": str(pre_workdir), "steps": 400})
    summary = finetune_loop.run(config, str(workdir), devices=jax.devices()[:1])
    assert summary["finished"] and summary["env_step"] == 400
    assert json.loads((workdir / "summary.json").read_text())["env_step"] == 400
    # 5 warm-up updates at 200, then one per train_every=10 steps.
    assert summary["updates"] == config.pretrain + (400 - config.prefill) // config.train_every
    records = _metrics(workdir)
    evals = [r for r in records if "eval/success_rate" in r]
    assert [r["step"] for r in evals] == [200, 400]
    for r in evals:
        assert 0.0 <= r["eval/success_rate"] <= 1.0 and r["eval/episodes"] == config.eval_eps
        assert np.isfinite(r["eval/return"])
    train = [r for r in records if "train/return" in r]
    assert train and all(r["train/length"] == config.env.time_limit for r in train)
    losses = [r for r in records if "model_loss" in r]
    assert losses and all(np.isfinite(r["model_loss"]) and "fps/env" in r for r in losses)
    assert os.listdir(workdir / "media")
    # One evaluation episode per evaluation as a GIF: the reset frame and every step of it.
    from PIL import Image

    for step in (200, 400):
        with Image.open(workdir / "media" / f"eval_{step:08d}.gif") as gif:
            assert gif.n_frames == config.env.time_limit + 1 and gif.size == (64, 64)
            frame = np.asarray(gif.convert("RGB"))
            assert frame.std() > 1.0  # a rendered scene, not a blank frame
    report = json.loads((workdir / "pretrained_load.json").read_text())
    assert any(p.startswith("params/rssm/") for p in report["loaded"])
    assert checkpoint.Checkpointer(workdir / "checkpoints").latest_step() == 400
    saved_replay = checkpoint.read_metadata(workdir / "checkpoints")["replay"]["episodes"]
    assert len(saved_replay) == 400 // config.env.time_limit

    # Deterministic given the seed and the pre-trained weights (the benchmark fine-tunes a method
    # whose pre-trained weights repeat another's only once): a second run logs the same values,
    # timings aside.
    def learned(rows):
        timing = ("seconds", "fps/", "/s", "perf/")
        return [{k: v for k, v in r.items() if not any(t in k for t in timing)} for r in rows]

    finetune_loop.run(config, str(tmp_path / "twin"), devices=jax.devices()[:1])
    assert learned(_metrics(tmp_path / "twin")) == learned(records) and len(records) > 10

    # Resume: a longer run continues from step 400 with its replay and counters.
    longer = finetune_config(**{"pretrained": str(pre_workdir), "steps": 500})
    summary = finetune_loop.run(longer, str(workdir), devices=jax.devices()[:1])
    assert summary["env_step"] == 500
    assert summary["updates"] == config.pretrain + (500 - config.prefill) // config.train_every
    records = _metrics(workdir)
    assert [r["step"] for r in records if "eval/success_rate" in r] == [200, 400, 500]
    steps = [r["step"] for r in records]
    assert steps == sorted(steps)
    metadata = checkpoint.read_metadata(workdir / "checkpoints")
    assert metadata["counters"]["env_step"] == 500
    assert metadata["replay"]["episodes"][: len(saved_replay)] == saved_replay

    # The fine-tuned world model read back for analysis: the latest checkpoint's parameters, and
    # its open-loop error beside the mean-frame and last-frame baselines (numpy, float64).
    from prelar_jax.analysis import transfer

    restored_config, params, _, env_step = pretrained_lib.restore_finetune_state(workdir)
    assert env_step == 500 and restored_config.steps == 500
    full, _ = checkpoint.Checkpointer(workdir / "checkpoints").restore(
        agent_lib.FinetuneAgent(longer).init_state(jax.random.key(0))
    )
    chex.assert_trees_all_close(params, jax.tree.map(np.asarray, full.params))
    names = sorted(os.listdir(workdir / "replay"))
    replay = [dict(np.load(workdir / "replay" / n)) for n in names]
    held_out = replay[:2]
    result = transfer.finetuned_prediction_error(str(workdir), held_out, jax.random.key(3), context=3, eval_length=8)
    mean = np.mean(np.concatenate([e["image"] for e in replay]).astype(np.float64), axis=0) / 255.0
    windows = [(e, s) for e in range(2) for s in range(0, len(held_out[e]["image"]) - 7, 8)]
    assert result["eval_windows"] == len(windows)
    frames = [held_out[e]["image"][s : s + 8].astype(np.float64) / 255.0 for e, s in windows]
    np.testing.assert_allclose(
        result["baseline_mse"], np.mean([np.mean((f[3:] - mean) ** 2) for f in frames]), rtol=1e-9
    )
    np.testing.assert_allclose(
        result["last_frame_mse"], np.mean([np.mean((f[3:] - f[2]) ** 2) for f in frames]), rtol=1e-9
    )
    assert 0.0 < result["mse"] < 1.0 and len(result["mse_by_step"]) == 5 and result["env_step"] == 500
    assert result["ratio_to_mean_frame"] == pytest.approx(result["mse"] / result["baseline_mse"])
    assert result["mse_other_actions"] > 0.0
    assert result["action_effect"] == pytest.approx(result["mse_other_actions"] / result["mse"])
    with pytest.raises(pretrained_lib.PretrainedNotFoundError, match="not a fine-tuning workdir"):
        pretrained_lib.restore_finetune_state(pre_workdir)

    # With env.action_repeat=2 every count stays in control steps; the replay, the episode GIF
    # and the policy see one frame per action.
    repeat = finetune_config(**{"pretrained": str(pre_workdir), "steps": 300, "env.action_repeat": 2})
    summary = finetune_loop.run(repeat, str(tmp_path / "repeat"), devices=jax.devices()[:1])
    assert summary["env_step"] == 300
    assert summary["updates"] == config.pretrain + (300 - config.prefill) // config.train_every
    records = _metrics(tmp_path / "repeat")
    assert [r["step"] for r in records if "eval/success_rate" in r] == [200, 300]
    train = [r for r in records if "train/return" in r]
    assert train and all(r["train/length"] == config.env.time_limit for r in train)
    episodes = sorted(os.listdir(tmp_path / "repeat" / "replay"))
    assert len(episodes) == 300 // config.env.time_limit
    assert all(len(np.load(tmp_path / "repeat" / "replay" / n)["image"]) == 50 // 2 + 1 for n in episodes)
    with Image.open(tmp_path / "repeat" / "media" / f"eval_{300:08d}.gif") as gif:
        assert gif.n_frames == 50 // 2 + 1


def test_apv_stacked_agent_loads_the_action_free_rssm(tmp_path):
    """APV (spec 9.1): the pre-trained RSSM becomes af_rssm; a new RSSM reads its features with
    the action padded to 50; the world-model loss runs and the bonus reads af features."""
    pre = config_lib.load_config("configs/apv_pretrain.py:tiny", {"data.root": "unused"})
    assert pre.implicit_action.code_type == "none" and pre.loss.consistency == "off"
    original = config_lib.load_config("configs/apv_pretrain.py:original_tiny")
    assert original.model.encoder == "plain" and original.loss.kl_scale == 0.1
    saved_params, saved_stats = write_pretrain_checkpoint(tmp_path, pre, seed=5, step=3)

    config = finetune_config("configs/apv_finetune.py:tiny", pretrained=str(tmp_path))
    config_lib.validate_finetune_config(config)
    agent = agent_lib.FinetuneAgent(config)
    assert agent.pretrained_group() == ("encoder", "af_rssm")
    params, stats = host_zeros(agent)
    feat_dim = config.model.stoch * config.model.classes + config.model.deter
    assert params["rssm"]["obs_out"]["kernel"].shape[0] == config.model.deter + feat_dim
    new_params, new_stats, report = pretrained_lib.load_pretrained(
        str(tmp_path), params, stats, config.model, agent_lib.pretrained_module_map(config)
    )
    jax.tree.map(np.testing.assert_array_equal, new_params["af_rssm"], saved_params["rssm"])
    jax.tree.map(np.testing.assert_array_equal, new_params["rssm"], params["rssm"])  # new
    assert any(p.startswith("params/af_rssm/") for p in report["loaded"])
    assert not any(p.startswith("params/rssm/") for p in report["ignored"])  # used, as af_rssm

    codes = agent.encode_action(new_params, np.ones((2, 3, 4), np.float32))
    assert codes.shape == (2, 3, 50)
    np.testing.assert_array_equal(codes[..., 4:], 0.0)
    np.testing.assert_array_equal(codes[..., :4], 1.0)
    bonus = agent.init_state(jax.random.key(0), new_params, new_stats).intrinsic
    assert bonus.projection.shape[0] == feat_dim
    batch = random_batch(config)
    loss, (_, post, _, metrics) = jax.jit(agent.world_model_loss)(
        new_params, new_stats, bonus, batch, jax.random.key(1), np.arange(config.batch_size)
    )
    assert np.isfinite(float(loss))
    assert post["deter"].shape == (config.batch_size, config.sequence_length, config.model.deter)
    assert np.isfinite(float(metrics["intr_mean"]))
