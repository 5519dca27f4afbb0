"""Pre-training of an action-conditional world model on action-free video (spec section 4).

PreLAR and APV are configurations of this one model:

* PreLAR: ``implicit_action.code_type = 'stoch'``. An implicit-action encoder infers a code from
  each adjacent frame pair, the RSSM is conditioned on it, a KL keeps the code close to a prior and
  the action-state consistency loss keeps code distances in the order of their state effects.
* APV: ``implicit_action.code_type = 'none'``. The RSSM is fed zeros (action-free video prediction).

Everything here is a pure function of ``(params, batch_stats, batch, key)``; the step that
differentiates it and shards it over devices is built in ``prelar_jax.runtime.parallel``.
"""

from __future__ import annotations

import chex
import flax
import jax
import jax.numpy as jnp
import ml_collections
import optax

from prelar_jax.learners import consistency
from prelar_jax.model import distributions, world_model
from prelar_jax.learners.action_sources import ACTION_SOURCES
from prelar_jax.model.nets.implicit_action import CodeForwardModel, PixelForwardModel
from prelar_jax.learners.losses import weighted_sum
from prelar_jax.learners.optim import adam
from prelar_jax.model.nets.rssm import RSSM, feature, mask_reset
from prelar_jax.types import Metrics, Params


@flax.struct.dataclass
class TrainState:
    """Everything that changes during pre-training; jitted, sharded and checkpointed as a whole."""

    step: jax.Array  # int32 scalar: number of updates applied
    params: Params  # {'encoder', 'decoder', 'rssm', 'implicit_action'?}
    batch_stats: Params  # BatchNorm running statistics, same keys where a module has BatchNorm
    opt_state: optax.OptState


def make_optimizer(config: ml_collections.ConfigDict) -> optax.GradientTransformation:
    """Pre-training: one Adam over every module."""
    return adam(config.optimizer)


