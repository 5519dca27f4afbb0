"""Network shapes at paper sizes (``jax.eval_shape``, no compute), parameter initialisation, the
DreamerV2 GRU cell and the distribution helpers, each against an independent reference."""

from __future__ import annotations

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.stats

from prelar_jax.model import distributions
from prelar_jax.model.nets.implicit_action import ImplicitActionEncoder, code_from_params
from prelar_jax.model.nets.plaincnn import PlainDecoder, PlainEncoder
from prelar_jax.model.nets.resnet import ResNetDecoder, ResNetEncoder
from prelar_jax.model.nets.rssm import RSSM, LayerNormGRUCell, feature
from prelar_jax.learners.pretrain import PretrainModel
from tests.model_helpers import init_params, load_config

# Parameter initialisation only; an RBG key compiles Flax's initialisers much faster on CPU.
KEY = jax.random.key(0, impl="unsafe_rbg")
N = 2  # batch rows for shape checks


def _shape_dtype(shape, dtype=jnp.float32):
    return jax.ShapeDtypeStruct(shape, dtype)


def _init_and_apply_shapes(module, *args, **kwargs):
    """(variables, output) shapes of ``module.init`` and ``module.apply``, without computing."""
    variables = jax.eval_shape(lambda *a: module.init(KEY, *a, **kwargs), *args)
    out = jax.eval_shape(lambda v, *a: module.apply(v, *a, **kwargs), variables, *args)
    return variables, out


def _all_leaves_dtype(tree, dtype) -> bool:
    return all(leaf.dtype == dtype for leaf in jax.tree.leaves(tree))


# ----------------------------------------------------------------------------------------------
# Paper-size shapes (spec sections 1-3)
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("channels", [3, 6])
def test_resnet_encoder_paper_shape(channels):
    variables, out = _init_and_apply_shapes(ResNetEncoder(48, 3), _shape_dtype((N, 64, 64, channels)), train=False)
    assert out.shape == (N, 3072) and out.dtype == jnp.float32
    assert variables["params"]["Conv_0"]["kernel"].shape == (3, 3, channels, 48)
    assert "batch_stats" in variables


def test_resnet_decoder_paper_shape():
    variables, out = _init_and_apply_shapes(ResNetDecoder(48, 3), _shape_dtype((N, 2048)), train=False)
    assert out.shape == (N, 64, 64, 3) and out.dtype == jnp.float32
    assert variables["params"]["Dense_0"]["kernel"].shape == (2048, 3072)  # 4x4x192


def test_plain_encoder_decoder_paper_shapes():
    enc_vars, embed = _init_and_apply_shapes(PlainEncoder(48), _shape_dtype((N, 64, 64, 3)))
    assert embed.shape == (N, 1536)
    assert "batch_stats" not in enc_vars
    _, image = _init_and_apply_shapes(PlainDecoder(48), _shape_dtype((N, 2048)))
    assert image.shape == (N, 64, 64, 3) and image.dtype == jnp.float32


def _rssm_paper_inputs(action_dim=64, embed_dim=3072):
    state = {"logit": _shape_dtype((N, 32, 32)), "stoch": _shape_dtype((N, 32, 32)), "deter": _shape_dtype((N, 1024))}
    return state, _shape_dtype((N, action_dim)), _shape_dtype((N, embed_dim)), _shape_dtype((N,), jnp.bool_)


def _assert_state_shapes(state, batch=N):
    assert state["logit"].shape == (batch, 32, 32) and state["logit"].dtype == jnp.float32
    assert state["stoch"].shape == (batch, 32, 32) and state["stoch"].dtype == jnp.float32
    assert state["deter"].shape == (batch, 1024) and state["deter"].dtype == jnp.float32


