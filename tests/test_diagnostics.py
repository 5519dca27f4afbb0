"""Pre-training diagnostics: the linear implicit-action probe (numerics against numpy/scipy
references, the pairing of codes with actions, the episode split) and the world-model transfer
(runs with and without a pre-trained checkpoint, updates lower the error on the data they see)."""

import json
import pathlib

import jax
import numpy as np
import pytest
import scipy.linalg
import scipy.stats

from prelar_jax.runtime import config as config_lib, logger as logger_lib
from prelar_jax.data.generate import save_episode
from prelar_jax.analysis import probe, transfer
from prelar_jax.learners.pretrain import PretrainModel
from tests.model_helpers import write_pretrain_checkpoint

REPO = pathlib.Path(__file__).resolve().parents[1]


def pretrain_config(spec="configs/prelar_pretrain.py:tiny"):
    return config_lib.load_config(spec, {"data.root": "unused", "log.wandb_mode": "disabled"})


@pytest.fixture(scope="module")
def pretrained_dir(tmp_path_factory):
    """A tiny PreLAR pre-training workdir with one checkpoint of known random parameters."""
    workdir = tmp_path_factory.mktemp("pretrain")
    params, stats = write_pretrain_checkpoint(workdir, pretrain_config(), seed=5, step=9)
    return workdir, params, stats


def synthetic_episodes(count, length, seed=0, size=64):
    rng = np.random.default_rng(seed)
    episodes = []
    for _ in range(count):
        action = rng.uniform(-1, 1, (length, 4)).astype(np.float32)
        action[0] = 0.0
        episodes.append({"image": rng.integers(0, 256, (length, size, size, 3), dtype=np.uint8), "action": action})
    return episodes


# ----------------------------------------------------------------------------------------------
# The linear probe
# ----------------------------------------------------------------------------------------------


def _linear_data(rng, episodes=20, pairs=40, code_dim=8, noise=0.01, related=True):
    actions = [rng.uniform(-1, 1, (pairs, 4)) for _ in range(episodes)]
    mixing = rng.standard_normal((4, code_dim))
    if related:
        codes = [a @ mixing + 0.3 + noise * rng.standard_normal((pairs, code_dim)) for a in actions]
    else:
        codes = [rng.standard_normal((pairs, code_dim)) for _ in actions]
    return codes, actions


def test_probe_recovers_a_linear_map_and_not_noise():
    rng = np.random.default_rng(0)
    train, held_out = probe.split_episodes(20, 0.7, rng)
    codes, actions = _linear_data(rng)
    result = probe.linear_probe(codes, actions, train, held_out)
    assert len(result["r2"]) == 4 and min(result["r2"]) > 0.99
    assert result["train_pairs"] == 14 * 40 and result["eval_pairs"] == 6 * 40
    codes, actions = _linear_data(rng, related=False)
    result = probe.linear_probe(codes, actions, train, held_out)
    assert max(abs(v) for v in result["r2"]) < 0.1  # no information: about 0 (slightly negative)
    assert result["r2_mean"] < 0.05


