"""Mixed precision (``model.compute_dtype = 'bfloat16'``): what runs in bfloat16, what must not,
and whether training still gives the float32 losses (tiny presets, one device).

The policy under test: parameters, optimiser state and BatchNorm statistics are float32; the
convolutions and dense layers compute in bfloat16; losses, log-probabilities, KLs, BatchNorm
statistics, the image log-likelihood, the consistency loss, the intrinsic bonus, lambda-returns,
the truncated-normal entropy and every recurrent state (RSSM latents, lambda-return carry) stay
float32. The jaxpr tests check the policy op by op; the parity tests check its consequence.

Tolerances come from bfloat16's 8-bit significand: one rounding has relative error at most
u = 2^-9 ~ 2e-3. Every parity comparison starts from identical float32 parameters and keys.
"""

from __future__ import annotations

import collections
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.extend import core as jax_core

from prelar_jax.learners import finetune as agent_lib
from prelar_jax.runtime import config as config_lib, parallel, steps
from prelar_jax.learners.pretrain import PretrainModel, TrainState, make_optimizer
from tests.model_helpers import init_params, load_config

U_BF16 = 2.0**-9  # unit roundoff of bfloat16 (8 significand bits, round to nearest)
B, T = 4, 6  # pre-training batch
PRETRAIN_STEPS = 30
FINETUNE_UPDATES = 3

# Primitives whose bfloat16 output would mean a reduction, a normaliser or a transcendental
# function (log-softmax, KL, entropy, BatchNorm moments, squared errors, ndtr/ndtri of the
# truncated normal) ran in bfloat16. Elementwise layer arithmetic (add, mul, ELU's expm1,
# avg-pool's division, ...) is allowed to.
SENSITIVE = {
    "reduce_sum",
    "reduce_max",
    "reduce_min",
    "reduce_prod",
    "argmax",
    "argmin",
    "exp",
    "exp2",
    "log",
    "log1p",
    "logistic",
    "tanh",
    "erf",
    "erfc",
    "erf_inv",
    "sqrt",
    "rsqrt",
    "pow",
    "integer_pow",
    "square",
    "cumsum",
    "cumprod",
    "cumlogsumexp",
    "cummax",
    "sort",
    "top_k",
}


# ----------------------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------------------


