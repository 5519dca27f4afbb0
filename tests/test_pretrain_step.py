"""Pre-training loss, its gradient routing, the data-parallel step and the optimizer (tiny preset).

Compiling the tiny model's loss takes seconds on CPU, so each test compiles one function and
asserts as much as it can from it.
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from prelar_jax.runtime import parallel, steps
from prelar_jax.learners.pretrain import PretrainModel, TrainState, make_optimizer
from tests.model_helpers import glorot_params, init_params, load_config, random_batch

B, T = 4, 5
LOSS_METRICS = {"kl", "kl_loss", "image_loss", "prior_entropy", "post_entropy", "loss"}
CODE_METRICS = {"implicit_kl", "implicit_std", "code_norm"}
CONSISTENCY_METRICS = {"consistency", "consistency_sign", "state_distance", "action_distance"}


def _global_norm(tree) -> float:
    return float(optax.tree.norm(tree))


def _assert_finite(tree):
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        assert np.all(np.isfinite(np.asarray(leaf))), jax.tree_util.keystr(path)


# ----------------------------------------------------------------------------------------------
# The loss: value, metrics and where the consistency gradient goes
# ----------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_default_loss_metrics_and_consistency_gradient_routing():
    """Default config (consistency 'tanh'). The gradient of the consistency term alone (what the
    loss's gradient is with the kl/image/implicit_kl scales at 0) reaches only the implicit-action
    encoder; the released 'sign' value, computed from the same distances, has exactly zero gradient."""
    config = load_config("tiny")
    assert config.loss.consistency == "tanh" and config.implicit_action.code_type == "stoch"
    model = PretrainModel(config)
    params, stats = init_params("tiny")
    batch = random_batch(0, B, T)
    index = jnp.arange(B)

    def consistency_terms(p):
        total, (new_stats, metrics) = model.loss(p, stats, batch, jax.random.key(1), index)
        return jnp.stack([metrics["consistency"], metrics["consistency_sign"]]), (total, new_stats, metrics)

    jacobian, (total, new_stats, metrics) = jax.jit(jax.jacrev(consistency_terms, has_aux=True))(params)

    assert total.shape == () and np.isfinite(total)
    assert set(metrics) == LOSS_METRICS | CODE_METRICS | CONSISTENCY_METRICS
    _assert_finite(metrics)
    scales = config.loss
    np.testing.assert_allclose(
        total,
        scales.kl_scale * metrics["kl_loss"]
        + scales.image_scale * metrics["image_loss"]
        + scales.implicit_kl_scale * metrics["implicit_kl"]
        + scales.consistency_scale * metrics["consistency"],
        rtol=1e-6,
    )
    np.testing.assert_allclose(metrics["kl_loss"], metrics["kl"], rtol=1e-6)  # no free nats
    assert 0.0 <= metrics["consistency_sign"] <= 4.0
    assert 0.0 < metrics["implicit_std"] < 2.0
    # Training-mode BatchNorm updated the running statistics of every BN module.
    assert set(new_stats) == {"encoder", "decoder", "implicit_action"}
    for name in new_stats:
        assert _global_norm(jax.tree.map(lambda a, b: a - b, new_stats[name], stats[name])) > 0, name

    tanh_grad = jax.tree.map(lambda g: g[0], jacobian)
    sign_grad = jax.tree.map(lambda g: g[1], jacobian)
    _assert_finite(tanh_grad)
    assert _global_norm(tanh_grad["implicit_action"]) > 1e-6
    # Non-zero on the code head's output layer specifically.
    head = tanh_grad["implicit_action"]["MLP_0"]["Dense_1"]["kernel"]
    assert np.abs(np.asarray(head)).max() > 0
    for name in ("encoder", "decoder", "rssm"):  # d_s is stop-gradient: no world-model gradient
        assert _global_norm(tanh_grad[name]) == 0.0, name
    assert _global_norm(sign_grad) == 0.0  # the released loss trains nothing


def test_apv_configuration_has_no_implicit_action():
    config = load_config("tiny", **{"implicit_action.code_type": "none"})
    model = PretrainModel(config)
    assert model.implicit_action is None
    params, stats = glorot_params(model)
    assert set(params) == {"encoder", "decoder", "rssm"}
    assert "implicit_action" not in stats
    stoch = config.model.stoch * config.model.classes
    # APV's action-free model is fed fill_action zeros of size 50.
    assert params["rssm"]["img_in"]["kernel"].shape == (stoch + 50, config.model.hidden)
    total, (_, metrics) = jax.jit(model.loss)(params, stats, random_batch(1, B, T), jax.random.key(2), jnp.arange(B))
    assert np.isfinite(total)
    assert set(metrics) == LOSS_METRICS
    np.testing.assert_allclose(total, metrics["kl_loss"] + metrics["image_loss"], rtol=1e-6)


def _variant(code_type: str, source: str = "embed"):
    config = load_config("tiny", **{"implicit_action.code_type": code_type, "implicit_action.input": source})
    return config, PretrainModel(config)


def test_embed_input_mix_code_runs():
    """'embed' input (an MLP on the frame embeddings) with a 'mix' code ``[deter; stoch sample]``."""
    config, model = _variant("mix")
    params, stats = glorot_params(model)
    assert "ResNetEncoder_0" not in params["implicit_action"]
    assert "implicit_action" not in stats  # no BatchNorm without the pixel ResNet
    stoch = config.model.stoch * config.model.classes
    code_dim = config.implicit_action.deter + config.implicit_action.stoch
    assert params["rssm"]["img_in"]["kernel"].shape == (stoch + code_dim, config.model.hidden)
    total, (_, metrics) = jax.jit(model.loss)(params, stats, random_batch(2, B, T), jax.random.key(3), jnp.arange(B))
    assert np.isfinite(total)
    assert set(metrics) == LOSS_METRICS | CODE_METRICS | CONSISTENCY_METRICS
    _assert_finite(metrics)
    assert metrics["code_norm"] > 0 and metrics["action_distance"] > 0 and metrics["implicit_kl"] > 0


@pytest.mark.parametrize("source", ["pixels", "embed"])
def test_deter_code_traces(source):
    """'deter' codes (the w/o-AL&CL ablation): no KL to a prior; traced only (no compile)."""
    config, model = _variant("deter", source)
    params, stats = jax.eval_shape(model.init, jax.random.key(0))
    stoch = config.model.stoch * config.model.classes
    assert params["rssm"]["img_in"]["kernel"].shape == (stoch + config.implicit_action.deter, config.model.hidden)
    total, (_, metrics) = jax.eval_shape(
        lambda p, s: model.loss(p, s, random_batch(2, B, T), jax.random.key(3), jnp.arange(B)), params, stats
    )
    assert total.shape == () and total.dtype == jnp.float32
    assert set(metrics) == LOSS_METRICS | {"code_norm"} | CONSISTENCY_METRICS


def test_consistency_fixed_points_are_ties():
    """With one example every pair swaps a code with itself: d_s = d_a = 0 for all pairs, so every
    pair is a tie and both the tanh surrogate and the released sign loss should be 0."""
    _, model = _variant("stoch")
    params, stats = glorot_params(model)
    total, (_, metrics) = jax.jit(model.loss)(params, stats, random_batch(4, 1, T), jax.random.key(5), jnp.arange(1))
    assert metrics["action_distance"] == 0.0
    assert metrics["state_distance"] == 0.0
    assert metrics["consistency_sign"] == 0.0 and metrics["consistency"] == 0.0


def test_open_loop_returns_uint8_frames_causal_in_the_context():
    model = PretrainModel(load_config("tiny"))
    params, stats = init_params("tiny")
    batch = random_batch(3, 2, T)
    context = 3
    fn = jax.jit(model.open_loop, static_argnames="context")
    frames = np.asarray(fn(params, stats, batch, jax.random.key(4), context=context))
    assert frames.shape == (2, T, 64, 64, 3) and frames.dtype == np.uint8
    # The context frames are reconstructions of the observed frames: changing a later frame
    # cannot change them (BatchNorm in evaluation mode, causal codes), but it changes the
    # imagined frames through the code inferred from it.
    later = dict(batch, image=batch["image"].copy())
    later["image"][:, context:] = 255 - later["image"][:, context:]
    changed = np.asarray(fn(params, stats, later, jax.random.key(4), context=context))
    np.testing.assert_array_equal(changed[:, :context], frames[:, :context])
    assert np.any(changed[:, context:] != frames[:, context:])


# ----------------------------------------------------------------------------------------------
# Data parallelism: one update on 4 devices == one update on 1 device
# ----------------------------------------------------------------------------------------------


def _one_step(config, mesh, state_host, batch_host):
    model = PretrainModel(config, bn_axis_name=parallel.AXIS)
    optimizer = make_optimizer(config)
    parallel.check_batch_divides(batch_host["image"].shape[0], mesh)
    state = parallel.put_replicated(state_host, mesh)  # fresh buffers: the step donates them
    step = steps.make_pretrain_step(model.loss, optimizer, mesh, seed=config.seed)
    new_state, metrics = step(state, parallel.put_batch(batch_host, mesh))
    return jax.tree.map(np.asarray, new_state), jax.tree.map(np.asarray, metrics)


def _seed_with_fixed_point(batch_size: int) -> int:
    """A seed whose first-step permutation pairs some example with itself: the case where float
    noise in d_s used to make the consistency value depend on the device count. It re-derives
    the key as ``make_pretrain_step`` (fold in step 0) and ``PretrainModel.loss`` (third split) do."""
    for seed in range(100):
        key = jax.random.split(jax.random.fold_in(jax.random.key(seed), 0), 3)[2]
        if np.any(np.asarray(jax.random.permutation(key, batch_size)) == np.arange(batch_size)):
            return seed
    raise AssertionError("no permutation with a fixed point found")


@pytest.mark.slow
def test_four_device_step_equals_one_device_step(monkeypatch):
    assert len(jax.devices()) >= 4, "tests/conftest.py forces 4 CPU devices"
    # This checks the data-parallel step, so the convolutions run oneDNN's direct kernels, whose
    # weight gradients summed over a split batch differ from the whole batch's by ~3e-7 relative;
    # Winograd's differ by ~1.4e-6 (its own accuracy: tests/test_onednn_conv.py), and Adam's first
    # step turns such differences in near-zero gradient components into parameter differences of up
    # to lr, which this test's 1e-5 would not tell from a sharding bug.
    monkeypatch.setenv("PRELAR_CONV_ALGORITHM", "direct")
    config = load_config("tiny")
    config.seed = _seed_with_fixed_point(B)
    params, stats = init_params("tiny")
    optimizer = make_optimizer(config)
    state = TrainState(
        step=np.zeros((), np.int32),
        params=params,
        batch_stats=stats,
        opt_state=jax.tree.map(np.asarray, optimizer.init(params)),
    )
    batch = random_batch(5, B, T)
    one_state, one_metrics = _one_step(config, parallel.make_mesh(jax.devices()[:1]), state, batch)
    four_state, four_metrics = _one_step(config, parallel.make_mesh(jax.devices()[:4]), state, batch)

    assert int(one_state.step) == int(four_state.step) == 1
    assert _global_norm(jax.tree.map(lambda a, b: a - b, one_state.params, params)) > 0
    chex.assert_trees_all_close(four_state.params, one_state.params, rtol=1e-5, atol=1e-5)
    chex.assert_trees_all_close(four_state.batch_stats, one_state.batch_stats, rtol=1e-5, atol=1e-5)
    chex.assert_trees_all_close(four_state.opt_state, one_state.opt_state, rtol=1e-5, atol=1e-5)
    assert set(one_metrics) == LOSS_METRICS | CODE_METRICS | CONSISTENCY_METRICS | {"grad_norm", "nonfinite"}
    assert float(one_metrics["nonfinite"]) == 0.0
    for name in sorted(one_metrics):
        np.testing.assert_allclose(
            four_metrics[name], one_metrics[name], rtol=1e-5, atol=1e-5, err_msg=f"metric {name!r}"
        )


def test_batch_must_divide_over_devices():
    mesh = parallel.make_mesh(jax.devices()[:4])
    with pytest.raises(ValueError, match="multiple of 4"):
        parallel.check_batch_divides(6, mesh)
    parallel.check_batch_divides(8, mesh)  # no error
    parallel.check_batch_divides(3, parallel.make_mesh(jax.devices()[:1]))


# ----------------------------------------------------------------------------------------------
# Optimizer: the original torch Adam (spec section 4 and 12: coupled L2, clip first, eps 1e-5)
# ----------------------------------------------------------------------------------------------


def _torch_adam_reference(params, grads_per_step, lr, eps, clip, weight_decay):
    """float64 numpy transcription of ``clip_grad_norm_`` followed by ``torch.optim.Adam``."""
    params = {k: v.astype(np.float64) for k, v in params.items()}
    m = {k: np.zeros_like(v) for k, v in params.items()}
    v = {k: np.zeros_like(p) for k, p in params.items()}
    b1, b2 = 0.9, 0.999
    for step, grads in enumerate(grads_per_step, start=1):
        grads = {k: g.astype(np.float64) for k, g in grads.items()}
        norm = np.sqrt(sum((g**2).sum() for g in grads.values()))
        coef = min(clip / (norm + 1e-6), 1.0)  # torch.nn.utils.clip_grad_norm_
        for k in params:
            g = grads[k] * coef + weight_decay * params[k]  # Adam(weight_decay=...) is coupled L2
            m[k] = b1 * m[k] + (1 - b1) * g
            v[k] = b2 * v[k] + (1 - b2) * g**2
            denom = np.sqrt(v[k]) / np.sqrt(1 - b2**step) + eps
            params[k] = params[k] - lr / (1 - b1**step) * m[k] / denom
    return params


@pytest.mark.parametrize("clip", [0.5, 1e3])  # clipping active / inactive
def test_make_optimizer_equals_torch_adam(clip):
    config = load_config("tiny")
    config.optimizer.lr = 1e-2
    config.optimizer.eps = 1e-5
    config.optimizer.clip = clip
    config.optimizer.weight_decay = 0.05  # large, so its place in the chain matters
    rng = np.random.default_rng(6)
    # 'b' and its gradients are tiny, so that eps = 1e-5 (not 1e-8) matters in Adam's denominator.
    params = {
        "w": rng.standard_normal((3, 4)).astype(np.float32),
        "b": (1e-4 * rng.standard_normal((4,))).astype(np.float32),
    }
    grads_per_step = [
        {
            "w": rng.standard_normal((3, 4)).astype(np.float32),
            "b": (1e-5 * rng.standard_normal((4,))).astype(np.float32),
        }
        for _ in range(4)
    ]
    optimizer = make_optimizer(config)
    state = optimizer.init(params)
    current = jax.tree.map(jnp.asarray, params)
    for grads in grads_per_step:
        updates, state = optimizer.update(grads, state, current)
        current = optax.apply_updates(current, updates)
    expected = _torch_adam_reference(params, grads_per_step, 1e-2, 1e-5, clip, 0.05)
    for name in params:
        np.testing.assert_allclose(current[name], expected[name], rtol=1e-5, atol=1e-6)
    assert np.abs(np.asarray(current["w"]) - params["w"]).max() > 1e-3


def test_random_code_ablation_draws_prior_codes_unrelated_to_the_frames():
    config = load_config("tiny", **{"implicit_action.code_type": "random", "loss.consistency": "off"})
    model = PretrainModel(config)
    assert model.implicit_action is None and model.action_dim == config.implicit_action.stoch
    embed = np.zeros((64, 5, 7), np.float32)
    keys = jax.random.split(jax.random.key(0), 64 * 4).reshape(64, 4)
    code_params, actions = model._codes({}, {}, {}, None, embed, keys, True)
    _, same = model._codes({}, {}, {}, None, embed + 1.0, keys, True)
    _, other = model._codes({}, {}, {}, None, embed, jax.random.split(jax.random.key(1), 256).reshape(64, 4), True)
    assert code_params == {} and actions.shape == (64, 5, model.action_dim)
    np.testing.assert_array_equal(actions[:, 0], 0.0)  # a_0 = 0, Dreamer convention
    np.testing.assert_array_equal(actions, same)  # independent of the frames
    assert not np.allclose(actions, other)
    std = float(np.std(np.asarray(actions[:, 1:])))
    assert abs(std - config.implicit_action.prior_std) < 0.05 * config.implicit_action.prior_std


@pytest.mark.slow
def test_implicit_kl_free_nats_and_prior_image_loss():
    """``loss.implicit_kl_free``: below it the implicit-action KL costs its free value and has no
    gradient (above it, the usual one). ``loss.prior_image_scale``: the one-step prior's image
    loss enters the total at its scale and trains the code encoder and the RSSM through it."""
    params, stats = init_params("tiny")
    batch = random_batch(0, B, T)
    index = jnp.arange(B)

    def run(**overrides):
        config = load_config("tiny", **{"loss.consistency": "off", **overrides})
        model = PretrainModel(config)

        def loss(p):
            total, (_, metrics) = model.loss(p, stats, batch, jax.random.key(1), index)
            return total, metrics

        (total, metrics), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
        return config.loss, total, metrics, grads

    # Only the implicit KL: free nats far above its value leave no gradient at all.
    only_kl = {"loss.kl_scale": 0.0, "loss.image_scale": 0.0}
    _, total, metrics, grads = run(**only_kl)
    np.testing.assert_allclose(total, metrics["implicit_kl"], rtol=1e-6)
    assert _global_norm(grads["implicit_action"]) > 1e-3
    _, total, metrics, grads = run(**only_kl, **{"loss.implicit_kl_free": 1e4})
    np.testing.assert_allclose(total, 1e4, rtol=1e-6)
    assert _global_norm(grads) == 0.0

    scales, total, metrics, grads = run(**{"loss.prior_image_scale": 0.5})
    assert metrics["prior_image_loss"] > 0
    np.testing.assert_allclose(
        total,
        scales.kl_scale * metrics["kl_loss"]
        + scales.image_scale * metrics["image_loss"]
        + scales.implicit_kl_scale * metrics["implicit_kl"]
        + 0.5 * metrics["prior_image_loss"],
        rtol=1e-6,
    )
    _, _, _, prior_only = run(
        **{"loss.prior_image_scale": 1.0, "loss.kl_scale": 0.0, "loss.image_scale": 0.0, "loss.implicit_kl_scale": 0.0}
    )
    for name in ("implicit_action", "rssm", "decoder", "encoder"):
        assert _global_norm(prior_only[name]) > 0, name


@pytest.mark.slow
def test_implicit_kl_warmup_ramps_the_scale_with_the_update_count():
    """``loss.implicit_kl_warmup``: the code KL's scale is step / warmup, capped at 1, with the
    step that ``make_pretrain_step`` passes in the batch; without a step (direct calls) it is 1."""
    params, stats = init_params("tiny")
    config = load_config(
        "tiny",
        **{"loss.consistency": "off", "loss.kl_scale": 0.0, "loss.image_scale": 0.0, "loss.implicit_kl_warmup": 100},
    )
    model = PretrainModel(config)
    batch = random_batch(0, B, T)
    loss = jax.jit(lambda batch: model.loss(params, stats, batch, jax.random.key(1), jnp.arange(B)))
    totals = {step: loss({**batch, "step": jnp.int32(step)}) for step in (0, 50, 200)}
    implicit_kl = totals[0][1][1]["implicit_kl"]
    for step, expected in ((0, 0.0), (50, 0.5), (200, 1.0)):
        np.testing.assert_allclose(totals[step][0], expected * implicit_kl, rtol=1e-6, atol=1e-7)
    total, (_, metrics) = model.loss(params, stats, batch, jax.random.key(1), jnp.arange(B))
    np.testing.assert_allclose(total, metrics["implicit_kl"], rtol=1e-6)


@pytest.mark.slow
def test_code_forward_loss_trains_only_the_code_network_and_its_forward_model(space="pixels"):
    """``loss.code_forward_scale``: a forward model predicts ``x_t`` (frame or embedding) from
    ``x_{t-1}`` and the code; its loss is the fraction of the change left unexplained, so a model
    that predicts "no change" scores exactly 1 (checked by zeroing its output layer). It trains the
    code network and itself only: encoder, RSSM and decoder get no gradient from it."""
    config = load_config(
        "tiny",
        **{
            "loss.consistency": "off",
            "loss.kl_scale": 0.0,
            "loss.image_scale": 0.0,
            "loss.implicit_kl_scale": 0.0,
            "loss.code_forward_scale": 2.0,
            "loss.code_forward_space": space,
        },
    )
    model = PretrainModel(config)
    params, stats = model.init(jax.random.key(0))
    assert "code_forward" in params and "code_forward" not in init_params("tiny")[0]  # off by default
    batch = random_batch(0, B, T)

    def loss(p):
        total, (_, metrics) = model.loss(p, stats, batch, jax.random.key(1), jnp.arange(B))
        return total, metrics

    (total, metrics), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
    np.testing.assert_allclose(total, 2.0 * metrics["code_forward_loss"], rtol=1e-6)
    for name in ("implicit_action", "code_forward"):
        assert _global_norm(grads[name]) > 0, name
    for name in ("encoder", "rssm", "decoder"):
        assert _global_norm(grads[name]) == 0.0, name
    # The output layer zeroed: the prediction is x_{t-1}, which explains none of the change.
    last = sorted(params["code_forward"], key=lambda k: int(k.split("_")[-1]))[-1]  # Conv_<last>
    zeroed = jax.tree.map(lambda x: x, params)
    head = zeroed["code_forward"][last]
    for leaf in head:
        head[leaf] = jnp.zeros_like(head[leaf])
    _, still = jax.jit(loss)(zeroed)
    np.testing.assert_allclose(still["code_forward_loss"], 1.0, rtol=1e-5)