def test_r2_and_fit_against_independent_references():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((50, 3))
    y = x @ rng.standard_normal((3, 2)) + 0.5 * rng.standard_normal((50, 2)) - 1.0
    weights, bias = probe.fit_linear_probe(x, y)
    reference, *_ = scipy.linalg.lstsq(np.c_[x, np.ones(50)], y)
    np.testing.assert_allclose(weights, reference[:3], rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(bias, reference[3], rtol=1e-10, atol=1e-12)
    # 1 - SSE/SST by explicit sums, on predictions from another model (held-out style).
    pred = y + rng.standard_normal(y.shape)
    for k in range(2):
        sse = sum((y[i, k] - pred[i, k]) ** 2 for i in range(50))
        mean = sum(y[:, k]) / 50
        sst = sum((y[i, k] - mean) ** 2 for i in range(50))
        assert probe.r2_scores(y, pred)[k] == pytest.approx(1 - sse / sst, rel=1e-12)
    # With one feature, the in-sample R² of least squares is Pearson's r².
    fit = probe.predict_linear_probe(*probe.fit_linear_probe(x[:, :1], y), x[:, :1])
    for k in range(2):
        r = scipy.stats.pearsonr(x[:, 0], y[:, k]).statistic
        assert probe.r2_scores(y, fit)[k] == pytest.approx(r**2, rel=1e-9)
    # A constant held-out dimension has no R²: NaN, left out of the mean.
    codes, actions = _linear_data(rng, episodes=4)
    actions[3][:, 2] = 0.25
    result = probe.linear_probe(codes, actions, [0, 1, 2], [3])
    assert np.isnan(result["r2"][2]) and result["constant_dims"] == [2]
    assert result["r2_mean"] == pytest.approx(np.mean([result["r2"][i] for i in (0, 1, 3)]))


def test_average_over_splits_leaves_out_undefined_dimensions():
    """A dimension constant in one split's held-out pairs (NaN there) is averaged over the splits
    that define it; the mean R² is the mean of the splits' means."""
    a = {"r2": [0.5, float("nan")], "train_r2": [0.6, 0.1], "r2_mean": 0.5, "train_pairs": 7, "eval_pairs": 3}
    b = {"r2": [0.1, 0.3], "train_r2": [0.2, 0.3], "r2_mean": 0.2, "train_pairs": 6, "eval_pairs": 4}
    c = {"r2": [0.3, float("nan")], "train_r2": [0.4, 0.2], "r2_mean": 0.3, "train_pairs": 7, "eval_pairs": 3}
    out = probe.average_splits([a, b, c])
    np.testing.assert_allclose(out["r2"], [0.3, 0.3])
    np.testing.assert_allclose(out["train_r2"], [0.4, 0.2])
    assert out["r2_mean"] == pytest.approx(1 / 3) and out["split_r2_mean"] == [0.5, 0.2, 0.3]
    assert out["r2_mean_std"] == pytest.approx(np.std([0.5, 0.2, 0.3], ddof=1))
    assert out["train_pairs"] == 7 and out["eval_pairs"] == 3  # the first split's
    assert np.isnan(probe.average_splits([a, c])["r2"][1])
    assert probe.average_splits([a]) == a


def test_split_is_by_episode_and_covers_all():
    train, held = probe.split_episodes(10, 0.7, np.random.default_rng(3))
    assert len(train) == 7 and len(held) == 3 and not set(train) & set(held)
    assert sorted([*train, *held]) == list(range(10))
    assert list(map(len, probe.split_episodes(2, 0.99, np.random.default_rng(0)))) == [1, 1]
    with pytest.raises(probe.ProbeError, match="at least 2 episodes"):
        probe.split_episodes(1, 0.7, np.random.default_rng(0))
    # Stratified by task: every split fits on and holds out episodes of every task (4 tasks x 4
    # episodes: 3 fit, 1 held out each); the plain split above is what one group gives.
    tasks = [t for t in "abcd" for _ in range(4)]
    rng = np.random.default_rng(5)
    held_sets = set()
    for _ in range(20):
        train, held = probe.split_episodes(16, 0.7, rng, tasks)
        assert sorted([*train, *held]) == list(range(16))
        assert sorted(tasks[i] for i in held) == list("abcd")
        held_sets.add(tuple(held))
    assert len(held_sets) > 10
    plain = probe.split_episodes(10, 0.7, np.random.default_rng(3), ["x"] * 10)
    np.testing.assert_array_equal(plain[0], probe.split_episodes(10, 0.7, np.random.default_rng(3))[0])
    # A task with a single episode cannot be both fitted and held out: the plain split then.
    lonely = ["a"] * 5 + ["b"]
    np.testing.assert_array_equal(
        probe.split_episodes(6, 0.7, np.random.default_rng(1), lonely)[0],
        probe.split_episodes(6, 0.7, np.random.default_rng(1))[0],
    )


# ----------------------------------------------------------------------------------------------
# The probe on a model
# ----------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_probe_on_a_pretrained_checkpoint_matches_a_reference(pretrained_dir):
    """Codes of the restored model, paired with a_t for (o_{t-1}, o_t), split by episode: the
    result equals an independent computation with the module applied directly and scipy's fit."""
    workdir, params, stats = pretrained_dir
    episodes = synthetic_episodes(6, 7)
    key = jax.random.key(4, impl="unsafe_rbg")  # cheap to compile the random initialisers
    result = probe.implicit_action_probe(str(workdir), None, episodes, key, chunk=16)  # 36 pairs: 3 chunks
    assert result["source"] == "pretrained" and result["step"] == 9 and result["code_dim"] == 8

    model = PretrainModel(pretrain_config())
    variables = {"params": params["implicit_action"], "batch_stats": stats["implicit_action"]}
    codes = []
    for episode in episodes:
        frames = episode["image"].astype(np.float32) / 255.0 - 0.5
        out = model.implicit_action.apply(variables, frames[:-1], frames[1:], train=False)
        codes.append(np.asarray(out["mean"], np.float64))  # [L-1, 8]
    train, held = result["train_episodes"], result["eval_episodes"]
    assert len(train) == 4 and sorted(train + held) == list(range(6))

    def reference(train, held):  # scipy's least squares with intercept, R² per dimension
        fit_x = np.concatenate([codes[i] for i in train])
        fit_y = np.concatenate([episodes[i]["action"][1:] for i in train]).astype(np.float64)
        solution, *_ = scipy.linalg.lstsq(np.c_[fit_x, np.ones(len(fit_x))], fit_y)
        eval_x = np.concatenate([codes[i] for i in held])
        eval_y = np.concatenate([episodes[i]["action"][1:] for i in held]).astype(np.float64)
        pred = np.c_[eval_x, np.ones(len(eval_x))] @ solution
        return 1 - ((eval_y - pred) ** 2).sum(0) / ((eval_y - eval_y.mean(0)) ** 2).sum(0)

    np.testing.assert_allclose(result["r2"], reference(train, held), rtol=1e-3, atol=1e-4)
    assert result["train_pairs"] == 24 and result["eval_pairs"] == 12

    # Averaged over 3 random splits, the first being the split above: the mean and spread of the
    # same reference fit on each split.
    three = probe.implicit_action_probe(str(workdir), None, episodes, key, chunk=16, splits=3)
    assert len(three["splits"]) == 3 and three["splits"][0] == [train, held] and three["eval_episodes"] == held
    assert len({tuple(h) for _, h in three["splits"]}) > 1
    per_split = np.array([reference(t, h) for t, h in three["splits"]])  # [3, 4]
    np.testing.assert_allclose(three["r2"], per_split.mean(0), rtol=1e-3, atol=1e-4)
    np.testing.assert_allclose(three["split_r2_mean"], per_split.mean(1), rtol=1e-3, atol=1e-4)
    assert three["r2_mean"] == pytest.approx(per_split.mean(1).mean(), rel=1e-3, abs=1e-4)
    assert three["r2_mean_std"] == pytest.approx(per_split.mean(1).std(ddof=1), rel=1e-3, abs=1e-4)
    assert "r2_mean_std" not in result and result["splits"] == [[train, held]]

    # A random init of the same config: finite, another model, the same split for the same key.
    config = probe.read_pretrain_config(workdir)
    random = probe.implicit_action_probe(None, config, episodes, key, chunk=16)
    assert random["source"] == "random_init" and random["step"] is None
    assert random["eval_episodes"] == held and np.all(np.isfinite(random["r2"]))
    assert not np.allclose(random["r2"], result["r2"])
    # With the code network's output initialised at zero the random baseline still gets random
    # features (the original initialisation), not all-zero codes.
    config.implicit_action.head_init_scale = 0.0
    zero_head = probe.implicit_action_probe(None, config, episodes, key, chunk=16)
    assert zero_head["code_std"] > 1e-3
    np.testing.assert_allclose(zero_head["r2"], random["r2"], rtol=1e-5, atol=1e-6)


def test_probe_rejects_what_it_cannot_probe(pretrained_dir):
    episodes = synthetic_episodes(3, 3)
    key = jax.random.key(0)
    with pytest.raises(probe.ProbeError, match="no implicit-action encoder"):
        probe.implicit_action_probe(None, pretrain_config("configs/apv_pretrain.py:tiny"), episodes, key)
    with pytest.raises(probe.ProbeError, match="at least 2 episodes"):
        probe.implicit_action_probe(None, pretrain_config(), episodes[:1], key)
    bad = [dict(episodes[0], action=episodes[0]["action"][:2]), episodes[1]]
    with pytest.raises(probe.ProbeError, match="episode 0: action"):
        probe.implicit_action_probe(None, pretrain_config(), bad, key)
    other = config_lib.load_config("configs/prelar_pretrain.py:small", {"data.root": "x"})
    with pytest.raises(probe.ProbeError, match="model.depth"):
        probe.implicit_action_probe(str(pretrained_dir[0]), other, episodes, key)
    with pytest.raises(probe.ProbeError, match="no .npz"):
        probe.read_npz_episodes(pretrained_dir[0] / "nothing")


def test_stride_episodes_hand_case():
    action = np.arange(7 * 2, dtype=np.float32).reshape(7, 2)  # a_t = (2t, 2t + 1)
    episode = {
        "image": np.arange(7)[:, None, None, None].astype(np.uint8) * np.ones((1, 4, 4, 3), np.uint8),
        "action": action,
        "position": np.arange(7, dtype=np.float32)[:, None],
        "task": "t",
        "hand": np.arange(7 * 3, dtype=np.float32).reshape(7, 3),
    }
    (strided,) = probe.stride_episodes([episode], 3)
    np.testing.assert_array_equal(strided["image"][:, 0, 0, 0], [0, 3, 6])
    # frame 3 came from a_1 + a_2 + a_3, frame 6 from a_4 + a_5 + a_6; row 0 zeros
    np.testing.assert_array_equal(strided["action"], [[0, 0], [2 + 4 + 6, 3 + 5 + 7], [8 + 10 + 12, 9 + 11 + 13]])
    np.testing.assert_array_equal(strided["position"][:, 0], [0, 3, 6])
    np.testing.assert_array_equal(strided["hand"][:, 0], [0, 9, 18])
    assert strided["task"] == "t"
    assert probe.stride_episodes([episode], 1)[0] is episode
    with pytest.raises(probe.ProbeError, match="stride must be >= 1"):
        probe.stride_episodes([episode], 0)


def test_probe_reads_pairs_at_the_models_frame_stride():
    """A model pre-trained at data.frame_stride k is probed on pairs k frames apart with the
    summed actions: the same result as probing pre-strided episodes with a stride-1 config."""
    episodes = synthetic_episodes(6, 9)
    key = jax.random.key(4, impl="unsafe_rbg")
    strided_config = pretrain_config()
    strided_config.data.frame_stride = 2
    result = probe.implicit_action_probe(None, strided_config, episodes, key, chunk=16)
    reference = probe.implicit_action_probe(None, pretrain_config(), probe.stride_episodes(episodes, 2), key, chunk=16)
    assert result["train_pairs"] + result["eval_pairs"] == 6 * 4  # frames 0, 2, 4, 6, 8: 4 pairs each
    np.testing.assert_allclose(result["r2"], reference["r2"], rtol=1e-6)
    strided_config.data.frame_stride = 9
    with pytest.raises(probe.ProbeError, match="fewer than 2 frames at the model's frame stride 9"):
        probe.implicit_action_probe(None, strided_config, episodes, key, chunk=16)


@pytest.mark.slow
def test_hand_target_pairs_each_code_with_the_motion_between_its_frames():
    """Episodes whose hand moves exactly by the (x, y, z) action: the hand probe (the hand's
    measured displacement between a pair's frames) equals the action probe on those dimensions,
    at stride 1 and at a model's frame stride (displacement over k frames = the summed actions);
    a hand that moves by the next action instead scores differently."""
    key = jax.random.key(4, impl="unsafe_rbg")
    episodes = synthetic_episodes(6, 9)
    for episode in episodes:
        episode["hand"] = np.cumsum(episode["action"][:, :3], axis=0)  # hand[t] - hand[t-1] = a_t
    for stride in (1, 2):
        config = pretrain_config()
        config.data.frame_stride = stride
        result = probe.implicit_action_probe(None, config, episodes, key, chunk=16)
        np.testing.assert_allclose(result["hand"]["r2"], result["r2"][:3], rtol=1e-5, atol=1e-6)
    shifted = [dict(ep, hand=np.cumsum(np.roll(ep["action"][:, :3], -1, axis=0), axis=0)) for ep in episodes]
    result = probe.implicit_action_probe(None, pretrain_config(), shifted, key, chunk=16)
    assert not np.allclose(result["hand"]["r2"], result["r2"][:3], atol=1e-3)
    # The study's probe (pretrain_eval.probe_scores) reads it the same way.
    from prelar_jax.analysis import pretrain_eval

    model = PretrainModel(probe.random_features_config(pretrain_config()))
    params, stats = jax.jit(model.init)(key)
    scores = pretrain_eval.probe_scores(probe.make_code_fn(model), params, stats, episodes, [0, 1, 2, 3], [4, 5])
    np.testing.assert_allclose(scores["hand"]["r2"], scores["r2"], rtol=1e-5, atol=1e-6)


def test_read_npz_episodes(tmp_path):
    for task, count in (("push", 3), ("reach-wall", 1)):
        for episode in synthetic_episodes(count, 4, seed=count):
            hand = {"hand": np.ones((4, 3), np.float64)} if task == "push" else {}
            save_episode(tmp_path / task, {**episode, "is_first": np.arange(4) == 0, **hand})
    episodes = probe.read_npz_episodes(tmp_path)
    assert episodes[0]["hand"].dtype == np.float32 and "hand" not in episodes[-1]
    assert [e["task"] for e in episodes] == ["push"] * 3 + ["reach-wall"]
    assert episodes[0]["image"].shape == (4, 64, 64, 3) and episodes[0]["action"].dtype == np.float32
    assert [e["task"] for e in probe.read_npz_episodes(tmp_path, max_per_task=2)] == ["push"] * 2 + ["reach-wall"]


# ----------------------------------------------------------------------------------------------
# World-model transfer
# ----------------------------------------------------------------------------------------------


def constant_episodes(count, length, value, seed):
    """An easy fixed dataset: constant grey frames, random actions and rewards."""
    rng = np.random.default_rng(seed)
    return [
        {
            "image": np.full((length, 64, 64, 3), value, np.uint8),
            "action": rng.uniform(-1, 1, (length, 4)).astype(np.float32),
            "reward": rng.random(length).astype(np.float32),
        }
        for _ in range(count)
    ]


def _check_result(res, config, windows):
    assert res["context"] == config.log.media_context and res["eval_windows"] == windows
    assert len(res["mse_by_step"]) == config.sequence_length - res["context"]
    for k in ("mse", "psnr", "initial_mse", "initial_psnr", "context_mse", "baseline_mse"):
        assert np.isfinite(res[k]), k
    assert res["psnr"] == pytest.approx(10 * np.log10(1 / res["mse"]))
    assert res["mse"] == pytest.approx(np.mean(res["mse_by_step"]), rel=1e-6)
    assert res["nonfinite_updates"] == 0
    json.dumps(res)  # plain Python numbers only


@pytest.mark.slow
def test_transfer_with_and_without_pretrained_modules(pretrained_dir):
    """PreLAR's agent from the checkpoint (encoder, decoder and RSSM loaded; two updates through
    its optimiser groups and the intrinsic bonus) and from scratch; both finite, the loaded model
    another starting point."""
    config = config_lib.load_config("configs/prelar_finetune.py:tiny", {"log.wandb_mode": "disabled"})
    train = constant_episodes(2, 12, 90, seed=0)
    evaluation = constant_episodes(3, 8, 60, seed=1)
    key = jax.random.key(7, impl="unsafe_rbg")  # cheap to compile the initialisers
    pretrained = transfer.world_model_transfer(config, str(pretrained_dir[0]), train, evaluation, 2, key)
    _check_result(pretrained, config, windows=3)
    assert pretrained["updates"] == 2 and np.isfinite([pretrained["loss_first"], pretrained["loss_last"]]).all()
    assert pretrained["loaded"] > 0 and pretrained["method"] == "prelar"
    scratch = transfer.world_model_transfer(config, None, train, evaluation, 0, key)
    _check_result(scratch, config, windows=3)
    assert scratch["loaded"] == 0 and scratch["loss_first"] is None
    assert scratch["mse"] == scratch["initial_mse"]  # no update: the same evaluation twice
    assert pretrained["initial_mse"] != scratch["initial_mse"]
    assert pretrained["baseline_mse"] == pytest.approx(((90 - 60) / 255) ** 2, rel=1e-9)


@pytest.mark.slow
def test_transfer_updates_lower_the_error_on_the_data_they_see():
    """DreamerV2 from scratch (no BatchNorm, whose running statistics make the first tens of
    updates of the ResNet models a poor test): ten updates at a raised learning rate on the
    evaluation episodes themselves lower the open-loop error and the loss."""
    config = config_lib.load_config("configs/dreamerv2.py:tiny", {"optimizer.lr": 3e-3, "log.wandb_mode": "disabled"})
    episodes = constant_episodes(2, 12, 90, seed=0)
    res = transfer.world_model_transfer(config, None, episodes, episodes, 10, jax.random.key(3, impl="unsafe_rbg"))
    _check_result(res, config, windows=2)
    assert res["mse"] < 0.7 * res["initial_mse"]
    assert res["loss_last"] < res["loss_first"]


def test_other_actions_replace_only_the_imagined_part_of_each_window():
    actions = [np.full((10, 1), float(i)) for i in range(3)]
    episodes = [{"image": np.zeros((10, 2, 2, 3), np.uint8), "action": a} for a in actions]
    out = transfer.with_other_actions(episodes, [(0, 0), (0, 5), (2, 4)], length=5, context=2)
    # Episode 0, windows [0, 5) and [5, 10): positions 2-4 and 7-9 from episode 1.
    np.testing.assert_array_equal(out[0]["action"][:, 0], [0, 0, 1, 1, 1, 0, 0, 1, 1, 1])
    np.testing.assert_array_equal(out[1]["action"], actions[1])  # no window of its own
    # Episode 2, window [4, 9): positions 6-8 from episode 0 (cyclically next).
    np.testing.assert_array_equal(out[2]["action"][:, 0], [2, 2, 2, 2, 2, 2, 0, 0, 0, 2])
    np.testing.assert_array_equal(episodes[0]["action"], actions[0])  # the input is not changed
    with pytest.raises(transfer.TransferError, match="at least 2"):
        transfer.with_other_actions(episodes[:1], [(0, 0)], 5, 2)


def test_mean_frame_baseline_by_hand():
    train = [{"image": np.full((2, 4, 4, 3), 100, np.uint8)}, {"image": np.full((2, 4, 4, 3), 200, np.uint8)}]
    evaluation = [{"image": np.concatenate([np.zeros((2, 4, 4, 3), np.uint8), np.full((2, 4, 4, 3), 150, np.uint8)])}]
    assert transfer.mean_frame_mse(train, evaluation, [(0, 0)], 4, 2) == 0.0  # predicted frames 2, 3 only
    assert transfer.mean_frame_mse(train, evaluation, [(0, 0)], 4, 1) == pytest.approx((150 / 255) ** 2 / 3)


def test_transfer_input_errors():
    config = config_lib.load_config("configs/dreamerv2.py:tiny")
    short = constant_episodes(1, config.sequence_length - 1, 0, seed=0)
    good = constant_episodes(1, config.sequence_length, 0, seed=0)
    key = jax.random.key(0)
    with pytest.raises(transfer.TransferError, match="training episode 0 has"):
        transfer.world_model_transfer(config, None, short, good, 1, key)
    with pytest.raises(transfer.TransferError, match="context"):
        transfer.world_model_transfer(config, None, good, good, 1, key, context=config.sequence_length)
    with pytest.raises(transfer.TransferError, match="action must be"):
        transfer.world_model_transfer(config, None, [dict(good[0], action=good[0]["action"][:, :3])], good, 1, key)


def test_collect_random_episodes():
    episodes = transfer.collect_random_episodes("reach", count=2, length=3, seed=11)
    assert len(episodes) == 2
    for episode in episodes:
        assert episode["image"].shape == (4, 64, 64, 3) and episode["image"].dtype == np.uint8
        assert episode["action"].shape == (4, 4) and np.all(episode["action"][0] == 0)
        assert np.all(np.abs(episode["action"]) <= 1) and np.all(episode["action"][1:] != 0)
        assert episode["reward"][0] == 0 and episode["is_first"].tolist() == [True, False, False, False]
        assert np.any(episode["image"][0] != episode["image"][-1])  # the arm moved
    assert not np.array_equal(episodes[0]["action"], episodes[1]["action"])
    # Each action held for 3 control steps: 6 steps are 2 actions, drawn as the first 2 of a
    # stride-1 collection, and the frame after them is the one after 6 control steps.
    held = transfer.collect_random_episodes("reach", count=1, length=6, seed=11, size=16, action_repeat=3)
    plain = transfer.collect_random_episodes("reach", count=1, length=6, seed=11, size=16)
    assert held[0]["image"].shape == (3, 16, 16, 3) and held[0]["is_first"].tolist() == [True, False, False]
    np.testing.assert_array_equal(held[0]["action"], plain[0]["action"][:3])
    assert not np.array_equal(held[0]["image"][-1], plain[0]["image"][2])  # 6 control steps, not 2
    with pytest.raises(transfer.TransferError, match="divide length=6"):
        transfer.collect_random_episodes("reach", count=1, length=6, seed=11, action_repeat=4)


# ----------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------


def _cli():
    return config_lib.config_module(str(REPO / "experiments" / "diagnostics.py"))


def test_cli_table_and_bad_workdir(tmp_path, capsys):
    cli = _cli()
    probe_result = {
        "r2": [0.5, float("nan"), 0.25, 0.0],
        "r2_mean": 0.25,
        "train_pairs": 10,
        "eval_pairs": 5,
        "train_episodes": [0, 1],
        "eval_episodes": [2],
        "code_type": "stoch",
    }
    transfer_result = {
        "initial_mse": 0.02,
        "mse": 0.01,
        "initial_psnr": 16.99,
        "psnr": 20.0,
        "updates": 3,
        "context": 3,
        "eval_windows": 4,
        "method": "prelar",
        "config": "configs/prelar_finetune.py:tiny",
    }
    text = cli.format_markdown(
        {"task": "drawer-open", "probe": {"PreLAR pre-trained": probe_result}, "transfer": {"PreLAR": transfer_result}}
    )
    assert "| PreLAR pre-trained | 0.500 | n/a | 0.250 | 0.000 | 0.250 | 10 / 5 |" in text
    assert "| PreLAR | configs/prelar_finetune.py:tiny | 0.02000 | 0.01000 | 16.99 | 20.00 |" in text
    assert "hand's measured displacement" not in text  # probe episodes without the hand's position
    with_hand = cli.format_markdown(
        {"probe": {"PreLAR pre-trained": {**probe_result, "hand": {"r2": [0.7, 0.6, 0.8], "r2_mean": 0.7}}}}
    )
    assert "| PreLAR pre-trained | 0.700 | 0.600 | 0.800 | 0.700 |" in with_hand
    assert cli.json_safe({"a": [float("nan"), 1.0, float("inf")]}) == {"a": [None, 1.0, None]}
    with pytest.raises(SystemExit) as exit_info:
        cli.main([f"--pretrained={tmp_path / 'missing'}", f"--out={tmp_path / 'out'}"])
    assert exit_info.value.code == 2
    assert "config.json does not exist" in capsys.readouterr().err


def test_cli_runs_what_the_pretraining_has(tmp_path, monkeypatch):
    """An APV pre-training as --pretrained gets the transfer only (no implicit actions to probe),
    named by --label; --no_scratch leaves out the transfer from no pre-training; a PreLAR one is
    probed beside a random init."""
    cli = _cli()
    calls = []
    monkeypatch.setattr(cli, "_probe_episodes", lambda args, out: [])
    repeats, lengths = [], []
    monkeypatch.setattr(
        transfer,
        "collect_random_episodes",
        lambda *a, **k: repeats.append(k["action_repeat"]) or lengths.append(a[2]) or [],
    )

    def fake_probe(workdir, config, episodes, key, fraction, splits):
        calls.append(("probe", workdir, splits))
        return {"r2": [0.0] * 4, "r2_mean": 0.0, "train_pairs": 1, "eval_pairs": 1}

    def fake_transfer(config, workdir, train, evaluation, updates, key, context=None):
        calls.append(("transfer", config.method, workdir))
        return {"initial_mse": 0.02, "mse": 0.01, "seconds": 0.0}

    monkeypatch.setattr(probe, "implicit_action_probe", fake_probe)
    monkeypatch.setattr(transfer, "world_model_transfer", fake_transfer)
    monkeypatch.setattr(cli, "format_markdown", lambda results: "")
    monkeypatch.setattr("prelar_jax.envs.metaworld.check_rendering_backend", lambda: None)
    apv, prelar = tmp_path / "apv", tmp_path / "prelar"
    logger_lib.write_config(apv, pretrain_config("configs/apv_pretrain.py:tiny").to_dict())
    logger_lib.write_config(prelar, pretrain_config().to_dict())

    results = cli.run(
        cli.parse_args(
            [f"--pretrained={apv}", "--label=apv", "--no_scratch", f"--out={tmp_path / 'a'}", "--task=reach"]
        )
    )
    assert calls == [("transfer", "apv", str(apv))] and list(results["transfer"]) == ["apv"]
    assert "probe" not in results
    calls.clear()
    results = cli.run(cli.parse_args([f"--pretrained={prelar}", f"--out={tmp_path / 'p'}", "--task=reach"]))
    assert calls == [
        ("probe", str(prelar), 20),  # the R² averaged over 20 random episode splits
        ("probe", None, 20),
        ("transfer", "prelar", str(prelar)),
        ("transfer", "dreamerv2", None),
    ]
    assert list(results["probe"]) == ["PreLAR pre-trained", "random init"]
    assert list(results["transfer"]) == ["PreLAR", "scratch (DreamerV2)"]
    with pytest.raises(config_lib.ConfigError, match="APV pre-training and so is --apv_pretrained"):
        cli.run(cli.parse_args([f"--pretrained={apv}", f"--apv_pretrained={apv}", f"--out={tmp_path / 'x'}"]))
    # A pre-training on every 2nd frame: the transfer's random actions are held for 2 control steps.
    assert repeats == [1, 1, 1, 1]  # train and evaluation episodes of both runs above
    strided = tmp_path / "strided"
    strided_config = pretrain_config()
    strided_config.data.frame_stride = 2
    logger_lib.write_config(strided, strided_config.to_dict())
    cli.run(cli.parse_args([f"--pretrained={strided}", f"--out={tmp_path / 's'}", "--task=reach", "--skip_probe"]))
    assert repeats[4:] == [2, 2]
    # At stride 3 the default episode is the longest whole number of actions in time_limit 50.
    strided_config.data.frame_stride = 3
    logger_lib.write_config(tmp_path / "stride3", strided_config.to_dict())
    cli.run(cli.parse_args([f"--pretrained={tmp_path / 'stride3'}", f"--out={tmp_path / 't'}", "--skip_probe"]))
    assert repeats[6:] == [3, 3] and lengths[:4] == [50] * 4 and lengths[6:] == [48, 48]
