"""Actor-critic learner: lambda-returns, the truncated-normal actor, imagination, gradient routing.

References are independent of the code under test: float64 numpy loops for the returns,
``scipy.stats.truncnorm`` for the distribution, Python-loop rollouts for ``imagine`` and a
Python-loop re-implementation of the actor and critic objectives for the gradients.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from prelar_jax.learners import actor_critic as ac
from prelar_jax.model import distributions as dist
from prelar_jax.errors import UserError
from prelar_jax.model.nets.heads import Actor, ScalarHead
from prelar_jax.model.nets.rssm import feature

F32_EPS = float(np.finfo(np.float32).eps)
# Compiled once each: eager op-by-op dispatch would compile every small op separately.
log_prob = jax.jit(dist.truncated_normal_log_prob)
entropy_fn = jax.jit(dist.truncated_normal_entropy)
icdf = jax.jit(dist.truncated_normal_icdf)
sample_fn = jax.jit(dist.truncated_normal_sample)


# ----------------------------------------------------------------------------------------------
# lambda-returns
# ----------------------------------------------------------------------------------------------


def _numpy_lambda_returns(reward, value, discount, lam):
    """Forward definition, float64: V_k = r_k + d_k [(1 - lam) v_{k+1} + lam V_{k+1}], V_H = v_H."""
    horizon = reward.shape[0] - 1
    returns = np.zeros((horizon + 1,) + reward.shape[1:], np.float64)
    returns[horizon] = value[horizon]
    for k in range(horizon - 1, -1, -1):
        returns[k] = reward[k] + discount[k] * ((1 - lam) * value[k + 1] + lam * returns[k + 1])
    return returns[:horizon]


def test_lambda_returns_match_numpy_recursion():
    rng = np.random.default_rng(0)
    H, N = 5, 6
    reward, value = rng.normal(size=(2, H + 1, N))
    discount = rng.uniform(0.5, 1.0, size=(H + 1, N))
    for lam in (0.0, 0.3, 0.95, 1.0):
        got = ac.lambda_returns(reward, value, discount, lam)
        assert got.shape == (H, N) and got.dtype == jnp.float32
        np.testing.assert_allclose(got, _numpy_lambda_returns(reward, value, discount, lam), rtol=1e-5, atol=1e-5)
    # A scalar discount broadcasts; reward[H] and discount[H] are unused.
    got = ac.lambda_returns(reward, value, 0.9, 0.95)
    want = _numpy_lambda_returns(reward, value, np.full((H + 1, N), 0.9), 0.95)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    changed = reward.copy()
    changed[H] += 100.0
    np.testing.assert_allclose(ac.lambda_returns(changed, value, 0.9, 0.95), got, rtol=1e-6)


def test_lambda_returns_limits_monte_carlo_and_td():
    rng = np.random.default_rng(1)
    H, N, gamma = 4, 3, 0.9
    reward, value = rng.normal(size=(2, H + 1, N))
    # lambda = 1: discounted sum of r_k..r_{H-1} plus gamma^(H-k) v_H.
    monte_carlo = np.stack(
        [sum(gamma ** (j - k) * reward[j] for j in range(k, H)) + gamma ** (H - k) * value[H] for k in range(H)]
    )
    np.testing.assert_allclose(ac.lambda_returns(reward, value, gamma, 1.0), monte_carlo, rtol=1e-5)
    # lambda = 0: one-step TD targets r_k + gamma v_{k+1}.
    td = reward[:H] + gamma * value[1:]
    np.testing.assert_allclose(ac.lambda_returns(reward, value, gamma, 0.0), td, rtol=1e-5)


def test_discount_weights_are_powers_of_gamma():
    weights = ac.discount_weights(jnp.full((5, 2), 0.99))
    np.testing.assert_allclose(weights, np.repeat(0.99 ** np.arange(5)[:, None], 2, 1), rtol=1e-6)


# ----------------------------------------------------------------------------------------------
# Truncated normal
# ----------------------------------------------------------------------------------------------

# (mean, std): centred, near and at both bounds, the actor's std floor and ceiling, tiny stds,
# and means outside [-1, 1] (where Z must come from the non-cancelling tail).
CASES = [
    (0.0, 1.0),
    (0.99, 0.1),
    (-0.999, 0.1),
    (0.5, 2.1),
    (-0.95, 0.02),
    (0.3, 0.01),
    (1.0, 0.1),
    (-1.0, 0.5),
    (-1.3, 0.1),
    (1.2, 0.05),
]


def _scipy(mean, std):
    mean, std = float(mean), float(std)  # float64 reference even for float32 inputs
    return stats.truncnorm((-1.0 - mean) / std, (1.0 - mean) / std, loc=mean, scale=std)


def test_truncated_normal_log_prob_and_entropy_match_scipy():
    means = np.array([c[0] for c in CASES])
    stds = np.array([c[1] for c in CASES])
    x = np.linspace(-0.999, 0.999, 7)
    for mean, std in CASES:
        ref = _scipy(mean, std)
        # Each case as a 1-d action, evaluated at several points.
        got = log_prob(x[:, None], jnp.float32(mean), jnp.float32(std))
        np.testing.assert_allclose(got, ref.logpdf(x), rtol=2e-5, atol=1e-3 * max(1.0, 0.01 / std))
        entropy = entropy_fn(jnp.array([mean], jnp.float32), jnp.array([std], jnp.float32))
        np.testing.assert_allclose(entropy, ref.entropy(), rtol=1e-5, atol=1e-5)
    # Independent over the last axis: one event of len(CASES) dims sums the per-dim values.
    point = np.linspace(-0.9, 0.9, len(CASES))
    want_lp = sum(_scipy(m, s).logpdf(p) for (m, s), p in zip(CASES, point))
    np.testing.assert_allclose(log_prob(point, means, stds), want_lp, rtol=1e-4)
    want_ent = sum(_scipy(m, s).entropy() for m, s in CASES)
    np.testing.assert_allclose(entropy_fn(means, stds), want_ent, rtol=1e-5)


def test_truncated_normal_icdf_and_its_gradient_match_scipy():
    u = np.array([F32_EPS, 0.01, 0.3, 0.5, 0.7, 0.99, 1 - F32_EPS], np.float32)
    h = 1e-6
    grads = jax.jit(jax.vmap(jax.grad(dist.truncated_normal_icdf, argnums=(1, 2)), (0, None, None)))
    for mean, std in CASES:
        mean, std = np.float32(mean), np.float32(std)
        got = icdf(u, mean, std)
        np.testing.assert_allclose(got, _scipy(mean, std).ppf(u.astype(np.float64)), atol=2e-6 + 1e-4 * std)
        # d x / d mean and d x / d std at a fixed u, against float64 central differences.
        grad_mean, grad_std = grads(u, mean, std)
        mean, std = float(mean), float(std)
        inner = u[1:-1].astype(np.float64)  # finite differences are unreliable in the extreme tails
        fd_mean = (_scipy(mean + h, std).ppf(inner) - _scipy(mean - h, std).ppf(inner)) / (2 * h)
        fd_std = (_scipy(mean, std + h).ppf(inner) - _scipy(mean, std - h).ppf(inner)) / (2 * h)
        np.testing.assert_allclose(grad_mean[1:-1], fd_mean, rtol=2e-3, atol=2e-3)
        np.testing.assert_allclose(grad_std[1:-1], fd_std, rtol=2e-3, atol=2e-3)
        assert np.all(np.isfinite(grad_mean)) and np.all(np.isfinite(grad_std))


def test_truncated_normal_samples_are_inside_and_follow_the_cdf():
    key = jax.random.key(0)
    # Bounds: extreme parameters, many draws.
    means = jnp.array([1.0, -1.0, 0.999, 0.0, 0.5], jnp.float32)
    stds = jnp.array([0.1, 0.1, 2.1, 0.01, 1.0], jnp.float32)
    samples = sample_fn(key, jnp.broadcast_to(means, (20000, 5)), jnp.broadcast_to(stds, (20000, 5)))
    assert samples.dtype == jnp.float32
    assert float(samples.min()) >= np.float32(-1 + 1e-6)
    assert float(samples.max()) <= np.float32(1 - 1e-6)
    # Distribution: Kolmogorov-Smirnov against scipy's CDF (fixed seed), with a negative control
    # showing the test can tell the truncated from the untruncated normal.
    mean, std, n = 0.6, 0.4, 4000
    draws = np.asarray(sample_fn(jax.random.key(1), jnp.full((n,), mean), jnp.full((n,), std)), np.float64)
    assert stats.kstest(draws, _scipy(mean, std).cdf).pvalue > 0.01
    assert stats.kstest(draws, stats.norm(mean, std).cdf).pvalue < 1e-6


def test_truncated_normal_sample_gradients():
    key = jax.random.key(2)
    means = jnp.array([[1.0, -1.0, 0.2, 0.999]] * 512, jnp.float32)
    stds = jnp.array([[0.1, 0.1, 2.1, 0.01]] * 512, jnp.float32)
    sample_sum = lambda m, s: dist.truncated_normal_sample(key, m, s).sum()  # noqa: E731
    grad_mean, grad_std = jax.jit(jax.grad(sample_sum, argnums=(0, 1)))(means, stds)
    assert np.all(np.isfinite(grad_mean)) and np.all(np.isfinite(grad_std))
    # The sample is the documented icdf of u ~ U(eps, 1 - eps): same gradient as the icdf.
    u = jax.random.uniform(key, means.shape, jnp.float32, minval=F32_EPS, maxval=1 - F32_EPS)
    want = jax.jit(jax.grad(lambda m: dist.truncated_normal_icdf(u, m, stds).sum()))(means)
    np.testing.assert_allclose(grad_mean, want, rtol=1e-5, atol=1e-6)


def test_straight_through_clip_passes_gradients_at_the_bound():
    x = jnp.array([-2.0, 0.3, 2.0])
    clipped, grad = jax.value_and_grad(lambda v: dist.straight_through_clip(v, -0.5, 0.5).sum())(x)
    np.testing.assert_allclose(clipped, 0.3)  # -0.5 + 0.3 + 0.5
    np.testing.assert_allclose(grad, np.ones(3))
    assert float(jax.grad(lambda v: jnp.clip(v, -0.5, 0.5).sum())(x)[0]) == 0.0  # plain clip: none
    # At the actor's bound: mean 1, the largest u -> the icdf rounds to 1.0, the clip moves it to
    # 1 - 1e-6, and d/d mean is still the icdf's (non-zero).
    u = jnp.float32(1 - F32_EPS)

    @jax.jit
    def at_bound(mean):
        def sample(m):
            return dist.straight_through_clip(dist.truncated_normal_icdf(u, m, 0.1), -1 + 1e-6, 1 - 1e-6)

        raw, raw_grad = jax.value_and_grad(lambda m: dist.truncated_normal_icdf(u, m, 0.1))(mean)
        return raw, raw_grad, *jax.value_and_grad(sample)(mean)

    raw, raw_grad, clipped, clipped_grad = at_bound(1.0)
    assert float(raw) > 1 - 1e-6
    assert float(clipped) == np.float32(1 - 1e-6)
    assert float(clipped_grad) != 0.0 and float(clipped_grad) == float(raw_grad)


# ----------------------------------------------------------------------------------------------
# Heads
# ----------------------------------------------------------------------------------------------


def _numpy_dense(params, x):
    return np.asarray(x, np.float64) @ np.asarray(params["kernel"], np.float64) + np.asarray(params["bias"])


def _numpy_mlp(params, x, layers):
    """float64 reference of ``nets.common.MLP``: Dense + ELU per hidden layer."""
    for i in range(layers):
        x = _numpy_dense(params[f"Dense_{i}"], x)
        x = np.where(x > 0, x, np.expm1(np.minimum(x, 0)))
    return x


def test_actor_head_ranges_and_formula():
    feat = 3.0 * jax.random.normal(jax.random.key(3), (6, 5, 24))
    actor = Actor(layers=2, units=16, action_dim=4)
    params = jax.jit(actor.init)(jax.random.key(4), feat)["params"]
    mean, std = jax.jit(actor.apply)({"params": params}, feat)
    assert mean.shape == std.shape == (6, 5, 4) and mean.dtype == std.dtype == jnp.float32
    assert float(jnp.abs(mean).max()) < 1.0
    assert float(std.min()) > 0.1 and float(std.max()) < 2.1
    # mean = tanh(W_mu h + b), std = 2 sigmoid((W_s h + b) / 2) + 0.1 on the shared trunk h.
    trunk = _numpy_mlp(params["trunk"], feat, 2)
    mu_raw, sigma_raw = _numpy_dense(params["mean"], trunk), _numpy_dense(params["std"], trunk)
    np.testing.assert_allclose(mean, np.tanh(mu_raw), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(std, 2 / (1 + np.exp(-sigma_raw / 2)) + 0.1, rtol=1e-4, atol=1e-5)
    # A lower compute dtype still returns float32.
    mean16, std16 = jax.jit(Actor(layers=2, units=16, dtype=jnp.bfloat16).apply)({"params": params}, feat)
    assert mean16.dtype == std16.dtype == jnp.float32
    np.testing.assert_allclose(mean16, mean, atol=0.05)


def test_scalar_head_shape_and_formula():
    feat = jax.random.normal(jax.random.key(5), (6, 3, 24))
    head = ScalarHead(layers=2, units=8)
    params = jax.jit(head.init)(jax.random.key(6), feat)["params"]
    out = jax.jit(head.apply)({"params": params}, feat)
    assert out.shape == (6, 3) and out.dtype == jnp.float32
    hidden = _numpy_mlp(params["mlp"], feat, 2)
    want = _numpy_dense(params["mlp"]["Dense_2"], hidden)[..., 0]
    np.testing.assert_allclose(out, want, rtol=1e-4, atol=1e-5)
    low = jax.jit(ScalarHead(layers=2, units=8, dtype=jnp.bfloat16).apply)({"params": params}, feat)
    assert low.dtype == jnp.float32


# ----------------------------------------------------------------------------------------------
# Imagination with toy dynamics
# ----------------------------------------------------------------------------------------------

N, S, C, D, A, HOR = 6, 2, 3, 5, 2, 4
_rng = np.random.default_rng(7)
W_DETER = jnp.asarray(_rng.normal(size=(D, D)) / np.sqrt(D), jnp.float32)
W_ACT = jnp.asarray(_rng.normal(size=(A, D)), jnp.float32)
W_STOCH = jnp.asarray(_rng.normal(size=(A + D, S * C)) / 2, jnp.float32)


def _start_state():
    return {
        "logit": jnp.asarray(_rng.normal(size=(N, S, C)), jnp.float32),
        "stoch": jnp.asarray(_rng.normal(size=(N, S, C)), jnp.float32),
        "deter": jnp.asarray(_rng.normal(size=(N, D)), jnp.float32),
    }


START = _start_state()


def toy_step(state, action, keys, noise=0.0):
    """Smooth dict dynamics; ``noise`` > 0 uses the per-row keys ``[N]``."""
    deter = jnp.tanh(state["deter"] @ W_DETER + action @ W_ACT)
    logit = (jnp.concatenate([action, deter], -1) @ W_STOCH).reshape(-1, S, C)
    stoch = jax.nn.softmax(logit, -1)
    if noise:
        stoch = stoch + noise * jax.vmap(lambda k: jax.random.normal(k, (S, C)))(keys)
    return {"logit": logit, "stoch": stoch, "deter": deter}


def toy_policy(feat):
    mean = jnp.tanh(feat[..., :A] + 0.1 * feat[..., A : 2 * A])
    std = 0.1 + jax.nn.sigmoid(feat[..., -A:])
    return mean, std


def test_imagine_matches_a_per_row_python_loop():
    """The reference rolls each row out alone with its own key (as one device of a sharded batch
    would), so agreement also shows that no row depends on the others, the dynamics' noise
    included. Per row, the key stream is split into H + 1 action keys, then H dynamics keys."""
    keys = jax.random.split(jax.random.key(8), N)
    step_fn = lambda s, a, k: toy_step(s, a, k, noise=0.1)  # noqa: E731
    imagine = jax.jit(lambda s, k: ac.imagine(toy_policy, step_fn, s, HOR, k))
    traj = imagine(START, keys)
    assert traj["feat"].shape == (HOR + 1, N, S * C + D)
    assert traj["action"].shape == traj["mean"].shape == traj["std"].shape == (HOR + 1, N, A)
    assert {k: v.shape for k, v in traj["state"].items()} == {
        "logit": (HOR + 1, N, S, C),
        "stoch": (HOR + 1, N, S, C),
        "deter": (HOR + 1, N, D),
    }
    policy, step, feature_jit = jax.jit(toy_policy), jax.jit(step_fn), jax.jit(feature)
    for i in range(N):
        state = jax.tree.map(lambda x, i=i: x[i : i + 1], START)
        stream = jax.random.split(keys[i], 2 * HOR + 1)
        for k in range(HOR + 1):
            for name in state:
                np.testing.assert_allclose(traj["state"][name][k, i : i + 1], state[name], rtol=1e-5, atol=1e-6)
            feat = feature_jit(state)
            mean, std = policy(feat)
            action = sample_fn(stream[k], mean, std)
            for name, want in (("feat", feat), ("mean", mean), ("std", std), ("action", action)):
                np.testing.assert_allclose(traj[name][k, i : i + 1], want, rtol=1e-5, atol=1e-6, err_msg=name)
            if k < HOR:
                state = step(state, action, stream[HOR + 1 + k][None])
    other = imagine(START, jax.random.split(jax.random.key(10), N))
    assert not np.allclose(other["action"], traj["action"])
    with pytest.raises(ValueError, match="one typed PRNG key per start row"):
        ac.imagine(toy_policy, step_fn, START, HOR, keys[:3])


# ----------------------------------------------------------------------------------------------
# Losses and gradient routing
# ----------------------------------------------------------------------------------------------

FEAT = S * C + D
ACTOR = Actor(layers=2, units=8, action_dim=A)
CRITIC = ScalarHead(layers=2, units=8)


def _networks(seed=11):
    keys = jax.random.split(jax.random.key(seed), 4)
    dummy = jnp.zeros((1, FEAT))
    actor = ACTOR.init(keys[0], dummy)["params"]
    critic = CRITIC.init(keys[1], dummy)["params"]
    reward = CRITIC.init(keys[2], dummy)["params"]
    return {"actor": actor, "critic": critic}, reward


def _kwargs(reward_params, config):
    return dict(
        actor_apply=lambda p, f: ACTOR.apply({"params": p}, f),
        critic_apply=lambda p, f: CRITIC.apply({"params": p}, f),
        step_fn=lambda s, a, k: toy_step(s, a, k, noise=0.05),
        reward_fn=lambda f: CRITIC.apply({"params": reward_params}, f),
        config=config,
    )


def _reference_rollout(actor_params, slow, reward_params, keys, config):
    """Python-loop rollout: features, entropies, rewards and slow values per step k = 0..H."""
    H = config.horizon
    streams = jax.vmap(lambda k: jax.random.split(k, 2 * H + 1))(keys)
    state, feats, entropies = START, [], []
    for k in range(H + 1):
        feat = feature(state)
        feats.append(feat)
        mean, std = ACTOR.apply({"params": actor_params}, jax.lax.stop_gradient(feat))
        entropies.append(dist.truncated_normal_entropy(mean, std))
        action = jax.vmap(dist.truncated_normal_sample)(streams[:, k], mean, std)
        if k < H:
            state = toy_step(state, action, streams[:, H + 1 + k], noise=0.05)
    reward = [CRITIC.apply({"params": reward_params}, f) for f in feats]
    value = [CRITIC.apply({"params": slow}, f) for f in feats]
    return feats, entropies, reward, value


def _reference_actor_loss(actor_params, slow, reward_params, keys, config):
    """Spec 6 written out term by term: -mean_k gamma^k [V_{k+1} + eta H_k], k = 0..H-2, with the
    lambda-returns as an explicit backward loop (differentiable, for the actor's gradient).
    Also returns the rollout's features, rewards and slow values for the critic reference."""
    H, gamma, lam = config.horizon, config.discount, config.lambda_
    feats, entropies, reward, value = _reference_rollout(actor_params, slow, reward_params, keys, config)
    returns = [value[H]]
    for k in range(H - 1, -1, -1):
        returns.insert(0, reward[k] + gamma * ((1 - lam) * value[k + 1] + lam * returns[0]))
    terms = [gamma**k * (returns[k + 1] + config.actor_ent * entropies[k]) for k in range(H - 1)]
    return -jnp.mean(jnp.stack(terms)), (jnp.stack(feats), jnp.stack(reward), jnp.stack(value))


def _reference_critic_loss_fn(feats, reward, value, config):
    """``critic_params -> mean_k gamma^k 1/2 (v(feat_k) - V_k)^2``, k = 0..H-1, with features and
    float64 numpy lambda-returns fixed from the reference rollout."""
    H, gamma = config.horizon, config.discount
    target = _numpy_lambda_returns(
        np.asarray(reward, np.float64), np.asarray(value, np.float64), np.full((H + 1, N), gamma), config.lambda_
    )

    def loss(critic_params):
        terms = [
            gamma**k * 0.5 * jnp.square(CRITIC.apply({"params": critic_params}, feats[k]) - target[k]) for k in range(H)
        ]
        return jnp.mean(jnp.stack(terms))

    return loss


def _tree_allclose(a, b, rtol, atol):
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=rtol, atol=atol), a, b)