class PretrainModel(world_model.ImageWorldModel):
    """The module definitions of one configuration and the pure functions over their parameters."""

    def __init__(self, config: ml_collections.ConfigDict, bn_axis_name: str | None = None):
        self.config = config
        model, implicit_cfg = config.model, config.implicit_action
        # Chosen once: zeros (APV), random codes (ablation) or the implicit-action network (PreLAR).
        source = ACTION_SOURCES[implicit_cfg.code_type]
        self.action_source = source(config, bn_axis_name, jnp.dtype(model.compute_dtype))
        super().__init__(model, config.image_size, self.action_source.action_dim, bn_axis_name)
        implicit_action = self.implicit_action = self.action_source.network
        self.code_forward = None
        if implicit_action is not None and config.loss.get("code_forward_scale", 0.0) > 0:
            dtype = jnp.dtype(model.compute_dtype)
            if config.loss.code_forward_space == "pixels":
                self.code_forward = PixelForwardModel(depth=model.depth, dtype=dtype)
            else:
                self.code_forward = CodeForwardModel(hidden=implicit_cfg.hidden, dtype=dtype)

    # ------------------------------------------------------------------------------------------
    # Initialisation
    # ------------------------------------------------------------------------------------------

    def init(self, key: jax.Array) -> tuple[Params, Params]:
        """Fresh ``(params, batch_stats)`` for a 2-frame dummy batch (shapes do not depend on B, T)."""
        keys = jax.random.split(key, 4)
        params, batch_stats = {}, {}
        embed_dim = self._init_world_model(keys[:3], params, batch_stats)
        if self.implicit_action is not None:
            size = self.config.image_size
            frames = jnp.zeros((2, size, size, 3), jnp.float32)
            pair = self.action_source.pair_inputs(frames, jnp.zeros((2, embed_dim)))
            variables = self.implicit_action.init(keys[3], pair, pair, train=False)
            params["implicit_action"] = variables["params"]
            if "batch_stats" in variables:
                batch_stats["implicit_action"] = variables["batch_stats"]
        if self.code_forward is not None:
            size = self.config.image_size
            before = (
                jnp.zeros((2, size, size, 3))
                if isinstance(self.code_forward, PixelForwardModel)
                else jnp.zeros((2, embed_dim))
            )
            params["code_forward"] = self.code_forward.init(
                jax.random.fold_in(keys[3], 1), before, jnp.zeros((2, self.action_dim))
            )["params"]
        return params, batch_stats

    def init_state(self, key: jax.Array, optimizer: optax.GradientTransformation) -> TrainState:
        """A fresh train state, built by one compiled function (eager init dispatches hundreds of
        small ops, which takes tens of seconds on CPU the first time)."""

        def build(key):
            params, batch_stats = self.init(key)
            return TrainState(
                step=jnp.zeros((), jnp.int32), params=params, batch_stats=batch_stats, opt_state=optimizer.init(params)
            )

        return jax.jit(build)(key)

    def _codes(self, params, batch_stats, new_batch_stats, frames, embed, keys, train: bool):
        """Implicit-action code parameters ``[B, T-1, ...]`` and RSSM actions ``[B, T, A]``.

        The RSSM action sequence is ``[0, a~_1, ..., a~_{T-1}]``: the code inferred from
        ``(o_{t-1}, o_t)`` is ``a_t``, the action that produced ``o_t`` (Dreamer convention).
        """
        apply_network = lambda prev, curr: self._apply(  # noqa: E731
            "implicit_action", self.implicit_action, params, batch_stats, new_batch_stats, prev, curr, train=train
        )
        return self.action_source.codes(apply_network, frames, embed, keys)

    # ------------------------------------------------------------------------------------------
    # Loss
    # ------------------------------------------------------------------------------------------

    def loss(
        self, params: Params, batch_stats: Params, batch: dict[str, jax.Array], key: jax.Array, example_index: jax.Array
    ) -> tuple[jax.Array, tuple[Params, Metrics]]:
        """``L = kl * L_KL + implicit_kl * L_va + consistency * L_cons + image * L_image``.

        ``batch``: ``image`` ``[B, T, H, W, 3]`` uint8 and ``is_first`` ``[B, T]`` bool, the local
        shard; ``example_index`` ``[B]``: each row's index in the global batch (seeds its samples).
        Under data parallelism (``bn_axis_name`` set) the consistency loss pairs examples across
        the whole global batch.
        """
        cfg = self.config.loss
        image, is_first = batch["image"], batch["is_first"]
        chex.assert_rank(image, 5)
        chex.assert_type(image, jnp.uint8)
        batch_size, length = image.shape[:2]
        chex.assert_shape(is_first, (batch_size, length))
        rssm_key, code_key, perm_key = jax.random.split(key, 3)
        new_batch_stats: Params = {}

        frames, embed = self._encode_frames(params, batch_stats, new_batch_stats, image, train=True)
        code_keys = world_model.example_keys(code_key, example_index, length - 1)
        code_params, actions = self._codes(params, batch_stats, new_batch_stats, frames, embed, code_keys, True)

        keys = world_model.example_keys(rssm_key, example_index, length)
        post, prior = world_model.observe(self.rssm, params["rssm"], embed, actions, is_first, keys)
        kl_loss, kl_value = distributions.balanced_kl_loss(post["logit"], prior["logit"], cfg.kl_balance, cfg.kl_free)
        recon = self._decode_features(params, batch_stats, new_batch_stats, feature(post), train=True)
        image_loss = -world_model.image_log_likelihood(recon, frames).mean()

        metrics: Metrics = {
            "kl": kl_value,
            "kl_loss": kl_loss,
            "image_loss": image_loss,
            "prior_entropy": distributions.categorical_entropy(prior["logit"]).mean(),
            "post_entropy": distributions.categorical_entropy(post["logit"]).mean(),
        }
        losses = {"kl": kl_loss, "image": image_loss}
        scales = {"kl": cfg.kl_scale, "image": cfg.image_scale}
        prior_image_scale = cfg.get("prior_image_scale", 0.0)
        if prior_image_scale:
            # One-step prediction in pixels: decode the prior of o_t (from the posterior of o_{t-1}
            # and the code a~_t) and score it on o_t, t >= 1. The code then has to explain the
            # change between frames directly, not only through the KL of the latent state.
            prior_recon = self._decode_features(params, batch_stats, {}, feature(prior)[:, 1:], train=True)
            prior_image_loss = -world_model.image_log_likelihood(prior_recon, frames[:, 1:]).mean()
            losses["prior_image"], scales["prior_image"] = prior_image_loss, prior_image_scale
            metrics["prior_image_loss"] = prior_image_loss

        code_losses, code_scales, code_metrics = self.action_source.code_losses(code_params, batch.get("step"))
        losses.update(code_losses)
        scales.update(code_scales)
        metrics.update(code_metrics)
        if self.code_forward is not None:
            space = frames if isinstance(self.code_forward, PixelForwardModel) else embed
            forward_loss = self._code_forward_loss(params["code_forward"], space, actions)
            losses["code_forward"], scales["code_forward"] = forward_loss, cfg.code_forward_scale
            metrics["code_forward_loss"] = forward_loss
        if code_params:
            metrics["code_norm"] = jnp.linalg.norm(actions[:, 1:], axis=-1).mean()
        if code_params and cfg.consistency != "off":
            state_dist, action_dist = self._consistency_distances(
                params["rssm"], post, prior, code_params, actions, is_first, perm_key, example_index
            )
            cons = consistency.consistency_loss(state_dist, action_dist, cfg.consistency, cfg.consistency_temperature)
            losses["consistency"], scales["consistency"] = cons, cfg.consistency_scale
            metrics["consistency"] = cons
            if cfg.consistency != "sign":  # the released code's metric, for comparison
                metrics["consistency_sign"] = consistency.consistency_loss(state_dist, action_dist, "sign")
            metrics["state_distance"] = state_dist.mean()
            metrics["action_distance"] = action_dist.mean()
        total = weighted_sum(losses, scales)
        metrics["loss"] = total
        return total, (new_batch_stats, metrics)

    def _code_forward_loss(self, forward_params, seq, actions):
        """Error of the code's forward model: ``x_t`` predicted from ``x_{t-1}`` and ``a~_t``, where
        ``seq`` ``[B, T, ...]`` is the preprocessed frames or the embeddings (stopped, so only the
        code network and the forward model learn from it), as the fraction of the change
        ``x_t - x_{t-1}`` left unexplained (1 = no better than "nothing changes"), pooled over
        the batch."""
        sg = jax.lax.stop_gradient
        prev, curr = sg(seq[:, :-1]).astype(jnp.float32), sg(seq[:, 1:]).astype(jnp.float32)
        flat = lambda x: x.reshape((-1,) + x.shape[2:])
        pred = self.code_forward.apply({"params": forward_params}, flat(prev), flat(actions[:, 1:]))
        error = jnp.sum(jnp.square(pred.astype(jnp.float32) - flat(curr)))
        change = jnp.sum(jnp.square(flat(curr) - flat(prev)))
        return error / (change + 1e-8)

    def _consistency_distances(self, rssm_params, post, prior, code_params, actions, is_first, perm_key, example_index):
        """``d_s`` and ``d_a`` for every pair ``i = (b, t)``, t = 1..T-1, over the global batch.

        A permutation ``pi`` of the global batch (fixed points allowed, one for all t) swaps codes:
        ``d_s(i) = KL(prior_t^b || img_step(post_{t-1}^b, a~_t^{pi(b)}))`` (detached) and
        ``d_a(i) = D(q(a~_t^b), q(a~_t^{pi(b)}))``: the Gaussian KL for stochastic codes plus the
        squared distance of deterministic codes. Returns two ``[N_global]`` vectors, identical on
        every device; gradients reach other devices' codes through ``all_gather``'s transpose.
        """
        sg = jax.lax.stop_gradient
        gather = self._gather
        batch_size, length = actions.shape[:2]
        global_actions = gather(actions)  # [B_global, T, A]
        perm = jax.random.permutation(perm_key, global_actions.shape[0])
        partner = perm[example_index]  # [B] global index of each row's partner
        swapped = sg(global_actions[partner][:, 1:])  # [B, T-1, A]
        prev_state = jax.tree.map(lambda v: sg(v[:, :-1]), post)
        n = batch_size * (length - 1)
        flat = lambda x: x.reshape((n,) + x.shape[2:])
        # The same reset masking observe applied before the true-code prior.
        state, swapped = mask_reset(jax.tree.map(flat, prev_state), flat(swapped), flat(is_first[:, 1:]))
        swapped_prior = self.rssm.apply({"params": rssm_params}, state, swapped, None, method=RSSM.img_step)
        state_dist = sg(distributions.categorical_kl(flat(prior["logit"][:, 1:]), swapped_prior["logit"]))  # [N]

        global_code = jax.tree.map(gather, code_params)
        partner_code = jax.tree.map(lambda v: v[partner], global_code)
        action_dist = self.action_source.code_distance(code_params, partner_code)
        # An example paired with itself is an exact tie (both priors are one computation in
        # exact arithmetic; in float32 they differ by rounding noise that would read as an order).
        own = (partner == example_index)[:, None]
        state_dist = jnp.where(own, 0.0, state_dist.reshape(batch_size, length - 1))
        action_dist = jnp.where(own, 0.0, action_dist)
        state_dist = gather(state_dist).reshape(-1)
        action_dist = gather(action_dist).reshape(-1)
        return state_dist, action_dist

    def _gather(self, x: jax.Array) -> jax.Array:
        if self.axis_name is None:
            return x
        return jax.lax.all_gather(x, self.axis_name, axis=0, tiled=True)

    # ------------------------------------------------------------------------------------------
    # Open-loop prediction (media)
    # ------------------------------------------------------------------------------------------

    def open_loop(
        self, params: Params, batch_stats: Params, batch: dict[str, jax.Array], key: jax.Array, context: int
    ) -> jax.Array:
        """Predicted frames ``[B, T, H, W, 3]`` uint8: posterior reconstructions for the first
        ``context`` steps, then the prior imagined under the codes inferred from the true frames
        (their means; zeros for APV). BatchNorm in evaluation mode (running statistics)."""
        frames, embed = self._encode_frames(params, batch_stats, {}, batch["image"], train=False)
        _, actions = self._codes(params, batch_stats, {}, frames, embed, None, False)
        return self._open_loop(params, batch_stats, embed, actions, batch["is_first"], key, context)