def test_rssm_paper_shapes():
    rssm = RSSM(1024, 1024, 32, 32)
    state, action, embed, first = _rssm_paper_inputs()
    keys = jax.ShapeDtypeStruct((N,), jax.random.key(0).dtype)
    variables = jax.eval_shape(lambda *a: rssm.init(KEY, *a), state, action, embed, first)
    params = variables["params"]
    assert params["img_in"]["kernel"].shape == (1024 + 64, 1024)
    assert params["gru"]["Dense_0"]["kernel"].shape == (2048, 3072)
    assert params["gru"]["LayerNorm_0"]["scale"].shape == (3072,)  # one LayerNorm over 3 * deter
    assert params["img_logits"]["kernel"].shape == (1024, 32 * 32)
    assert params["obs_out"]["kernel"].shape == (1024 + 3072, 1024)
    post, prior = jax.eval_shape(
        lambda v, *a: rssm.apply(v, *a, method=RSSM.obs_step), variables, state, action, embed, first, keys
    )
    _assert_state_shapes(post)
    _assert_state_shapes(prior)
    img = jax.eval_shape(lambda v, *a: rssm.apply(v, *a, method=RSSM.img_step), variables, state, action, keys)
    _assert_state_shapes(img)
    assert jax.eval_shape(feature, post).shape == (N, 2048)
    initial = jax.eval_shape(lambda: rssm.initial(N))
    _assert_state_shapes(initial)


@pytest.mark.parametrize(
    "code_type, expected",
    [
        ("stoch", {"mean": (N, 64), "std": (N, 64)}),
        ("deter", {"deter": (N, 64)}),
        ("mix", {"deter": (N, 64), "mean": (N, 64), "std": (N, 64)}),
    ],
)
@pytest.mark.parametrize("source", ["pixels", "embed"])
def test_implicit_action_paper_shapes(code_type, expected, source):
    module = ImplicitActionEncoder(code_type, input=source)
    pair = _shape_dtype((N, 64, 64, 3)) if source == "pixels" else _shape_dtype((N, 3072))
    variables, out = _init_and_apply_shapes(module, pair, pair, train=False)
    assert {k: v.shape for k, v in out.items()} == expected
    code = jax.eval_shape(code_from_params, out, jax.ShapeDtypeStruct((N,), jax.random.key(0).dtype))
    assert code.shape == (N, sum(v[1] for k, v in expected.items() if k != "std"))
    if source == "pixels":  # the released VANet: its own ResNet on 6 stacked channels
        first_conv = variables["params"]["ResNetEncoder_0"]["Conv_0"]["kernel"]
        assert first_conv.shape == (3, 3, 6, 48)
    else:
        assert "ResNetEncoder_0" not in variables["params"]


def test_implicit_action_rejects_none_code_type():
    pair = jnp.zeros((N, 8))
    with pytest.raises(ValueError, match="code_type"):
        ImplicitActionEncoder("none", input="embed").init(KEY, pair, pair, train=False)


def test_bfloat16_compute_keeps_float32_params():
    config = load_config("paper", **{"model.compute_dtype": "bfloat16"})
    model = PretrainModel(config)
    params, stats = jax.eval_shape(model.init, KEY)
    assert set(params) == {"encoder", "decoder", "rssm", "implicit_action"}
    assert _all_leaves_dtype(params, jnp.float32) and _all_leaves_dtype(stats, jnp.float32)
    # The computation itself runs in bfloat16; the decoder's image mean and the RSSM logits are
    # returned in float32 for the losses.
    frames = _shape_dtype((N, 64, 64, 3))
    embed = jax.eval_shape(
        lambda p, s, x: model.encoder.apply({"params": p, "batch_stats": s}, x, train=False),
        params["encoder"],
        stats["encoder"],
        frames,
    )
    assert embed.dtype == jnp.bfloat16 and embed.shape == (N, 3072)
    image = jax.eval_shape(
        lambda p, s, f: model.decoder.apply({"params": p, "batch_stats": s}, f, train=False),
        params["decoder"],
        stats["decoder"],
        _shape_dtype((N, 2048)),
    )
    assert image.dtype == jnp.float32
    state, action, embed_in, first = _rssm_paper_inputs()
    post, _ = jax.eval_shape(
        lambda p, *a: model.rssm.apply({"params": p}, *a), params["rssm"], state, action, embed_in, first
    )
    assert post["logit"].dtype == jnp.float32 and post["deter"].dtype == jnp.float32


# ----------------------------------------------------------------------------------------------
# Initialisation (spec section 0: xavier_uniform kernels, zero biases, norms at gamma=1, beta=0)
# ----------------------------------------------------------------------------------------------


