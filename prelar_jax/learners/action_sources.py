"""Where the pre-training RSSM's action input comes from: one source per
``implicit_action.code_type``, chosen once from ``ACTION_SOURCES``.

* ``ZeroActions`` (``'none'``, APV): zeros; the RSSM learns action-free video prediction.
* ``RandomCodes`` (``'random'``, an ablation): one code per frame pair drawn from the code prior,
  unrelated to the frames (zeros where no keys are given: open-loop media).
* ``ImplicitCodes`` (``'stoch'``, ``'deter'``, ``'mix'``, PreLAR): the implicit-action network
  infers a code from each adjacent frame pair; a stochastic code pays a KL to its prior.

Every source returns the RSSM action sequence ``[0, a~_1, ..., a~_{T-1}]`` (``[B, T, A]``): the
code inferred from ``(o_{t-1}, o_t)`` is ``a_t``, the action that produced ``o_t``.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import ml_collections

from prelar_jax.model import distributions
from prelar_jax.model.nets.implicit_action import ImplicitActionEncoder, code_from_params
from prelar_jax.types import Metrics

# apply(prev, curr) -> code parameters: the implicit-action network on flat frame pairs.
ApplyNetwork = Callable[[jax.Array, jax.Array], dict[str, jax.Array]]


def _with_first_zero(codes: jax.Array) -> jax.Array:
    return jnp.concatenate([jnp.zeros_like(codes[:, :1]), codes], axis=1)


class ZeroActions:
    """APV: the RSSM is fed zeros."""

    network = None  # no implicit-action network: no parameters, no code losses

    def __init__(self, config: ml_collections.ConfigDict, bn_axis_name: str | None = None, dtype=jnp.float32):
        self.config = config.implicit_action
        self.action_dim = self.config.action_dim

    def codes(
        self, apply_network: ApplyNetwork | None, frames: jax.Array, embed: jax.Array, keys: jax.Array | None
    ) -> tuple[dict[str, jax.Array], jax.Array]:
        """``(code_params, actions)``: the network's code parameters ``[B, T-1, ...]`` (empty
        without a network) and the RSSM actions ``[B, T, A]``. ``keys`` ``[B, T-1]`` sample the
        codes (None: their means, for media and probes)."""
        batch, length = embed.shape[:2]
        return {}, jnp.zeros((batch, length, self.action_dim), jnp.float32)

    def code_losses(
        self, code_params: dict[str, jax.Array], step: jax.Array | None
    ) -> tuple[dict[str, jax.Array], dict[str, float | jax.Array], Metrics]:
        """The code's own loss terms, their scales and metrics (none here)."""
        return {}, {}, {}


class RandomCodes(ZeroActions):
    """The ablation: codes from the prior, one per frame pair, unrelated to the frames."""

    def __init__(self, config: ml_collections.ConfigDict, bn_axis_name: str | None = None, dtype=jnp.float32):
        super().__init__(config)
        self.action_dim = self.config.stoch

    def codes(self, apply_network, frames, embed, keys):
        if keys is None:
            return super().codes(apply_network, frames, embed, keys)
        noise = jax.vmap(jax.vmap(lambda k: jax.random.normal(k, (self.action_dim,))))(keys)
        return {}, _with_first_zero(self.config.prior_std * noise)  # [B, T, A]


class ImplicitCodes(ZeroActions):
    """PreLAR: codes inferred by the implicit-action network from each adjacent frame pair."""

    def __init__(self, config: ml_collections.ConfigDict, bn_axis_name: str | None, dtype):
        implicit_cfg, model = config.implicit_action, config.model
        self.network = ImplicitActionEncoder(
            code_type=implicit_cfg.code_type,
            stoch=implicit_cfg.stoch,
            deter=implicit_cfg.deter,
            hidden=implicit_cfg.hidden,
            input=implicit_cfg.input,
            embed_layers=implicit_cfg.embed_layers,
            depth=model.depth,
            stages=model.stages,
            bn_axis_name=bn_axis_name,
            dtype=dtype,
            head_init_scale=implicit_cfg.get("head_init_scale", 1.0),
        )
        super().__init__(config)
        self.action_dim = self.network.code_size
        self.loss_config = config.loss
        self.stochastic = implicit_cfg.code_type in ("stoch", "mix")
        self.deterministic = implicit_cfg.code_type in ("deter", "mix")

    def pair_inputs(self, frames: jax.Array, embed: jax.Array) -> jax.Array:
        """What the network reads from each frame: the preprocessed pixels or the embedding."""
        return frames if self.network.input == "pixels" else embed

    def codes(self, apply_network, frames, embed, keys):
        batch, length = embed.shape[:2]
        seq = self.pair_inputs(frames, embed)
        flat = lambda x: x.reshape((batch * (length - 1),) + x.shape[2:])  # noqa: E731
        code_params = apply_network(flat(seq[:, :-1]), flat(seq[:, 1:]))
        flat_keys = None if keys is None else keys.reshape(-1)
        codes = code_from_params(code_params, flat_keys).reshape(batch, length - 1, -1)
        code_params = jax.tree.map(lambda x: x.reshape((batch, length - 1) + x.shape[1:]), code_params)
        return code_params, _with_first_zero(codes)

    def code_losses(self, code_params, step):
        cfg = self.loss_config
        if not self.stochastic:
            return {}, {}, {}
        prior_std = self.config.prior_std
        implicit_kl = distributions.gaussian_kl(code_params["mean"], code_params["std"], 0.0, prior_std).mean()
        scale = cfg.implicit_kl_scale
        warmup = cfg.get("implicit_kl_warmup", 0)
        if warmup and step is not None:  # KL annealing: the scale ramps from 0 over `warmup` updates
            scale = scale * jnp.minimum(1.0, step.astype(jnp.float32) / warmup)
        # Free nats (0 in the original): below `implicit_kl_free` the code's KL costs nothing,
        # so the code is not pushed onto its prior before the dynamics can use it.
        loss = jnp.maximum(implicit_kl, cfg.get("implicit_kl_free", 0.0))
        metrics = {"implicit_kl": implicit_kl, "implicit_std": code_params["std"].mean()}
        return {"implicit_kl": loss}, {"implicit_kl": scale}, metrics

    def code_distance(self, code: dict[str, jax.Array], other: dict[str, jax.Array]) -> jax.Array:
        """``D(q(a), q(b))`` per pair ``[B, T-1]``: the Gaussian KL of the stochastic part plus the
        squared distance of the deterministic part (the consistency loss's action distance)."""
        distance = jnp.zeros(code[next(iter(code))].shape[:2], jnp.float32)
        if self.stochastic:
            distance += distributions.gaussian_kl(code["mean"], code["std"], other["mean"], other["std"])
        if self.deterministic:
            distance += jnp.sum(jnp.square(code["deter"] - other["deter"]), -1)
        return distance


# implicit_action.code_type -> source, each built as source(config, bn_axis_name, dtype).
ACTION_SOURCES = {
    "none": ZeroActions,
    "random": RandomCodes,
    "stoch": ImplicitCodes,
    "deter": ImplicitCodes,
    "mix": ImplicitCodes,
}
