"""The fine-tuning agent: a world model driven by real actions plus a Dreamer actor-critic
(spec sections 5-7, 9.2).

PreLAR and DreamerV2 are configurations of this one class:

* PreLAR: the pre-trained ResNet encoder, decoder and RSSM are loaded (``pretrained.load_pretrained``);
  real actions reach the RSSM's action-code slot through a new ``action_encoder`` MLP; the reward
  target carries APV's intrinsic bonus (``prelar_jax.learners.intrinsic``); an auxiliary reward head
  regresses the extrinsic reward; the encoder and RSSM form their own optimiser group at learning
  rate 0 for the first ``pretrain`` updates.
* DreamerV2: plain-CNN encoder and decoder, raw actions into the RSSM, no bonus, no auxiliary
  head, one optimiser group.
* APV (``stacked``, spec 9.1): the pre-trained action-free RSSM (``af_rssm``, fed zeros) reads the
  encoder embedding; a new action-conditional RSSM reads its features, with the real action
  zero-padded to 50 (``action_encoder.kind = 'pad'``); the bonus reads the action-free features.
  Without ``stacked``, ``'pad'`` with APV weights is the "naive fine-tune" ablation.

One update (``update``) is a world-model step followed by an actor-critic step on the same
batch: the posteriors of the world-model forward pass (detached) seed imagination in the
*updated* world model, as the original does. The actor-critic learner is a separate set of
pure functions (``prelar_jax.learners.actor_critic``) that reads the world model's parameters without
changing them.
"""

from __future__ import annotations

from typing import Any, Callable

import chex
import flax
import jax
import jax.numpy as jnp
import ml_collections
import optax

from prelar_jax.learners import actor_critic, intrinsic
from prelar_jax.model import distributions, world_model
from prelar_jax.model.dynamics import DYNAMICS
from prelar_jax.model.action_encoders import make_action_encoder
from prelar_jax.learners import optim
from prelar_jax.learners.losses import weighted_sum
from prelar_jax.learners.optim import adam
from prelar_jax.model.nets.heads import Actor, ScalarHead
from prelar_jax.model.nets.rssm import RSSM, State, feature
from prelar_jax.types import Metrics, Params

sg = jax.lax.stop_gradient

ACTOR_CRITIC_MODULES = ("actor", "critic")
PRETRAINED_MODULES = ("encoder", "decoder", "rssm")  # what load_pretrained copies


def pretrained_module_map(config: ml_collections.ConfigDict) -> dict[str, str]:
    """Pre-training module -> fine-tuning module: APV's stacked agent takes the pre-trained RSSM
    as its action-free RSSM."""
    return DYNAMICS[bool(config.get("stacked", False))].pretrained_map(PRETRAINED_MODULES)


@flax.struct.dataclass
class AgentState:
    """Everything that changes during fine-tuning; jitted, sharded and checkpointed as a whole."""

    step: jax.Array  # int32: updates applied (world model and actor-critic together)
    params: Params  # world model: encoder, decoder, rssm, action_encoder?, reward, aux_reward?;
    #                 learner: actor, critic
    slow_critic: Params  # the target critic (hard copy every slow_update_every updates)
    batch_stats: Params  # BatchNorm running statistics of the encoder and decoder
    model_opt_state: optax.OptState
    actor_critic_opt_state: optax.OptState
    intrinsic: Any  # intrinsic.IntrinsicState, or {} when the bonus is off