def _glorot_bound(shape) -> float:
    fan_in = int(np.prod(shape[:-1]))  # receptive field x input channels
    fan_out = int(np.prod(shape[:-2])) * shape[-1]  # receptive field x output channels
    return float(np.sqrt(6.0 / (fan_in + fan_out)))


def test_initialisation_glorot_kernels_zero_biases_unit_norms():
    params, stats = init_params("tiny")
    assert set(params) == {"encoder", "decoder", "rssm", "implicit_action"}
    kernels = []
    counts = {"kernel": 0, "bias": 0, "scale": 0}
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        name = path[-1].key
        counts[name] += 1
        where = jax.tree_util.keystr(path)
        if name == "kernel":
            bound = _glorot_bound(leaf.shape)
            assert np.abs(leaf).max() <= bound * (1 + 1e-6), where
            if leaf.size >= 500:  # a uniform sample this large reaches close to its bound
                assert np.abs(leaf).max() >= 0.95 * bound, where
            kernels.append(leaf)
        elif name == "bias":
            assert np.all(leaf == 0.0), where
        else:  # LayerNorm / BatchNorm scale
            assert np.all(leaf == 1.0), where
    assert counts["kernel"] > 20 and counts["scale"] > 10
    for path, leaf in jax.tree_util.tree_flatten_with_path(stats)[0]:
        expected = 0.0 if path[-1].key == "mean" else 1.0
        assert np.all(leaf == expected), jax.tree_util.keystr(path)

    big = max(kernels, key=lambda k: k.size)  # the decoder's input layer in the tiny preset
    bound = _glorot_bound(big.shape)
    assert big.size > 20_000
    values = big.reshape(-1).astype(np.float64)
    np.testing.assert_allclose(values.var(), bound**2 / 3.0, rtol=0.03)  # = 2 / (fan_in + fan_out)
    assert abs(values.mean()) < 0.01 * bound
    assert scipy.stats.kstest(values, scipy.stats.uniform(-bound, 2 * bound).cdf).pvalue > 1e-3


# ----------------------------------------------------------------------------------------------
# The DreamerV2 layer-normed GRU (spec 1.2) against float64 numpy
# ----------------------------------------------------------------------------------------------