@pytest.mark.slow
def test_gradient_routing_and_values_match_reference():
    config = ac.ActorCriticConfig(horizon=3, discount=0.9, lambda_=0.8, actor_ent=0.1)
    params, reward_params = _networks()
    slow = params["critic"]  # as right after the hard copy: a leak into the critic would show
    keys = jax.random.split(jax.random.key(12), N)
    kwargs = _kwargs(reward_params, config)

    @jax.jit
    def under_test(p):
        """Each loss's gradient w.r.t. both networks; ``jax.grad(actor_critic_loss)`` is their sum."""

        def part(q, index):
            actor_loss, critic_loss, metrics = ac.actor_critic_losses(q, slow, START, keys, **kwargs)
            return (actor_loss, critic_loss)[index], metrics

        actor_part, metrics = jax.grad(part, has_aux=True)(p, 0)
        critic_part, _ = jax.grad(part, has_aux=True)(p, 1)
        return jax.tree.map(lambda a, c: jnp.stack([a, c]), actor_part, critic_part), metrics

    per_loss, metrics = under_test(params)
    grads = jax.tree.map(lambda g: g.sum(0), per_loss)
    (ref_actor, (feats, reward, value)), ref_actor_grad = jax.jit(
        jax.value_and_grad(_reference_actor_loss, has_aux=True), static_argnums=4
    )(params["actor"], slow, reward_params, keys, config)
    ref_critic, ref_critic_grad = jax.jit(jax.value_and_grad(_reference_critic_loss_fn(feats, reward, value, config)))(
        params["critic"]
    )
    np.testing.assert_allclose(metrics["actor_loss"], ref_actor, rtol=1e-5)
    np.testing.assert_allclose(metrics["critic_loss"], ref_critic, rtol=1e-5)

    # One gradient of the sum == each network's own loss gradient (reference implementation) ...
    _tree_allclose(grads["actor"], ref_actor_grad, rtol=1e-4, atol=1e-7)
    _tree_allclose(grads["critic"], ref_critic_grad, rtol=1e-4, atol=1e-7)
    # ... because each loss alone has exactly zero gradient for the other network.
    assert all(float(jnp.abs(g[0]).max()) == 0.0 for g in jax.tree.leaves(per_loss["critic"]))
    assert all(float(jnp.abs(g[1]).max()) == 0.0 for g in jax.tree.leaves(per_loss["actor"]))
    assert any(float(jnp.abs(g[0]).max()) > 0.0 for g in jax.tree.leaves(per_loss["actor"]))
    assert any(float(jnp.abs(g[1]).max()) > 0.0 for g in jax.tree.leaves(per_loss["critic"]))
    for name in ("actor_entropy", "imag_reward", "lambda_return", "critic_value", "slow_value", "action_std"):
        assert np.isfinite(metrics[name]), name


