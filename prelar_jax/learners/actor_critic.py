"""The DreamerV2 actor-critic learner as pure functions (spec section 6).

Everything here is called inside the fine-tuning agent's jitted, ``shard_map``ped update:

* ``imagine`` rolls the policy out in the world model for ``horizon`` steps from every
  (detached) posterior state, as one ``lax.scan``;
* ``lambda_returns`` is the DreamerV2 TD(lambda) target, a reverse ``lax.scan``;
* ``actor_critic_loss`` imagines, scores and returns ``actor loss + critic loss``; one
  ``jax.grad`` with respect to ``{'actor': ..., 'critic': ...}`` gives each network exactly the
  gradient of its own loss (see the function's docstring for why);
* ``update_slow_critic`` is the hard target-network copy.

Time-major layout throughout: ``[H + 1, N, ...]`` for a trajectory of ``N`` imagined rows.

Index conventions (H = horizon; the original's ``seq`` dict, see ``ActorCritic.target``):

====================  ==========================================================================
states ``z_k``        k = 0..H; ``z_0`` is the start (posterior) state, ``z_{k+1} = step(z_k, a_k)``
action ``a_k``        k = 0..H; ``a_k ~ pi(. | sg feat_k)`` is the action *taken at* ``z_k``
                      (the original stores it one slot later, as the action that led into
                      ``z_{k+1}``). ``a_H`` is drawn at ``z_H`` but never applied: it only
                      completes the array (so ``mean``/``std`` are defined for every state)
reward ``r_k``        ``reward_fn(feat_k)`` for every k including ``z_0``; the reward head predicts
                      the reward received on *arriving* at a state (replay convention, spec 0), and
                      DreamerV2 pairs ``r_k`` with the transition leaving ``z_k``
value ``v_k``         slow critic at ``feat_k`` (gradients flow through ``feat_k`` to the actor)
discount ``d_k``      constant gamma (no discount head)
weight ``w_k``        ``cumprod([1, d_0, ..., d_{H-1}])``, i.e. ``gamma^k``, stop-gradient
target ``V^l_k``      k = 0..H-1 (see ``lambda_returns``)
actor loss            k = 0..H-2: ``-mean w_k [V^l_{k+1} + eta H(pi(. | sg feat_k))]``
critic loss           k = 0..H-1: ``mean w_k 1/2 (v_online(sg feat_k) - sg V^l_k)^2``
====================  ==========================================================================

The actor's target ``V^l_{k+1}`` is the return *after* taking ``a_k``; it is differentiable in
``a_k`` through the dynamics, the reward head and the slow critic ("dynamics" actor gradients,
``actor_grad: auto`` for continuous actions). ``a_{H-1}`` gets no objective because no return
beyond ``z_H`` is estimated (``V^l_H`` is the bootstrap value), and ``a_H`` leads nowhere.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import chex
import jax
import jax.numpy as jnp

from prelar_jax.model.distributions import truncated_normal_entropy, truncated_normal_sample
from prelar_jax.errors import UserError
from prelar_jax.model.nets.rssm import State, feature
from prelar_jax.types import Params

PolicyFn = Callable[[jax.Array], tuple[jax.Array, jax.Array]]  # feat [N, F] -> (mean, std) [N, A]
StepFn = Callable[[State, jax.Array, jax.Array], State]  # (state [N], action [N, A], keys [N]) -> state
FeatureFn = Callable[[State], jax.Array]  # state -> feat [..., F]
sg = jax.lax.stop_gradient


class ActorCriticConfigError(UserError, ValueError):
    """An actor-critic hyperparameter is outside the range the algorithm is defined for."""


@dataclasses.dataclass(frozen=True)
class ActorCriticConfig:
    """Loss hyperparameters (spec sections 6 and 10; Meta-World values as defaults).

    The optimizers (Adam 8e-5 for both networks, eps 1e-5, clip 100, wd 1e-6) belong to the
    agent. ``from_mapping`` builds one from a ConfigDict / dict with these same keys.
    """

    horizon: int = 15
    discount: float = 0.99
    lambda_: float = 0.95
    actor_ent: float = 1e-4
    slow_update_every: int = 100

    def __post_init__(self):
        if int(self.horizon) != self.horizon or self.horizon < 2:
            raise ActorCriticConfigError(
                f"actor_critic.horizon must be an integer >= 2 (the actor loss uses steps 0..H-2), got {self.horizon!r}"
            )
        if not 0.0 < self.discount <= 1.0:
            raise ActorCriticConfigError(f"actor_critic.discount must be in (0, 1], got {self.discount!r}")
        if not 0.0 <= self.lambda_ <= 1.0:
            raise ActorCriticConfigError(f"actor_critic.lambda_ must be in [0, 1], got {self.lambda_!r}")
        if self.actor_ent < 0.0:
            raise ActorCriticConfigError(f"actor_critic.actor_ent must be >= 0, got {self.actor_ent!r}")
        if int(self.slow_update_every) != self.slow_update_every or self.slow_update_every < 1:
            raise ActorCriticConfigError(
                f"actor_critic.slow_update_every must be an integer >= 1, got {self.slow_update_every!r}"
            )

    @classmethod
    def from_mapping(cls, mapping) -> "ActorCriticConfig":
        """From a dict-like (e.g. ``ml_collections.ConfigDict``); unknown keys are an error."""
        known = {field.name for field in dataclasses.fields(cls)}
        given = dict(mapping)
        unknown = sorted(set(given) - known)
        if unknown:
            raise ActorCriticConfigError(f"unknown actor_critic keys {unknown}; expected some of {sorted(known)}")
        return cls(**given)


# ----------------------------------------------------------------------------------------------
# Returns
# ----------------------------------------------------------------------------------------------


def lambda_returns(reward: jax.Array, value: jax.Array, discount: jax.Array | float, lambda_: float) -> jax.Array:
    """DreamerV2 TD(lambda) targets, ``[H + 1, N]`` inputs to ``[H, N]`` returns.

    Exactly ``lambda_return(reward[:-1], value[:-1], discount[:-1], bootstrap=value[-1])``::

        V_H = v_H                                                     (bootstrap, not returned)
        V_k = r_k + d_k [(1 - lambda) v_{k+1} + lambda V_{k+1}]       k = H-1, ..., 0

    with ``r_k = reward[k]`` (the reward predicted at ``z_k``), ``v_k = value[k]`` and
    ``d_k = discount[k]``; ``reward[H]`` and ``discount[H]`` are unused. ``lambda = 1`` gives the
    discounted Monte-Carlo sum bootstrapped with ``v_H``; ``lambda = 0`` the one-step TD target
    ``r_k + d_k v_{k+1}``. Gradients flow through all inputs.
    """
    reward = jnp.asarray(reward, jnp.float32)
    value = jnp.asarray(value, jnp.float32)
    chex.assert_rank(reward, 2)
    chex.assert_equal_shape([reward, value])
    discount = jnp.broadcast_to(jnp.asarray(discount, jnp.float32), reward.shape)
    next_value = value[1:]  # v_{k+1}, k = 0..H-1; its last row is the bootstrap v_H
    inputs = reward[:-1] + discount[:-1] * next_value * (1.0 - lambda_)  # [H, N]

    def step(agg, xs):
        inp, disc = xs
        agg = inp + disc * lambda_ * agg
        return agg, agg

    _, returns = jax.lax.scan(step, value[-1], (inputs, discount[:-1]), reverse=True)
    return returns  # [H, N]


def discount_weights(discount: jax.Array) -> jax.Array:
    """``w = cumprod([1, d_0, ..., d_{H-1}])`` over axis 0, ``[H + 1, N]``, stop-gradient.

    The discount ``d_k`` says whether ``z_{k+1}`` is still valid, hence the shift.
    """
    shifted = jnp.concatenate([jnp.ones_like(discount[:1]), discount[:-1]], 0)
    return sg(jnp.cumprod(shifted, axis=0))


# ----------------------------------------------------------------------------------------------
# Imagination
# ----------------------------------------------------------------------------------------------


def _leading(tree) -> int:
    return jax.tree.leaves(tree)[0].shape[0]


def imagine(
    policy_fn: PolicyFn, step_fn: StepFn, start: State, horizon: int, keys: jax.Array, feature_fn: FeatureFn = feature
) -> dict[str, Any]:
    """Roll the policy out for ``horizon`` steps from each of the ``N`` start states.

    ``start`` is a dict of ``[N, ...]`` RSSM states; it is stop-gradiented (imagination starts
    from detached posteriors). ``keys`` is a ``[N]`` key array, one stream per start row, so
    that sharding the rows over devices does not change any sample (derive them from the rows'
    global indices). Per row the stream is split into ``horizon + 1`` action keys and
    ``horizon`` dynamics keys; ``step_fn`` receives the dynamics keys of all rows ``[N]``.

    Each step: ``mean, std = policy_fn(sg feat_k)``, ``a_k ~ TruncNormal(mean, std, [-1, 1])``
    (reparameterised, so differentiable in the policy's parameters), ``z_{k+1} =
    step_fn(z_k, a_k, keys)``. The policy's input is stop-gradiented, so the actor's gradient
    flows only through the actions it outputs, never back through earlier states into itself.

    Returns a time-major dict: ``state`` (dict of ``[H + 1, N, ...]``, ``z_0..z_H``), ``feat``
    ``[H + 1, N, F]``, ``action`` ``[H + 1, N, A]`` (``action[k]`` is taken at ``z_k``;
    ``action[H]`` is drawn at ``z_H`` but not applied), and the policy's ``mean`` and ``std``
    ``[H + 1, N, A]`` at every state.
    """
    start = sg(start)
    n = _leading(start)
    if keys.shape != (n,) or not jax.dtypes.issubdtype(keys.dtype, jax.dtypes.prng_key):
        raise ValueError(f"imagine needs one typed PRNG key per start row, shape ({n},); got {keys.dtype} {keys.shape}")
    streams = jax.vmap(lambda k: jax.random.split(k, 2 * horizon + 1))(keys)  # [N, 2H+1]
    action_keys = jnp.swapaxes(streams[:, : horizon + 1], 0, 1)  # [H+1, N]
    dynamics_keys = jnp.swapaxes(streams[:, horizon + 1 :], 0, 1)  # [H, N]

    def act(state, row_keys):
        feat = feature_fn(state)  # [N, F]
        mean, std = policy_fn(sg(feat))  # [N, A] each
        action = jax.vmap(truncated_normal_sample)(row_keys, mean, std)
        return feat, action, mean, std

    def step(state, xs):
        act_keys, dyn_keys = xs
        feat, action, mean, std = act(state, act_keys)
        next_state = step_fn(state, action, dyn_keys)
        return next_state, (state, feat, action, mean, std)

    last, (states, feats, actions, means, stds) = jax.lax.scan(step, start, (action_keys[:horizon], dynamics_keys))
    feat_h, action_h, mean_h, std_h = act(last, action_keys[horizon])

    def append(seq, final):
        return jnp.concatenate([seq, final[None]], 0)

    return {
        "state": jax.tree.map(append, states, last),
        "feat": append(feats, feat_h),
        "action": append(actions, action_h),
        "mean": append(means, mean_h),
        "std": append(stds, std_h),
    }


# ----------------------------------------------------------------------------------------------
# Losses
# ----------------------------------------------------------------------------------------------


def actor_critic_losses(
    params: dict[str, Params],
    slow_critic_params: Params,
    start: State,
    keys: jax.Array,
    *,
    actor_apply: Callable[[Params, jax.Array], tuple[jax.Array, jax.Array]],
    critic_apply: Callable[[Params, jax.Array], jax.Array],
    step_fn: StepFn,
    reward_fn: Callable[[jax.Array], jax.Array],
    config: ActorCriticConfig,
    feature_fn: FeatureFn = feature,
) -> tuple[jax.Array, jax.Array, dict[str, jax.Array]]:
    """``(actor_loss, critic_loss, metrics)``; ``actor_critic_loss`` is their sum for one
    ``jax.grad(..., has_aux=True)`` w.r.t. ``params = {'actor': ..., 'critic': ...}``.

    ``actor_apply(actor_params, feat) -> (mean, std)`` and ``critic_apply(params, feat) ->
    value [...]`` (used for both the online and the slow critic) apply the Flax modules;
    ``step_fn`` is the world model's prior step with the action encoder applied (``imagine``);
    ``reward_fn(feat [H + 1, N, F]) -> [H + 1, N]`` is the reward head's mean. World-model and
    reward-head parameters are closed over, so they are constants of this function; gradients
    still flow *through* them. ``start`` is ``[N, ...]`` (e.g. all ``B * T`` posteriors
    flattened), ``keys`` ``[N]`` as in ``imagine``.

    Gradient routing, why one sum is enough:

    * the actor loss depends on ``params['actor']`` (through the sampled actions, the dynamics,
      the reward head and the *slow* critic, and through the entropy) and on no critic
      parameter, because the lambda-returns use ``slow_critic_params``, an argument that is not
      differentiated;
    * the critic loss sees only ``sg(feat)`` and ``sg(V^lambda)``, so it is constant in the
      actor's parameters.

    Hence ``d(actor + critic)/d actor = d actor_loss/d actor`` and likewise for the critic.
    Index ranges are in the module docstring (actor: k = 0..H-2, critic: k = 0..H-1).
    """
    horizon = config.horizon
    traj = imagine(lambda feat: actor_apply(params["actor"], feat), step_fn, start, horizon, keys, feature_fn)
    feat = traj["feat"]  # [H+1, N, F]
    reward = reward_fn(feat).astype(jnp.float32)  # [H+1, N]
    chex.assert_shape(reward, feat.shape[:2])
    slow_value = critic_apply(slow_critic_params, feat).astype(jnp.float32)  # [H+1, N]
    chex.assert_shape(slow_value, feat.shape[:2])
    discount = jnp.full(reward.shape, config.discount, jnp.float32)  # [H+1, N]
    target = lambda_returns(reward, slow_value, discount, config.lambda_)  # [H, N]
    weight = discount_weights(discount)  # [H+1, N]

    # Actor: dynamics backpropagation; V^l_{k+1} is the return after a_k, k = 0..H-2.
    entropy = truncated_normal_entropy(traj["mean"][:-2], traj["std"][:-2])  # [H-1, N]
    objective = target[1:] + config.actor_ent * entropy  # [H-1, N]
    actor_loss = -jnp.mean(weight[:-2] * objective)

    # Critic: regress the online critic on sg features towards sg targets, k = 0..H-1.
    value = critic_apply(params["critic"], sg(feat[:-1])).astype(jnp.float32)  # [H, N]
    chex.assert_shape(value, target.shape)
    critic_loss = jnp.mean(weight[:-1] * 0.5 * jnp.square(value - sg(target)))

    metrics = sg(
        {
            "actor_loss": actor_loss,
            "critic_loss": critic_loss,
            "actor_entropy": jnp.mean(entropy),
            "imag_reward": jnp.mean(reward),
            "lambda_return": jnp.mean(target),
            "critic_value": jnp.mean(value),
            "slow_value": jnp.mean(slow_value),
            "action_std": jnp.mean(traj["std"]),
        }
    )
    return actor_loss, critic_loss, metrics


def actor_critic_loss(
    params: dict[str, Params], slow_critic_params: Params, start: State, keys: jax.Array, **kwargs
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """``(actor_loss + critic_loss, metrics)``, the function to differentiate once w.r.t.
    ``{'actor': ..., 'critic': ...}``; keyword arguments as ``actor_critic_losses``, whose
    docstring explains why each network then gets exactly its own loss's gradient."""
    actor_loss, critic_loss, metrics = actor_critic_losses(params, slow_critic_params, start, keys, **kwargs)
    return actor_loss + critic_loss, metrics


def update_slow_critic(slow: Params, critic: Params, updates: jax.Array | int, every: int) -> Params:
    """Hard copy ``critic -> slow`` when ``updates % every == 0`` (fraction 1), else keep ``slow``.

    As the original ``update_slow_target``, call it after each actor-critic optimizer step with
    ``updates`` = the number of actor-critic updates done *before* this one (0, 1, 2, ...): the
    first update copies, then every ``every``-th. Traceable (``jnp.where``), no Python branch.
    """
    copy = jnp.asarray(updates) % every == 0
    return jax.tree.map(lambda s, c: jnp.where(copy, c, s).astype(s.dtype), slow, critic)