def _sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def test_gru_cell_matches_float64_reference():
    size, inputs, batch = 6, 5, 4
    rng = np.random.default_rng(0)
    x = rng.standard_normal((batch, inputs)).astype(np.float32)
    h = rng.uniform(-1, 1, (batch, size)).astype(np.float32)
    cell = LayerNormGRUCell(size)
    params = cell.init(KEY, jnp.asarray(x), jnp.asarray(h))["params"]
    # Non-trivial values for every parameter, so that each one's role is tested.
    params = jax.tree.map(lambda p: np.asarray(rng.standard_normal(p.shape), np.float32), params)
    params["LayerNorm_0"]["scale"] = np.abs(params["LayerNorm_0"]["scale"]) + 0.5
    out = np.asarray(cell.apply({"params": params}, jnp.asarray(x), jnp.asarray(h)))

    w = params["Dense_0"]["kernel"].astype(np.float64)
    b = params["Dense_0"]["bias"].astype(np.float64)
    gamma = params["LayerNorm_0"]["scale"].astype(np.float64)
    beta = params["LayerNorm_0"]["bias"].astype(np.float64)
    h64 = h.astype(np.float64)
    parts = np.concatenate([x.astype(np.float64), h64], -1) @ w + b  # [B, 3 * size]
    mu, var = parts.mean(-1, keepdims=True), parts.var(-1, keepdims=True)
    parts = (parts - mu) / np.sqrt(var + 1e-3) * gamma + beta  # one LayerNorm over all 3 * size
    reset, cand, update = parts[:, :size], parts[:, size : 2 * size], parts[:, 2 * size :]
    reset = _sigmoid(reset)
    cand = np.tanh(reset * cand)  # the reset gate scales the whole candidate
    update = _sigmoid(update - 1.0)
    expected = update * cand + (1.0 - update) * h64
    assert out.dtype == np.float32 and out.shape == (batch, size)
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------------------------
# Implicit-action head: split order and std transform against float64 numpy (embed input)
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("code_type", ["stoch", "deter", "mix"])
def test_implicit_action_head_matches_float64_reference(code_type):
    stoch, deter, hidden, embed = 3, 2, 8, 5
    module = ImplicitActionEncoder(code_type, stoch=stoch, deter=deter, hidden=hidden, input="embed", embed_layers=2)
    rng = np.random.default_rng(1)
    prev = rng.standard_normal((4, embed)).astype(np.float32)
    curr = rng.standard_normal((4, embed)).astype(np.float32)
    params = module.init(KEY, prev, curr, train=False)["params"]["MLP_0"]
    params = jax.tree.map(lambda p: np.asarray(0.5 * rng.standard_normal(p.shape), np.float32), params)
    out = module.apply({"params": {"MLP_0": params}}, prev, curr, train=False)

    x = np.concatenate([prev, curr], -1).astype(np.float64)  # order (o_{t-1}, o_t)
    elu = lambda v: np.where(v > 0, v, np.expm1(np.minimum(v, 0)))
    dense = lambda v, name: v @ params[name]["kernel"].astype(np.float64) + params[name]["bias"]
    head = dense(elu(dense(elu(dense(x, "Dense_0")), "Dense_1")), "Dense_2")
    if code_type in ("deter", "mix"):
        np.testing.assert_allclose(out["deter"], head[:, :deter], rtol=1e-5, atol=1e-4)
        head = head[:, deter:]
    if code_type in ("stoch", "mix"):
        mean, raw = head[:, :stoch], head[:, stoch:]
        np.testing.assert_allclose(out["mean"], mean, rtol=1e-5, atol=1e-4)
        np.testing.assert_allclose(out["std"], 2.0 * _sigmoid(raw / 2.0), rtol=1e-5, atol=1e-6)
        assert np.all((np.asarray(out["std"]) > 0) & (np.asarray(out["std"]) < 2))
        # The code is the reparameterised sample mean + std * eps; without keys it is the mean.
        np.testing.assert_array_equal(code_from_params(out, None)[:, -stoch:], out["mean"])
    assert set(out) == {"stoch": {"mean", "std"}, "deter": {"deter"}, "mix": {"deter", "mean", "std"}}[code_type]


@pytest.mark.parametrize("source", ["pixels", "embed"])
def test_implicit_action_zero_head_init_starts_at_zero_and_can_grow(source):
    """head_init_scale 0: every code starts at mean 0 (std 2 sigmoid(0) = 1) whatever the frames,
    the layers below are initialised as usual, and the output layer still gets a gradient (so the
    code grows where a loss asks it to); scale 0.5 halves the original's initial kernel."""
    rng = np.random.default_rng(2)
    shape = (4, 16, 16, 3) if source == "pixels" else (4, 6)
    prev, curr = (jnp.asarray(rng.standard_normal(shape), jnp.float32) for _ in range(2))
    kwargs = dict(stoch=3, deter=2, hidden=8, input=source, depth=4, stages=2)
    zero, original, half = (ImplicitActionEncoder("mix", head_init_scale=s, **kwargs) for s in (0.0, 1.0, 0.5))
    variables = zero.init(KEY, prev, curr, train=False)
    out = zero.apply(variables, prev, curr, train=False)
    np.testing.assert_array_equal(out["mean"], 0.0)
    np.testing.assert_array_equal(out["deter"], 0.0)
    np.testing.assert_allclose(out["std"], 1.0, rtol=1e-6)
    reference = original.init(KEY, prev, curr, train=False)
    head = lambda v: v["params"]["MLP_0"][f"Dense_{1 if source == 'pixels' else 2}"]["kernel"]
    assert np.abs(np.asarray(head(reference))).max() > 0
    np.testing.assert_allclose(head(half.init(KEY, prev, curr, train=False)), 0.5 * head(reference), rtol=1e-6)
    hidden_layer = lambda v: v["params"]["MLP_0"]["Dense_0"]["kernel"]
    np.testing.assert_array_equal(hidden_layer(variables), hidden_layer(reference))

    def loss(params):
        code = zero.apply({**variables, "params": params}, prev, curr, train=False)
        return jnp.sum(code["mean"] * jnp.arange(3.0)) + jnp.sum(code["deter"])

    grads = jax.grad(loss)(variables["params"])
    assert np.abs(np.asarray(head({"params": grads}))).max() > 0