def moving_squares(batch: int, length: int, size: int = 64, seed: int = 0) -> np.ndarray:
    """uint8 ``[B, T, size, size, 3]``: a coloured square moving at constant velocity over a
    horizontal gradient, one per sequence. Learnable structure, so the loss has somewhere to go
    (uniform noise frames would only let the decoder learn their mean)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[:size, :size]
    frames = np.empty((batch, length, size, size, 3), np.uint8)
    for b in range(batch):
        colour, background = rng.integers(60, 256, 3), rng.integers(0, 60, 3)
        start, velocity = rng.integers(8, size - 24, 2).astype(float), rng.uniform(-3, 3, 2)
        gradient = background + (x[..., None] * 0.5).astype(np.int64)  # [H, W, 3]
        for t in range(length):
            centre = start + velocity * t
            inside = (np.abs(y - centre[0]) < 8) & (np.abs(x - centre[1]) < 8)  # [H, W]
            frames[b, t] = np.where(inside[..., None], colour, gradient)
    return frames


def first_flags(batch: int, length: int) -> np.ndarray:
    is_first = np.zeros((batch, length), bool)
    is_first[:, 0] = True
    return is_first


def pretrain_config(dtype: str):
    return load_config("tiny", **{"model.compute_dtype": dtype})


def finetune_config(dtype: str):
    return config_lib.load_config("configs/prelar_finetune.py:tiny", {"model.compute_dtype": dtype})


def finetune_batch(config) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(1)
    batch, length = config.batch_size, config.sequence_length
    return {
        "image": moving_squares(batch, length, seed=1),
        "action": rng.uniform(-1, 1, (batch, length, config.action_dim)).astype(np.float32),
        "reward": rng.random((batch, length)).astype(np.float32),
        "is_first": first_flags(batch, length),
    }


def equations(jaxpr):
    """Every equation of a jaxpr, recursing into scan/jit/custom_jvp bodies."""
    for eqn in jaxpr.eqns:
        yield eqn
        for value in eqn.params.values():
            for sub in value if isinstance(value, (list, tuple)) else [value]:
                if isinstance(sub, jax_core.ClosedJaxpr):
                    yield from equations(sub.jaxpr)
                elif isinstance(sub, jax_core.Jaxpr):
                    yield from equations(sub)


def _dtypes(variables) -> set[str]:
    """Dtype names of jaxpr variables (names: ``jnp.bfloat16 in {dtype('bfloat16')}`` is False)."""
    return {str(v.aval.dtype) for v in variables if hasattr(v, "aval") and hasattr(v.aval, "dtype")}


def op_dtypes(closed_jaxpr) -> collections.Counter:
    """``(primitive, output dtype) -> count`` over the whole jaxpr."""
    counts = collections.Counter()
    for eqn in equations(closed_jaxpr.jaxpr):
        for dtype in _dtypes(eqn.outvars):
            counts[(eqn.primitive.name, dtype)] += 1
    return counts


def bf16_violations(closed_jaxpr) -> list[str]:
    """Sensitive primitives with a bfloat16 output, and scans whose carry holds bfloat16 (a
    recurrent state, e.g. the RSSM latent or the lambda-return accumulator, in low precision)."""
    found = []
    for eqn in equations(closed_jaxpr.jaxpr):
        if eqn.primitive.name in SENSITIVE and "bfloat16" in _dtypes(eqn.outvars):
            found.append(f"{eqn.primitive.name} -> bfloat16")
        if eqn.primitive.name == "scan":
            consts, carries = eqn.params["num_consts"], eqn.params["num_carry"]
            if "bfloat16" in _dtypes(eqn.invars[consts : consts + carries]):
                found.append("scan with a bfloat16 carry")
    return found


def assert_float32_state(tree, what: str) -> None:
    """Every floating leaf of ``tree`` is float32 (integer counters and PRNG keys may exist)."""
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        dtype = jnp.asarray(leaf).dtype
        if jnp.issubdtype(dtype, jnp.floating):
            assert dtype == jnp.float32, f"{what}{jax.tree_util.keystr(path)} is {dtype}, not float32"


@functools.lru_cache(maxsize=None)
def pretrain_run(dtype: str):
    """``PRETRAIN_STEPS`` data-parallel steps (one-device mesh) on one fixed batch from the same
    float32 initial parameters. Returns ``(state after the first step, metric history)`` as host
    numpy trees."""
    config = pretrain_config(dtype)
    model = PretrainModel(config, bn_axis_name=parallel.AXIS)
    optimizer = make_optimizer(config)
    params, stats = init_params("tiny")  # float32 whatever the compute dtype
    state = TrainState(
        step=jnp.zeros((), jnp.int32), params=params, batch_stats=stats, opt_state=optimizer.init(params)
    )
    mesh = parallel.make_mesh(jax.devices()[:1])
    state = parallel.put_replicated(state, mesh)
    batch = parallel.put_batch({"image": moving_squares(B, T), "is_first": first_flags(B, T)}, mesh)
    step = steps.make_pretrain_step(model.loss, optimizer, mesh, seed=0)
    history, first_state = [], None
    for i in range(PRETRAIN_STEPS):
        state, metrics = step(state, batch)
        history.append(jax.tree.map(np.asarray, metrics))
        if i == 0:
            first_state = jax.tree.map(np.asarray, state)
    return first_state, history


@functools.lru_cache(maxsize=None)
def finetune_run(dtype: str):
    """``FINETUNE_UPDATES`` agent updates (one-device mesh) on one fixed batch from the same
    initial state. Returns ``(initial params, final state, metric history)`` as numpy trees."""
    config = finetune_config(dtype)
    agent = agent_lib.FinetuneAgent(config, bn_axis_name=parallel.AXIS)
    mesh = parallel.make_mesh(jax.devices()[:1])
    state = agent.init_state(jax.random.key(1))
    initial = jax.tree.map(np.asarray, state.params)
    state = parallel.put_replicated(state, mesh)
    batch = parallel.put_batch(finetune_batch(config), mesh)
    step = steps.make_finetune_step(agent, mesh, seed=0)
    history = []
    for _ in range(FINETUNE_UPDATES):
        state, metrics = step(state, batch)
        history.append(jax.tree.map(np.asarray, metrics))
    return initial, jax.tree.map(np.asarray, state), history


# ----------------------------------------------------------------------------------------------
# Where bfloat16 is used
# ----------------------------------------------------------------------------------------------


def _pretrain_jaxprs(dtype: str):
    """Forward loss and loss-plus-gradient jaxprs of the pre-training loss (tracing only)."""
    model = PretrainModel(pretrain_config(dtype))
    params, stats = init_params("tiny")
    batch = {"image": moving_squares(B, T), "is_first": first_flags(B, T)}
    loss = lambda p, s: model.loss(p, s, batch, jax.random.key(1), jnp.arange(B))  # noqa: E731
    return jax.make_jaxpr(loss)(params, stats), jax.make_jaxpr(jax.value_and_grad(loss, has_aux=True))(params, stats)


@pytest.mark.slow
def test_pretrain_loss_jaxpr_uses_bf16_layers_and_float32_numerics(monkeypatch):
    """bfloat16 mode: every convolution and matmul (forward and backward) is bfloat16, and no
    sensitive op or recurrent carry is; float32 mode has no bfloat16 at all. The loss and every
    metric are float32 scalars in both modes. (XLA's convolutions, so they show in the jaxpr as
    conv_general_dilated: the oneDNN path takes float32 convolutions only, as opaque FFI calls.)"""
    monkeypatch.setenv("PRELAR_CONV", "xla")
    for dtype in ("float32", "bfloat16"):
        forward, with_grad = _pretrain_jaxprs(dtype)
        counts = op_dtypes(with_grad)
        for primitive in ("conv_general_dilated", "dot_general"):
            low = counts[(primitive, "bfloat16")]
            full = counts[(primitive, "float32")]
            if dtype == "bfloat16":
                assert low > 0 and full == 0, (primitive, low, full)
            else:
                assert low == 0 and full > 0, (primitive, low, full)
        if dtype == "float32":
            assert not [k for k in counts if k[1] == "bfloat16"], counts
        assert bf16_violations(forward) == [], dtype
        # (loss, (new batch statistics, metrics)): all float32, the loss a scalar.
        assert forward.out_avals[0].shape == ()
        assert {aval.dtype for aval in forward.out_avals} == {jnp.dtype(jnp.float32)}, forward.out_avals


def test_finetune_losses_jaxpr_float32_numerics():
    """Fine-tuning in bfloat16: the world-model and actor-critic losses run their layers in
    bfloat16 (including the real-action encoder) while KLs, the image likelihood, the intrinsic
    bonus, the imagination and lambda-return scans, the truncated-normal entropy and the losses
    stay float32. The only float32 matmuls left are the intrinsic bonus's projection and
    nearest-neighbour search, which ask for HIGHEST precision on purpose."""
    config = finetune_config("bfloat16")
    agent = agent_lib.FinetuneAgent(config)
    state = jax.eval_shape(agent.init_state, jax.random.key(0))
    batch = finetune_batch(config)
    n = config.batch_size * config.sequence_length
    wm_params = {k: state.params[k] for k in agent.world_model_modules()}
    ac_params = {k: state.params[k] for k in agent_lib.ACTOR_CRITIC_MODULES}
    wm = jax.make_jaxpr(
        lambda p, s, bonus: agent.world_model_loss(p, s, bonus, batch, jax.random.key(0), jnp.arange(config.batch_size))
    )(wm_params, state.batch_stats, state.intrinsic)
    start = {
        "logit": jnp.zeros((n, config.model.stoch, config.model.classes)),
        "stoch": jnp.zeros((n, config.model.stoch, config.model.classes)),
        "deter": jnp.zeros((n, config.model.deter)),
    }
    ac = jax.make_jaxpr(agent.actor_critic_loss)(
        ac_params, wm_params, state.slow_critic, start, jax.random.split(jax.random.key(0), n)
    )
    for name, jaxpr in (("world model", wm), ("actor-critic", ac)):
        assert bf16_violations(jaxpr) == [], name
        assert jaxpr.out_avals[0].dtype == jnp.float32 and jaxpr.out_avals[0].shape == ()
        counts = op_dtypes(jaxpr)
        assert counts[("dot_general", "bfloat16")] > 0, name
        for eqn in equations(jaxpr.jaxpr):
            if eqn.primitive.name == "dot_general" and "float32" in _dtypes(eqn.outvars):
                assert "HIGHEST" in str(eqn.params["precision"]), f"{name}: a float32 matmul {eqn}"
    assert op_dtypes(ac)[("dot_general", "float32")] == 0  # the action encoder too is bfloat16


# ----------------------------------------------------------------------------------------------
# State dtypes and loss parity: pre-training
# ----------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_bf16_pretrain_step_keeps_float32_state_and_metrics():
    """After one bfloat16 step, parameters, Adam moments and BatchNorm statistics are float32
    (a leak would make optax keep bfloat16 moments and round every update), as are the metrics."""
    state, history = pretrain_run("bfloat16")
    assert_float32_state(state.params, "params")
    assert_float32_state(state.opt_state, "opt_state")
    assert_float32_state(state.batch_stats, "batch_stats")
    reference, _ = pretrain_run("float32")
    jax.tree.map(lambda a, b: np.testing.assert_equal(a.dtype, b.dtype), state, reference)
    for name, value in history[0].items():
        assert value.dtype == np.float32 and value.shape == (), name
    assert history[0]["nonfinite"] == 0


@pytest.mark.slow
def test_pretrain_loss_parity():
    """Same parameters, keys and batch in float32 and bfloat16.

    First step (identical parameters): each bfloat16 layer output is rounded with relative error
    <= u = 2^-9; the ~10 layers between pixels and reconstruction add up independent roundings
    (~sqrt(10) u ~ 6e-3 in the worst activations), and the image loss, a float32 sum of 12288
    squared residuals per frame dominated by the float32 target, averages them further. So the
    losses must agree to a few u: rtol 4u ~ 8e-3 (measured ~4e-4). The KL is a difference of
    two latent distributions whose logits each carry bfloat16 rounding: rtol 10u ~ 2e-2
    (measured ~2e-3). A KL or image-loss reduction done *in* bfloat16 misses these by far more.

    Curve: the runs diverge slowly (bfloat16-rounded logits flip some categorical samples, after
    which the trajectories are different draws of the same training), so the later steps are
    compared within a band, 5%, and both must learn (loss down by > 20% in 30 steps)."""
    _, f32 = pretrain_run("float32")
    _, b16 = pretrain_run("bfloat16")
    np.testing.assert_allclose(b16[0]["loss"], f32[0]["loss"], rtol=4 * U_BF16)
    np.testing.assert_allclose(b16[0]["image_loss"], f32[0]["image_loss"], rtol=4 * U_BF16)
    np.testing.assert_allclose(b16[0]["kl"], f32[0]["kl"], rtol=10 * U_BF16)
    np.testing.assert_allclose(b16[0]["implicit_kl"], f32[0]["implicit_kl"], rtol=10 * U_BF16)
    f32_loss = np.array([m["loss"] for m in f32])
    b16_loss = np.array([m["loss"] for m in b16])
    assert np.all(np.isfinite(b16_loss)) and np.all(np.isfinite(f32_loss))
    for curve in (f32_loss, b16_loss):
        assert curve[-5:].mean() < 0.8 * curve[0], curve
    band = np.abs(b16_loss - f32_loss) / f32_loss
    assert band.max() < 0.05, band


# ----------------------------------------------------------------------------------------------
# Fine-tuning
# ----------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_finetune_update_parity_and_float32_state():
    """A few fine-tuning updates (world model, then actor-critic in the updated world model)
    from the same initial parameters: the state stays float32 and the first update's losses agree.

    World-model losses are computed from identical parameters: same reasoning and tolerances as
    pre-training. The actor-critic losses are computed after one world-model update that
    differs between the modes by bfloat16-rounded gradients (x lr 3e-4, far below the
    parameters' scale), through a 5-step imagination of bfloat16 layers whose sampled actions
    can shift by a few u; the lambda-return, the critic targets and the truncated-normal
    entropy are float32 sums of those. rtol 10u plus atol 10u for values near zero (the actor
    loss is a mean of signed returns)."""
    initial32, state32, f32 = finetune_run("float32")
    initial16, state16, b16 = finetune_run("bfloat16")
    jax.tree.map(np.testing.assert_array_equal, initial16, initial32)  # same starting point
    for field in ("params", "slow_critic", "batch_stats", "model_opt_state", "actor_critic_opt_state", "intrinsic"):
        assert_float32_state(getattr(state16, field), field)
    jax.tree.map(lambda a, b: np.testing.assert_equal(a.dtype, b.dtype), state16, state32)
    first16, first32 = b16[0], f32[0]
    for name in ("model_loss", "image_loss", "aux_reward_loss"):
        np.testing.assert_allclose(first16[name], first32[name], rtol=4 * U_BF16, err_msg=name)
    # The reward target holds the intrinsic bonus: means of the k nearest of many near-equal
    # distances between embeddings, where a rounding can swap which neighbours count (4.8u measured
    # with oneDNN's bfloat16 convolutions, whose values match XLA's to the same rounding per op).
    for name in ("kl", "reward_loss"):
        np.testing.assert_allclose(first16[name], first32[name], rtol=10 * U_BF16, err_msg=name)
    for name in ("actor_loss", "critic_loss", "lambda_return", "actor_entropy", "critic_value", "imag_reward"):
        np.testing.assert_allclose(first16[name], first32[name], rtol=10 * U_BF16, atol=10 * U_BF16, err_msg=name)
    for history in (f32, b16):
        assert all(m["nonfinite"] == 0 for m in history)
        assert all(m[name].dtype == np.float32 for m in history for name in m)
    later = np.array([[m["model_loss"] for m in f32], [m["model_loss"] for m in b16]])
    assert np.all(np.abs(later[1] - later[0]) / later[0] < 0.05), later