class FinetuneAgent(world_model.ImageWorldModel):
    """Module definitions of one fine-tuning config and the pure functions over their parameters."""

    def __init__(self, config: ml_collections.ConfigDict, bn_axis_name: str | None = None):
        self.config = config
        self.action_encoder = make_action_encoder(config)
        super().__init__(config.model, config.image_size, self.action_encoder.code_size, bn_axis_name)
        self.dynamics = DYNAMICS[bool(config.stacked)](self.rssm, self.action_dim, self.feat_dim)
        heads = config.heads
        self.reward_head = ScalarHead(heads.layers, heads.units, dtype=self.dtype)
        self.aux_reward_head = (
            ScalarHead(heads.layers, heads.units, dtype=self.dtype) if config.loss.aux_reward_scale > 0 else None
        )
        self.actor = Actor(
            heads.layers, heads.units, config.action_dim, min_std=config.actor_critic.min_std, dtype=self.dtype
        )
        self.critic = ScalarHead(heads.layers, heads.units, dtype=self.dtype)
        ac_cfg = config.actor_critic
        self.ac_config = actor_critic.ActorCriticConfig(
            horizon=ac_cfg.horizon,
            discount=ac_cfg.discount,
            lambda_=ac_cfg.lambda_,
            actor_ent=ac_cfg.actor_ent,
            slow_update_every=ac_cfg.slow_update_every,
        )
        self.use_intrinsic = config.intrinsic.beta > 0
        self.model_optimizer = self._make_model_optimizer()
        self.actor_critic_optimizer = optax.multi_transform(
            {"actor": adam(config.optimizer, ac_cfg.actor_lr), "critic": adam(config.optimizer, ac_cfg.critic_lr)},
            {"actor": "actor", "critic": "critic"},
        )

    # ------------------------------------------------------------------------------------------
    # Parameters and optimisers
    # ------------------------------------------------------------------------------------------

    def world_model_modules(self) -> tuple[str, ...]:
        names = ["encoder", "decoder", "rssm", "reward", *self.dynamics.extra_modules]
        if self.action_encoder.module is not None:
            names.append(self.action_encoder.module)
        if self.aux_reward_head is not None:
            names.append("aux_reward")
        return tuple(sorted(names))

    def pretrained_group(self) -> tuple[str, ...]:
        group = [name.strip() for name in self.config.optimizer.pretrained_group.split(",") if name.strip()]
        unknown = sorted(set(group) - set(self.world_model_modules()))
        if unknown:
            raise ValueError(
                f"optimizer.pretrained_group names {unknown}, which are not world-model "
                f"modules of this agent: {self.world_model_modules()}"
            )
        return tuple(group)

    def _make_model_optimizer(self) -> optax.GradientTransformation:
        """Spec 5.2: the pre-trained group (encoder + RSSM) at learning rate 0 for the first
        ``pretrain`` updates, then ``lr``; everything else at ``lr`` from the start. Each group
        is clipped by its own global norm (``multi_transform``); Adam moments keep accumulating
        during the zero-rate phase, as in the original."""
        opt = self.config.optimizer
        group = self.pretrained_group()
        if not group:
            return adam(opt)
        warmup, lr = self.config.pretrain, opt.lr
        schedule = lambda count: jnp.where(count < warmup, 0.0, lr)  # noqa: E731
        labels = {name: "pretrained" if name in group else "model" for name in self.world_model_modules()}
        return optax.multi_transform({"pretrained": adam(opt, schedule), "model": adam(opt)}, labels)

    def init(self, key: jax.Array) -> tuple[Params, Params]:
        """Fresh ``(params, batch_stats)``; shapes do not depend on the batch."""
        keys = jax.random.split(key, 8)
        params, batch_stats = {}, {}
        self._init_world_model(keys[:3], params, batch_stats)
        feat = jnp.zeros((2, self.feat_dim))
        self.dynamics.init(params, keys[1])
        if self.action_encoder.module is not None:
            params[self.action_encoder.module] = self.action_encoder.init(keys[3], self.config.action_dim)
        params["reward"] = self.reward_head.init(keys[4], feat)["params"]
        if self.aux_reward_head is not None:
            params["aux_reward"] = self.aux_reward_head.init(keys[5], feat)["params"]
        params["actor"] = self.actor.init(keys[6], feat)["params"]
        params["critic"] = self.critic.init(keys[7], feat)["params"]
        return params, batch_stats

    def bonus_feature_dim(self) -> int:
        """Width of the intrinsic bonus's features: what the action-conditional RSSM observes (the
        encoder embedding, or the action-free RSSM's feature when stacked, APV)."""
        frames = jax.ShapeDtypeStruct((1, 1, self.image_size, self.image_size, 3), jnp.uint8)
        params, batch_stats = jax.eval_shape(self.init, jax.random.key(0))

        def observed(params, batch_stats, frames):
            embed = self._encode_frames(params, batch_stats, {}, frames, False)[1]
            keys = world_model.example_keys(jax.random.key(0), jnp.arange(1), 1)
            return self.dynamics.observe_input(params, embed, jnp.ones((1, 1), bool), keys)

        return jax.eval_shape(observed, params, batch_stats, frames).shape[-1]

    def init_state(self, key: jax.Array, params: Params | None = None, batch_stats: Params | None = None) -> AgentState:
        """A fresh state, built by one compiled function. ``params``/``batch_stats`` (e.g. with
        pre-trained modules loaded) replace the fresh ones; optimiser states start from them."""
        embed_dim = self.bonus_feature_dim()

        def build(key, params, batch_stats):
            init_key, intrinsic_key = jax.random.split(key)
            fresh_params, fresh_stats = self.init(init_key)
            params = fresh_params if params is None else params
            batch_stats = fresh_stats if batch_stats is None else batch_stats
            wm = {k: params[k] for k in self.world_model_modules()}
            ac_params = {k: params[k] for k in ACTOR_CRITIC_MODULES}
            intrinsic_state = {}
            if self.use_intrinsic:
                cfg = self.config.intrinsic
                intrinsic_state = intrinsic.init_intrinsic(intrinsic_key, embed_dim, cfg.queue_dim, cfg.capacity)
            return AgentState(
                step=jnp.zeros((), jnp.int32),
                params=params,
                slow_critic=jax.tree.map(jnp.copy, params["critic"]),
                batch_stats=batch_stats,
                model_opt_state=self.model_optimizer.init(wm),
                actor_critic_opt_state=self.actor_critic_optimizer.init(ac_params),
                intrinsic=intrinsic_state,
            )

        return jax.jit(build)(key, params, batch_stats)

    # ------------------------------------------------------------------------------------------
    # World model
    # ------------------------------------------------------------------------------------------

    def encode_action(self, params: Params, action: jax.Array) -> jax.Array:
        """Real actions ``[..., 4]`` -> the RSSM's action input ``[..., action_dim]``."""
        return self.action_encoder(params, action)

    def world_model_loss(
        self,
        params: Params,
        batch_stats: Params,
        intrinsic_state: Any,
        batch: dict[str, jax.Array],
        key: jax.Array,
        example_index: jax.Array,
    ):
        """Spec 5.3: ``L = kl*L_KL + image*L_image + reward*L_reward + aux*L_aux``.

        ``batch``: ``image`` ``[B, T, H, W, 3]`` uint8, ``action`` ``[B, T, 4]``, ``reward``
        ``[B, T]``, ``is_first`` ``[B, T]`` (the local shard); ``params`` holds the world-model
        modules only. The reward head regresses ``r_t + beta * r^int_t`` for the first
        ``T - window + 1`` steps (all T when the bonus is off); the auxiliary head regresses
        ``r_t`` on all steps. Both heads read the non-detached feature, so they train the
        representation too (``grad_heads: [decoder, reward]``, and the aux head as in the
        original). Returns ``(loss, (new_batch_stats, posterior, new_bonus, metrics))``.
        """
        cfg = self.config.loss
        image, action, reward, is_first = batch["image"], batch["action"], batch["reward"], batch["is_first"]
        chex.assert_rank(image, 5)
        chex.assert_type(image, jnp.uint8)
        batch_size, length = image.shape[:2]
        chex.assert_shape([reward, is_first], (batch_size, length))
        chex.assert_shape(action, (batch_size, length, self.config.action_dim))
        new_batch_stats: Params = {}

        frames, embed = self._encode_frames(params, batch_stats, new_batch_stats, image, train=True)
        codes = self.encode_action(params, action)
        keys = world_model.example_keys(key, example_index, length)
        action_free_keys = world_model.example_keys(jax.random.fold_in(key, 1), example_index, length)
        embed = self.dynamics.observe_input(params, embed, is_first, action_free_keys)
        post, prior = world_model.observe(self.rssm, params["rssm"], embed, codes, is_first, keys)
        kl_loss, kl_value = distributions.balanced_kl_loss(post["logit"], prior["logit"], cfg.kl_balance, cfg.kl_free)
        feat = feature(post)
        recon = self._decode_features(params, batch_stats, new_batch_stats, feat, train=True)
        image_loss = -world_model.image_log_likelihood(recon, frames).mean()

        reward = reward.astype(jnp.float32)
        metrics: Metrics = {}
        if self.use_intrinsic:
            intrinsic_cfg = self.config.intrinsic
            intrinsic_reward_t, intrinsic_state, intrinsic_metrics = intrinsic.intrinsic_reward(
                intrinsic_state,
                embed,
                intrinsic_cfg.window,
                intrinsic_cfg.k,
                intrinsic_cfg.momentum,
                axis_name=self.axis_name,
            )
            steps = intrinsic_reward_t.shape[1]
            target = reward[:, :steps] + intrinsic_cfg.beta * intrinsic_reward_t
            predicted = self.reward_head.apply({"params": params["reward"]}, feat[:, :steps])
            metrics.update(intrinsic_metrics)
        else:
            target = reward
            predicted = self.reward_head.apply({"params": params["reward"]}, feat)
        reward_loss = jnp.mean(0.5 * jnp.square(predicted - sg(target)))
        losses = {"kl": kl_loss, "image": image_loss, "reward": reward_loss}
        scales = {"kl": cfg.kl_scale, "image": cfg.image_scale, "reward": cfg.reward_scale}
        if self.aux_reward_head is not None:
            aux = self.aux_reward_head.apply({"params": params["aux_reward"]}, feat)
            aux_loss = jnp.mean(0.5 * jnp.square(aux - reward))
            losses["aux_reward"], scales["aux_reward"] = aux_loss, cfg.aux_reward_scale
            metrics["aux_reward_loss"] = aux_loss
        total = weighted_sum(losses, scales)
        metrics.update(
            {
                "model_loss": total,
                "kl": kl_value,
                "kl_loss": kl_loss,
                "image_loss": image_loss,
                "reward_loss": reward_loss,
                "reward_target": target.mean(),
                "prior_entropy": distributions.categorical_entropy(prior["logit"]).mean(),
                "post_entropy": distributions.categorical_entropy(post["logit"]).mean(),
            }
        )
        return total, (new_batch_stats, post, intrinsic_state, metrics)

    # ------------------------------------------------------------------------------------------
    # Actor-critic
    # ------------------------------------------------------------------------------------------

    def _img_step(self, wm_params: Params):
        def step(state: State, action: jax.Array, keys: jax.Array) -> State:
            code = self.encode_action(wm_params, action)
            return self.rssm.apply({"params": wm_params["rssm"]}, state, code, keys, method=RSSM.img_step)

        return step

    def actor_critic_loss(
        self, ac_params: Params, wm_params: Params, slow_critic: Params, start: State, keys: jax.Array
    ):
        """Imagination from ``start`` (``[N, ...]`` detached posteriors) in the world model
        ``wm_params`` (constants here; gradients flow through them into the actions)."""
        return actor_critic.actor_critic_loss(
            ac_params,
            slow_critic,
            start,
            keys,
            actor_apply=lambda p, f: self.actor.apply({"params": p}, f),
            critic_apply=lambda p, f: self.critic.apply({"params": p}, f),
            step_fn=self._img_step(wm_params),
            reward_fn=lambda f: self.reward_head.apply({"params": wm_params["reward"]}, f),
            config=self.ac_config,
        )

    # ------------------------------------------------------------------------------------------
    # One update (called per device inside shard_map)
    # ------------------------------------------------------------------------------------------

    def _world_model_step(
        self,
        state: AgentState,
        batch: dict[str, jax.Array],
        key: jax.Array,
        example_index: jax.Array,
        mean: Callable[[Any], Any],
    ):
        """The world-model half of an update, before the finite check: gradients (averaged by
        ``mean``), the optimiser step, and the detached-to-be posteriors ``[B, T, ...]``."""
        wm_params = {k: state.params[k] for k in self.world_model_modules()}
        grad_fn = jax.value_and_grad(self.world_model_loss, has_aux=True)
        (_, (new_batch_stats, post, intrinsic_state, wm_metrics)), wm_grads = grad_fn(
            wm_params, state.batch_stats, state.intrinsic, batch, key, example_index
        )
        wm_grads = mean(wm_grads)
        wm_params, model_opt_state = optim.apply_update(
            self.model_optimizer, wm_grads, state.model_opt_state, wm_params
        )
        return wm_params, model_opt_state, new_batch_stats, post, intrinsic_state, wm_metrics, wm_grads

    def imagination_start(self, post: State, key: jax.Array, example_index: jax.Array) -> tuple[State, jax.Array]:
        """Every posterior state of the batch as a start row, ``[B * T, ...]`` (detached), and
        one key per row: row (b, t) -> global ``b * T + t`` folded into ``key``, so the samples
        do not depend on the device count."""
        batch_size, length = post["deter"].shape[:2]
        start = jax.tree.map(lambda v: sg(v.reshape((batch_size * length,) + v.shape[2:])), post)
        rows = (example_index[:, None] * length + jnp.arange(length)[None]).reshape(-1)
        keys = jax.vmap(lambda i: jax.random.fold_in(key, i))(rows)
        return start, keys

    def imagine(self, params: Params, start: State, keys: jax.Array) -> dict[str, Any]:
        """The actor-critic's imagined rollout (``actor_critic.imagine``, ``horizon`` steps from
        each of the ``N`` start rows) alone, forward only: what ``actor_critic_loss`` rolls out,
        exposed for measuring it."""
        return actor_critic.imagine(
            lambda f: self.actor.apply({"params": params["actor"]}, f),
            self._img_step(params),
            start,
            self.ac_config.horizon,
            keys,
        )

    def _actor_critic_step(
        self,
        state: AgentState,
        wm_params: Params,
        post: State,
        key: jax.Array,
        example_index: jax.Array,
        mean: Callable[[Any], Any],
    ):
        """The actor-critic half of an update, before the finite check: imagination from every
        posterior of ``post`` in the world model ``wm_params``, gradients, optimiser step and
        the slow-critic copy."""
        start, keys = self.imagination_start(post, key, example_index)
        ac_params = {k: state.params[k] for k in ACTOR_CRITIC_MODULES}
        (_, ac_metrics), ac_grads = jax.value_and_grad(self.actor_critic_loss, has_aux=True)(
            ac_params, wm_params, state.slow_critic, start, keys
        )
        ac_grads = mean(ac_grads)
        ac_params, ac_opt_state = optim.apply_update(
            self.actor_critic_optimizer, ac_grads, state.actor_critic_opt_state, ac_params
        )
        slow = actor_critic.update_slow_critic(
            state.slow_critic, ac_params["critic"], state.step, self.ac_config.slow_update_every
        )
        return ac_params, ac_opt_state, slow, ac_metrics, ac_grads

    def update(
        self,
        state: AgentState,
        batch: dict[str, jax.Array],
        key: jax.Array,
        example_index: jax.Array,
        axis_name: str | None = None,
    ) -> tuple[AgentState, Metrics]:
        """World-model step, then actor-critic step on the same batch. ``example_index`` ``[B]``
        is each local row's index in the global batch (it seeds the row's samples, so the
        result does not depend on the device count); gradients and metrics are averaged over
        ``axis_name`` (None: a single device without a mesh)."""
        mean = _mean_over(axis_name)
        wm_key, ac_key = jax.random.split(key)
        wm_params, model_opt_state, new_batch_stats, post, intrinsic_state, wm_metrics, wm_grads = (
            self._world_model_step(state, batch, wm_key, example_index, mean)
        )
        # Imagination from every posterior state of the batch, in the *updated* world model.
        ac_params, ac_opt_state, slow, ac_metrics, ac_grads = self._actor_critic_step(
            state, wm_params, post, ac_key, example_index, mean
        )

        metrics = mean({**wm_metrics, **ac_metrics})
        metrics["model_grad_norm"] = optax.tree.norm(wm_grads)
        metrics["actor_grad_norm"] = optax.tree.norm(ac_grads["actor"])
        metrics["critic_grad_norm"] = optax.tree.norm(ac_grads["critic"])
        # A non-finite loss or gradient anywhere skips the whole update (same decision on every
        # device: gradients and metrics are averaged); the step counter still advances.
        new_state = _apply_if_finite(
            state,
            metrics,
            (metrics["model_loss"], metrics["actor_loss"], metrics["critic_loss"], wm_grads, ac_grads),
            params={**wm_params, **ac_params},
            slow_critic=slow,
            batch_stats={**state.batch_stats, **new_batch_stats},
            model_opt_state=model_opt_state,
            actor_critic_opt_state=ac_opt_state,
            intrinsic=intrinsic_state,
        )
        return new_state.replace(step=state.step + 1), metrics

    def update_world_model(
        self,
        state: AgentState,
        batch: dict[str, jax.Array],
        key: jax.Array,
        example_index: jax.Array,
        axis_name: str | None = None,
    ) -> tuple[AgentState, Metrics, State]:
        """The world-model half of ``update`` alone (same ``key``: the update's key, split the
        same way), for measuring it. Returns the state with the world model updated (the step
        counter is *not* advanced: it counts whole updates), its metrics, and the posteriors
        ``[B, T, ...]`` that seed ``update_actor_critic``. A non-finite world-model loss or
        gradient skips this half only."""
        mean = _mean_over(axis_name)
        wm_key, _ = jax.random.split(key)
        wm_params, model_opt_state, new_batch_stats, post, intrinsic_state, wm_metrics, wm_grads = (
            self._world_model_step(state, batch, wm_key, example_index, mean)
        )
        metrics = mean(wm_metrics)
        metrics["model_grad_norm"] = optax.tree.norm(wm_grads)
        new_state = _apply_if_finite(
            state,
            metrics,
            (metrics["model_loss"], wm_grads),
            params={**state.params, **wm_params},
            batch_stats={**state.batch_stats, **new_batch_stats},
            model_opt_state=model_opt_state,
            intrinsic=intrinsic_state,
        )
        return new_state, metrics, sg(post)

    def update_actor_critic(
        self, state: AgentState, post: State, key: jax.Array, example_index: jax.Array, axis_name: str | None = None
    ) -> tuple[AgentState, Metrics]:
        """The actor-critic half of ``update`` alone: imagination from every posterior of
        ``post`` (``[B, T, ...]``, the local rows) in the world model of ``state``. After
        ``update_world_model`` with the same ``key`` this is the rest of ``update`` (the two
        halves skip non-finite updates separately, ``update`` skips both together); advances
        the step counter."""
        mean = _mean_over(axis_name)
        _, ac_key = jax.random.split(key)
        wm_params = {k: state.params[k] for k in self.world_model_modules()}
        ac_params, ac_opt_state, slow, ac_metrics, ac_grads = self._actor_critic_step(
            state, wm_params, post, ac_key, example_index, mean
        )
        metrics = mean(ac_metrics)
        metrics["actor_grad_norm"] = optax.tree.norm(ac_grads["actor"])
        metrics["critic_grad_norm"] = optax.tree.norm(ac_grads["critic"])
        new_state = _apply_if_finite(
            state,
            metrics,
            (metrics["actor_loss"], metrics["critic_loss"], ac_grads),
            params={**state.params, **ac_params},
            slow_critic=slow,
            actor_critic_opt_state=ac_opt_state,
        )
        return new_state.replace(step=state.step + 1), metrics

    # ------------------------------------------------------------------------------------------
    # Acting and media
    # ------------------------------------------------------------------------------------------

    def initial_carry(self, num_envs: int) -> dict[str, Any]:
        """The policy's recurrent state for ``num_envs`` environments: the latent(s) and the
        previous action (all zero; ``is_first`` masks them anyway)."""
        return {
            "latent": self.rssm.initial(num_envs),
            "action": jnp.zeros((num_envs, self.config.action_dim), jnp.float32),
            **self.dynamics.initial_carry(num_envs),
        }

    def policy(
        self,
        params: Params,
        batch_stats: Params,
        carry: dict[str, Any],
        image: jax.Array,
        is_first: jax.Array,
        key: jax.Array,
        explore: bool,
    ) -> tuple[jax.Array, dict[str, Any]]:
        """One action per environment (spec 5.5). ``image`` ``[N, H, W, 3]`` uint8, ``is_first``
        ``[N]``. The posterior step sees the previous action through the action encoder (zeroed
        by the reset mask on the first step); the latent is sampled in both modes; the action is
        a truncated-normal sample (``explore``) or its mode, the mean (evaluation)."""
        num_envs = image.shape[0]
        _, embed = self._encode_frames(params, batch_stats, {}, image[:, None], train=False)
        code = self.encode_action(params, carry["action"])
        latent_key, action_key, action_free_key = jax.random.split(key, 3)
        embed, new_carry = self.dynamics.observe_step(params, carry, embed[:, 0], is_first, action_free_key)
        latent, _ = self.rssm.apply(
            {"params": params["rssm"]},
            carry["latent"],
            code,
            embed,
            is_first,
            jax.random.split(latent_key, num_envs),
            method=RSSM.obs_step,
        )
        mean, std = self.actor.apply({"params": params["actor"]}, feature(latent))
        if explore:
            action = jax.vmap(distributions.truncated_normal_sample)(jax.random.split(action_key, num_envs), mean, std)
        else:
            action = mean
        return action, {"latent": latent, "action": action, **new_carry}

    def open_loop(
        self, params: Params, batch_stats: Params, batch: dict[str, jax.Array], key: jax.Array, context: int
    ) -> jax.Array:
        """Open-loop prediction ``[B, T, H, W, 3]`` uint8 under the real actions of ``batch``."""
        _, embed = self._encode_frames(params, batch_stats, {}, batch["image"], train=False)
        codes = self.encode_action(params, batch["action"])
        keys = world_model.example_keys(jax.random.fold_in(key, 2), jnp.arange(embed.shape[0]), embed.shape[1])
        embed = self.dynamics.observe_input(params, embed, batch["is_first"], keys)
        return self._open_loop(params, batch_stats, embed, codes, batch["is_first"], key, context)


def _apply_if_finite(state: AgentState, metrics: Metrics, checked: tuple, **updated: Any) -> AgentState:
    """``state`` with the ``updated`` fields if every loss and gradient in ``checked`` is finite,
    else unchanged (the same decision on every device: losses and gradients are averaged);
    records ``metrics["nonfinite"]``. The callers advance the step counter either way."""
    kept = {name: getattr(state, name) for name in updated}
    chosen, metrics["nonfinite"] = optim.keep_if_finite(checked, updated, kept)
    return state.replace(**chosen)


def _mean_over(axis_name: str | None) -> Callable[[Any], Any]:
    return (lambda x: x) if axis_name is None else (lambda x: jax.lax.pmean(x, axis_name))
