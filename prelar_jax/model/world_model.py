"""Pure-functional RSSM unrolls and world-model losses shared by every method.

``observe`` and ``imagine`` are ``jax.lax.scan`` loops over the RSSM's single-step methods, called
through ``module.apply`` with explicit parameters; resets are masks (``is_first``), never Python
branches. Every random draw comes from per-example keys so that sharding the batch does not change
the samples.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from prelar_jax.model.nets.common import preprocess_image
from prelar_jax.model.nets.plaincnn import PlainDecoder, PlainEncoder
from prelar_jax.model.nets.resnet import ResNetDecoder, ResNetEncoder
from prelar_jax.model.nets.rssm import RSSM, State, feature


def _time_major(tree):
    return jax.tree.map(lambda x: jnp.swapaxes(x, 0, 1), tree)


def observe(
    rssm: RSSM,
    params,
    embed: jax.Array,
    action: jax.Array,
    is_first: jax.Array,
    keys: jax.Array,
    state: State | None = None,
) -> tuple[State, State]:
    """Posterior unroll. ``embed`` ``[B, T, E]``, ``action`` ``[B, T, A]``, ``is_first`` ``[B, T]``,
    ``keys`` ``[B, T]`` key array. Returns ``(post, prior)`` dicts of ``[B, T, ...]`` arrays."""
    batch = embed.shape[0]
    if state is None:
        state = rssm.initial(batch)

    def step(carry, inputs):
        emb, act, first, key = inputs
        post, prior = rssm.apply({"params": params}, carry, act, emb, first, key, method=RSSM.obs_step)
        return post, (post, prior)

    _, (post, prior) = jax.lax.scan(step, state, _time_major((embed, action, is_first, keys)))
    return _time_major(post), _time_major(prior)


def imagine(rssm: RSSM, params, action: jax.Array, state: State, keys: jax.Array) -> State:
    """Prior unroll from ``state`` under a given action sequence ``[B, H, A]`` (no reset masks)."""

    def step(carry, inputs):
        act, key = inputs
        prior = rssm.apply({"params": params}, carry, act, key, method=RSSM.img_step)
        return prior, prior

    _, prior = jax.lax.scan(step, state, _time_major((action, keys)))
    return _time_major(prior)


def image_log_likelihood(mean: jax.Array, target: jax.Array) -> jax.Array:
    """Unit-variance Gaussian log-likelihood without the constant, summed over H, W, C."""
    diff = mean.astype(jnp.float32) - target.astype(jnp.float32)
    return -0.5 * jnp.sum(jnp.square(diff), axis=(-3, -2, -1))


def example_keys(key: jax.Array, example_index: jax.Array, steps: int) -> jax.Array:
    """``[B, steps]`` keys, one stream per example, from its *global* index in the batch."""
    return jax.vmap(lambda i: jax.random.split(jax.random.fold_in(key, i), steps))(example_index)


class ImageWorldModel:
    """Encoder, RSSM and decoder of one configuration, with the helpers every method applies them
    through: pre-training (``prelar_jax.learners.pretrain.PretrainModel``) and fine-tuning
    (``prelar_jax.learners.finetune.FinetuneAgent``) are subclasses that add their own action source.

    ``model`` is the config's ``model`` block; ``action_dim`` the width of the RSSM's action input
    (the implicit- or real-action code, raw actions, or APV's zeros).
    """

    def __init__(self, model, image_size: int, action_dim: int, bn_axis_name: str | None = None):
        self.axis_name = bn_axis_name
        self.image_size = image_size
        self.action_dim = action_dim
        self.dtype = jnp.dtype(model.compute_dtype)
        if model.encoder == "resnet":
            remat = bool(model.get("remat", False))
            self.encoder = ResNetEncoder(
                model.depth, model.stages, bn_axis_name=bn_axis_name, dtype=self.dtype, remat=remat
            )
            self.decoder = ResNetDecoder(
                model.depth,
                model.stages,
                image_size=image_size,
                bn_axis_name=bn_axis_name,
                dtype=self.dtype,
                remat=remat,
            )
        elif model.encoder == "plain":
            self.encoder = PlainEncoder(model.depth, dtype=self.dtype)
            self.decoder = PlainDecoder(model.depth, dtype=self.dtype)
        else:
            raise ValueError(f"model.encoder={model.encoder!r}: expected 'resnet' or 'plain'")
        self.rssm = RSSM(model.deter, model.hidden, model.stoch, model.classes, dtype=self.dtype)
        self.feat_dim = model.stoch * model.classes + model.deter

    def _init_world_model(self, keys: jax.Array, params: dict, batch_stats: dict) -> int:
        """Initialises encoder (``keys[0]``), RSSM (``keys[1]``) and decoder (``keys[2]``) into
        ``params``/``batch_stats`` for a 2-frame dummy batch; returns the embedding width."""
        frames = jnp.zeros((2, self.image_size, self.image_size, 3), jnp.float32)

        def add(name, variables):
            params[name] = variables["params"]
            if "batch_stats" in variables:
                batch_stats[name] = variables["batch_stats"]

        add("encoder", self.encoder.init(keys[0], frames, train=False))
        embed_dim = jax.eval_shape(
            lambda v: self.encoder.apply(v, frames, train=False),
            {
                "params": params["encoder"],
                **({"batch_stats": batch_stats["encoder"]} if "encoder" in batch_stats else {}),
            },
        ).shape[-1]
        add(
            "rssm",
            self.rssm.init(
                keys[1],
                self.rssm.initial(2),
                jnp.zeros((2, self.action_dim)),
                jnp.zeros((2, embed_dim)),
                jnp.ones((2,), bool),
            ),
        )
        add("decoder", self.decoder.init(keys[2], jnp.zeros((2, self.feat_dim)), train=False))
        return embed_dim

    def _apply(self, name: str, module, params, batch_stats, new_batch_stats, *args, train: bool):
        """``module.apply`` with its BatchNorm statistics; in training mode the updated
        statistics are written into ``new_batch_stats[name]``."""
        variables = {"params": params[name]}
        if name in batch_stats:
            variables["batch_stats"] = batch_stats[name]
        if train and name in batch_stats:
            out, updated = module.apply(variables, *args, train=True, mutable=["batch_stats"])
            new_batch_stats[name] = updated["batch_stats"]
            return out
        return module.apply(variables, *args, train=train)

    def _encode_frames(self, params, batch_stats, new_batch_stats, image, train: bool):
        """uint8 ``[B, T, H, W, 3]`` -> preprocessed frames and embeddings ``[B, T, E]``; the
        encoder sees all B*T frames at once (BatchNorm statistics over the whole batch)."""
        batch_size, length = image.shape[:2]
        frames = preprocess_image(image)  # [B, T, H, W, 3] in [-0.5, 0.5]
        flat_frames = frames.reshape((batch_size * length,) + frames.shape[2:])
        embed = self._apply("encoder", self.encoder, params, batch_stats, new_batch_stats, flat_frames, train=train)
        return frames, embed.reshape(batch_size, length, -1)

    def _decode_features(self, params, batch_stats, new_batch_stats, feat, train: bool):
        """Features ``[B, T, F]`` -> mean images ``[B, T, H, W, 3]`` (all B*T at once)."""
        batch_size, length = feat.shape[:2]
        recon = self._apply(
            "decoder",
            self.decoder,
            params,
            batch_stats,
            new_batch_stats,
            feat.reshape(batch_size * length, -1),
            train=train,
        )
        return recon.reshape((batch_size, length) + recon.shape[1:])

    def _open_loop(self, params, batch_stats, embed, actions, is_first, key, context: int) -> jax.Array:
        """Predicted frames ``[B, T, H, W, 3]`` uint8: posterior reconstructions for the first
        ``context`` steps, then the prior imagined under ``actions[:, context:]`` (already in the
        RSSM's action space). BatchNorm in evaluation mode."""
        batch_size, length = embed.shape[:2]
        index = jnp.arange(batch_size)
        obs_keys = example_keys(jax.random.fold_in(key, 0), index, context)
        post, _ = observe(
            self.rssm, params["rssm"], embed[:, :context], actions[:, :context], is_first[:, :context], obs_keys
        )
        last = jax.tree.map(lambda v: v[:, -1], post)
        img_keys = example_keys(jax.random.fold_in(key, 1), index, length - context)
        prior = imagine(self.rssm, params["rssm"], actions[:, context:], last, img_keys)
        feat = jnp.concatenate([feature(post), feature(prior)], axis=1)
        recon = self._decode_features(params, batch_stats, {}, feat, train=False)
        return jnp.clip((recon + 0.5) * 255.0, 0, 255).astype(jnp.uint8)