@pytest.mark.slow
def test_actor_gradient_flows_only_through_the_actions():
    """With no entropy bonus and a reward of the state only, the actor's only path into the loss
    is its actions through the dynamics: non-zero with action-driven dynamics, zero when the
    dynamics ignore the action (``gate = 0``)."""
    config = ac.ActorCriticConfig(horizon=HOR, actor_ent=0.0)
    params, reward_params = _networks(seed=13)
    keys = jax.random.split(jax.random.key(14), N)

    @jax.jit
    def actor_grad(gate):
        kwargs = _kwargs(reward_params, config)
        kwargs["step_fn"] = lambda s, a, k: toy_step(s, a * gate, k, noise=0.05)
        loss = lambda p: ac.actor_critic_loss(p, params["critic"], START, keys, **kwargs)  # noqa: E731
        (total, metrics), grads = jax.value_and_grad(loss, has_aux=True)(params)
        return total, metrics, grads["actor"]

    total, metrics, grads = actor_grad(1.0)
    np.testing.assert_allclose(total, metrics["actor_loss"] + metrics["critic_loss"], rtol=1e-6)
    through = jax.tree.leaves(grads)
    assert sum(float(jnp.square(g).sum()) for g in through) > 1e-10
    assert all(np.all(np.isfinite(g)) for g in through)
    blocked = jax.tree.leaves(actor_grad(0.0)[2])
    assert all(float(jnp.abs(g).max()) == 0.0 for g in blocked)