def test_code_from_params_samples_per_row_keys():
    mean = jnp.asarray(np.random.default_rng(2).standard_normal((3, 4)), jnp.float32)
    std = jnp.full((3, 4), 0.5)
    keys = jax.random.split(jax.random.key(3), 3)
    code = code_from_params({"mean": mean, "std": std}, keys)
    eps = jnp.stack([jax.random.normal(k, (4,)) for k in keys])
    np.testing.assert_allclose(code, mean + std * eps, rtol=1e-6, atol=1e-6)
    # Row 1's sample depends on row 1's key only.
    np.testing.assert_array_equal(code_from_params({"mean": mean[1:2], "std": std[1:2]}, keys[1:2]), code[1:2])


# ----------------------------------------------------------------------------------------------
# Straight-through categorical sampling
# ----------------------------------------------------------------------------------------------


def _softmax64(logits):
    logits = np.asarray(logits, np.float64)
    e = np.exp(logits - logits.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def _log_softmax64(logits):
    logits = np.asarray(logits, np.float64)
    shifted = logits - logits.max(-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))


def test_straight_through_forward_is_exactly_one_hot():
    """``(sample + probs) - sg(probs)`` rounds some 1s to 0.99999994 in float32; adding the
    bracketed ``(probs - sg(probs))`` keeps the forward value exact."""
    logits = 2.0 * jax.random.normal(jax.random.key(1), (500, 32))
    sample = np.asarray(distributions.straight_through_sample(jax.random.key(2), logits))
    assert set(np.unique(sample)) <= {0.0, 1.0}
    np.testing.assert_array_equal(sample.sum(-1), 1.0)


def test_straight_through_sample_is_one_hot_and_matches_softmax_frequencies():
    logits = jnp.asarray([1.0, -0.5, 0.0, 2.0, -3.0], jnp.float32)
    count = 20_000
    keys = jax.random.split(jax.random.key(4), count)  # one key per row, as the RSSM samples
    samples = np.asarray(jax.vmap(distributions.straight_through_sample, (0, None))(keys, logits))
    hard = np.eye(5)[samples.argmax(-1)]
    np.testing.assert_allclose(samples, hard, atol=1e-6)  # one-hot up to float32 rounding
    probs = _softmax64(logits)
    freq = hard.mean(0)
    stderr = np.sqrt(probs * (1 - probs) / count)
    assert np.all(np.abs(freq - probs) < 5 * stderr + 1e-4), (freq, probs)


def test_straight_through_gradient_is_softmax_gradient():
    rng = np.random.default_rng(5)
    logits = jnp.asarray(rng.standard_normal((6, 4, 5)), jnp.float32)
    weights = jnp.asarray(rng.standard_normal((6, 4, 5)), jnp.float32)
    key = jax.random.key(6)
    grad_st = jax.grad(lambda z: jnp.sum(weights * distributions.straight_through_sample(key, z)))(logits)
    grad_soft = jax.grad(lambda z: jnp.sum(weights * jax.nn.softmax(z, -1)))(logits)
    np.testing.assert_allclose(grad_st, grad_soft, rtol=1e-5, atol=1e-7)
    assert np.abs(np.asarray(grad_st)).max() > 1e-3


def test_categorical_mode_is_argmax():
    logits = jnp.asarray([[0.1, 3.0, -1.0], [2.0, 0.0, 1.0]])
    np.testing.assert_array_equal(distributions.categorical_mode(logits), [[0, 1, 0], [1, 0, 0]])


# ----------------------------------------------------------------------------------------------
# Categorical KL and KL balancing (spec 1.4)
# ----------------------------------------------------------------------------------------------


def _kl64(lhs_logits, rhs_logits):
    """KL(Cat(lhs) || Cat(rhs)) summed over the last two axes, float64."""
    log_q, log_p = _log_softmax64(lhs_logits), _log_softmax64(rhs_logits)
    return (np.exp(log_q) * (log_q - log_p)).sum((-2, -1))


def _random_logits(seed, shape, scale=3.0):
    return np.asarray(scale * np.random.default_rng(seed).standard_normal(shape), np.float32)


def test_categorical_kl_matches_float64():
    lhs, rhs = _random_logits(7, (3, 4, 6, 5)), _random_logits(8, (3, 4, 6, 5))
    rhs[0, 0, 0] += 40.0  # large logits stay finite and accurate (log-softmax, not log(softmax))
    out = distributions.categorical_kl(lhs, rhs)
    assert out.shape == (3, 4) and out.dtype == jnp.float32
    np.testing.assert_allclose(out, _kl64(lhs, rhs), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(distributions.categorical_kl(lhs, lhs), 0.0, atol=1e-5)


def test_balanced_kl_loss_value_and_gradients():
    shape = (2, 3, 4, 5)  # [B, T, groups, classes]
    post, prior = _random_logits(9, shape), _random_logits(10, shape)
    loss, value = distributions.balanced_kl_loss(post, prior, balance=0.8, free=0.0)
    mean_kl = _kl64(post, prior).mean()
    np.testing.assert_allclose(loss, mean_kl, rtol=1e-5)  # 0.2 * KL + 0.8 * KL
    np.testing.assert_allclose(value, mean_kl, rtol=1e-5)

    grad_post, grad_prior = jax.grad(lambda q, p: distributions.balanced_kl_loss(q, p, 0.8, 0.0)[0], argnums=(0, 1))(
        post, prior
    )
    # Closed-form gradients of mean_{b,t} KL(softmax(a) || softmax(b)) in float64:
    #   d/da_j = q_j (log q_j - log p_j - KL) / (B T),   d/db_j = (p_j - q_j) / (B T).
    log_q, log_p = _log_softmax64(post), _log_softmax64(prior)
    q, p = np.exp(log_q), np.exp(log_p)
    per_group_kl = (q * (log_q - log_p)).sum(-1, keepdims=True)
    steps = shape[0] * shape[1]
    d_post = q * (log_q - log_p - per_group_kl) / steps
    d_prior = (p - q) / steps
    np.testing.assert_allclose(grad_post, 0.2 * d_post, rtol=1e-4, atol=1e-7)  # KL(q || sg p)
    np.testing.assert_allclose(grad_prior, 0.8 * d_prior, rtol=1e-4, atol=1e-7)  # KL(sg q || p)


def test_balanced_kl_free_nats_clamp():
    shape = (2, 3, 4, 5)
    post, prior = _random_logits(11, shape, 0.3), _random_logits(12, shape, 0.3)
    mean_kl = _kl64(post, prior).mean()
    free = float(mean_kl) + 1.0  # above the KL: both terms clamp
    fn = lambda q, p: distributions.balanced_kl_loss(q, p, 0.8, free)
    loss, value = fn(post, prior)
    np.testing.assert_allclose(loss, free, rtol=1e-6)
    np.testing.assert_allclose(value, mean_kl, rtol=1e-5)  # the logged KL is not clamped
    grads = jax.grad(lambda q, p: fn(q, p)[0], argnums=(0, 1))(post, prior)
    for g in grads:
        np.testing.assert_array_equal(g, 0.0)
    below = float(mean_kl) / 2  # below the KL: no effect
    np.testing.assert_allclose(distributions.balanced_kl_loss(post, prior, 0.8, below)[0], mean_kl, rtol=1e-5)


# ----------------------------------------------------------------------------------------------
# Diagonal Gaussian KL (spec 3.7)
# ----------------------------------------------------------------------------------------------


def test_gaussian_kl_against_sigmoid2_prior_closed_form():
    s0 = 2.0 / (1.0 + np.exp(-0.5))  # the original prior: raw std 1 through sigmoid2
    assert abs(s0 - 1.2449186624037092) < 1e-12
    np.testing.assert_allclose(distributions.sigmoid2(jnp.float32(1.0)), s0, rtol=1e-6)
    np.testing.assert_allclose(distributions.sigmoid2(jnp.float32(0.0)), 1.0, rtol=1e-7)
    assert load_config("tiny").implicit_action.prior_std == pytest.approx(s0, abs=1e-12)
    rng = np.random.default_rng(13)
    mu = rng.standard_normal((5, 64)) * 1.5
    sigma = rng.uniform(0.05, 1.99, (5, 64))
    out = distributions.gaussian_kl(mu.astype(np.float32), sigma.astype(np.float32), 0.0, s0)
    expected = (np.log(s0 / sigma) + (sigma**2 + mu**2) / (2 * s0**2) - 0.5).sum(-1)
    assert out.shape == (5,)
    np.testing.assert_allclose(out, expected, rtol=1e-5)


def test_gaussian_kl_between_two_gaussians():
    rng = np.random.default_rng(14)
    mu_a, mu_b = rng.standard_normal((2, 3, 8))
    sd_a, sd_b = rng.uniform(0.1, 2.0, (2, 3, 8))
    out = distributions.gaussian_kl(*(np.float32(v) for v in (mu_a, sd_a, mu_b, sd_b)))
    expected = (np.log(sd_b / sd_a) + (sd_a**2 + (mu_a - mu_b) ** 2) / (2 * sd_b**2) - 0.5).sum(-1)
    np.testing.assert_allclose(out, expected, rtol=1e-5)
    np.testing.assert_allclose(distributions.gaussian_kl(mu_a, sd_a, mu_a, sd_a), 0.0, atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("module_class, shape", [(ResNetEncoder, (6, 32, 32, 3)), (ResNetDecoder, (6, 40))])
def test_remat_resnet_same_parameters_gradients_and_statistics(module_class, shape):
    """``remat`` only trades memory for compute: same parameter tree, outputs, gradients and
    BatchNorm statistics as the plain network."""
    kwargs = {"image_size": 32} if module_class is ResNetDecoder else {}
    plain = module_class(depth=4, stages=2, **kwargs)
    remat = module_class(depth=4, stages=2, remat=True, **kwargs)
    x = jnp.asarray(np.random.default_rng(0).uniform(-0.5, 0.5, shape), jnp.float32)
    variables = plain.init(KEY, x, train=False)
    assert jax.tree.structure(variables) == jax.tree.structure(remat.init(KEY, x, train=False))

    def loss(params, module):
        out, stats = module.apply(
            {"params": params, "batch_stats": variables["batch_stats"]}, x, train=True, mutable=["batch_stats"]
        )
        return jnp.sum(jnp.square(out)), stats

    expected = jax.grad(loss, has_aux=True)(variables["params"], plain)
    actual = jax.grad(loss, has_aux=True)(variables["params"], remat)
    chex.assert_trees_all_close(actual, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kernel,size", [(5, 1), (5, 5), (6, 13), (6, 30), (3, 4), (4, 7)])
def test_subpixel_transposed_conv_equals_flax_conv_transpose(kernel, size):
    """The CPU implementation of the plain decoder's stride-2 VALID transposed convolutions gives
    flax's values and gradients (same parameters), for odd and even kernels."""
    from prelar_jax.model.nets.common import StridedConvTranspose

    x = jax.random.normal(jax.random.key(0), (2, size, size, 5))
    reference = nn.ConvTranspose(3, (kernel, kernel), strides=(2, 2), padding="VALID")
    params = reference.init(jax.random.key(1), x)
    params = jax.tree.map(lambda a: jax.random.normal(jax.random.key(2), a.shape), params)
    outputs, grads = {}, {}
    for name, module in [("flax", reference)] + [
        (impl, StridedConvTranspose(3, (kernel, kernel), impl=impl)) for impl in ("subpixel", "lax")
    ]:
        loss = lambda p, x, module=module: jnp.sum(jnp.sin(module.apply(p, x)))
        outputs[name] = module.apply(params, x)
        grads[name] = jax.grad(loss, argnums=(0, 1))(params, x)
    assert outputs["flax"].shape == (2, (size - 1) * 2 + kernel, (size - 1) * 2 + kernel, 3)
    for name in ("subpixel", "lax"):
        np.testing.assert_allclose(outputs[name], outputs["flax"], rtol=1e-5, atol=1e-5)
        chex.assert_trees_all_close(grads[name], grads["flax"], rtol=1e-4, atol=1e-4)