def test_update_slow_critic_copies_at_multiples_of_every():
    update = jax.jit(ac.update_slow_critic, static_argnums=3)
    slow = {"w": jnp.zeros(3), "b": jnp.zeros((), jnp.float32)}
    copied_at = []
    for n in range(0, 9):
        critic = {"w": jnp.full(3, float(n + 1)), "b": jnp.asarray(-(n + 1.0))}
        new = update(slow, critic, jnp.asarray(n), 4)
        if n % 4 == 0:
            copied_at.append(n)
            jax.tree.map(np.testing.assert_array_equal, new, critic)
        else:
            jax.tree.map(np.testing.assert_array_equal, new, slow)
        slow = new
    assert copied_at == [0, 4, 8]
    np.testing.assert_array_equal(slow["w"], np.full(3, 9.0))


def test_config_validation():
    assert ac.ActorCriticConfig() == ac.ActorCriticConfig(15, 0.99, 0.95, 1e-4, 100)
    assert ac.ActorCriticConfig.from_mapping({"horizon": 5}).horizon == 5
    for bad in (
        {"horizon": 1},
        {"discount": 0.0},
        {"lambda_": 1.5},
        {"actor_ent": -1.0},
        {"slow_update_every": 0},
        {"horizn": 15},
    ):
        with pytest.raises(UserError):
            ac.ActorCriticConfig.from_mapping(bad)
