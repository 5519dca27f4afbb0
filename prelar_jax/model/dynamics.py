"""What the fine-tuning RSSM reads as its observation input: one of two dynamics, chosen once
from ``config.stacked`` (``DYNAMICS``).

* ``SingleDynamics`` (PreLAR, DreamerV2): the RSSM reads the encoder embedding.
* ``StackedDynamics`` (APV, spec 9.1): the pre-trained action-free RSSM (parameters
  ``af_rssm``, fed zeros as in pre-training) reads the embedding, and a new action-conditional
  RSSM (``rssm``) reads the action-free RSSM's posterior features; the intrinsic bonus reads
  those features too.

Both share the RSSM module definition of the world model (``rssm``); they differ in which
parameters exist and in what reaches the action-conditional RSSM's ``embed`` input.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from prelar_jax.model import world_model
from prelar_jax.model.nets.rssm import RSSM, feature
from prelar_jax.types import Params

ACTION_FREE = "af_rssm"  # the parameter name of APV's action-free RSSM (saved in checkpoints)


class SingleDynamics:
    """One RSSM over the encoder embedding."""

    extra_modules: tuple[str, ...] = ()

    def __init__(self, rssm: RSSM, action_dim: int, feat_dim: int):
        self.rssm, self.action_dim, self.feat_dim = rssm, action_dim, feat_dim

    @classmethod
    def pretrained_map(cls, modules: tuple[str, ...]) -> dict[str, str]:
        """Pre-training module -> fine-tuning module (which saved module loads into which)."""
        return {name: name for name in modules}

    def init(self, params: Params, key: jax.Array) -> None:
        """Adds this dynamics' parameters to ``params`` (which holds the world model's ``rssm``
        built for the embedding input)."""

    def observe_input(self, params: Params, embed: jax.Array, is_first: jax.Array, keys: jax.Array) -> jax.Array:
        """What the action-conditional RSSM observes, ``[B, T, *]`` from ``embed`` ``[B, T, E]``
        (``keys`` ``[B, T]``: per-example keys of the action-free RSSM's samples, unused here)."""
        return embed

    def initial_carry(self, num_envs: int) -> dict[str, Any]:
        """The policy's extra recurrent state for ``num_envs`` environments."""
        return {}

    def observe_step(
        self, params: Params, carry: dict[str, Any], embed: jax.Array, is_first: jax.Array, key: jax.Array
    ) -> tuple[jax.Array, dict[str, Any]]:
        """One acting step's observation input ``[N, *]`` and the updated extra carry."""
        return embed, {}


class StackedDynamics(SingleDynamics):
    """APV: an action-free RSSM over the embedding, the action-conditional RSSM over its features."""

    extra_modules = (ACTION_FREE,)

    @classmethod
    def pretrained_map(cls, modules: tuple[str, ...]) -> dict[str, str]:
        return {**super().pretrained_map(modules), "rssm": ACTION_FREE}

    def init(self, params: Params, key: jax.Array) -> None:
        # The RSSM the world model built (zeros action of the same width, embedding input) is the
        # action-free one; the action-conditional RSSM reads its features.
        params[ACTION_FREE] = params.pop("rssm")
        params["rssm"] = self.rssm.init(
            key,
            self.rssm.initial(2),
            jnp.zeros((2, self.action_dim)),
            jnp.zeros((2, self.feat_dim)),
            jnp.ones((2,), bool),
        )["params"]

    def observe_input(self, params: Params, embed: jax.Array, is_first: jax.Array, keys: jax.Array) -> jax.Array:
        zeros = jnp.zeros(embed.shape[:2] + (self.action_dim,), jnp.float32)
        post, _ = world_model.observe(self.rssm, params[ACTION_FREE], embed, zeros, is_first, keys)
        return feature(post)

    def initial_carry(self, num_envs: int) -> dict[str, Any]:
        return {"action_free_latent": self.rssm.initial(num_envs)}

    def observe_step(
        self, params: Params, carry: dict[str, Any], embed: jax.Array, is_first: jax.Array, key: jax.Array
    ) -> tuple[jax.Array, dict[str, Any]]:
        num_envs = embed.shape[0]
        zeros = jnp.zeros((num_envs, self.action_dim), jnp.float32)
        latent, _ = self.rssm.apply(
            {"params": params[ACTION_FREE]},
            carry["action_free_latent"],
            zeros,
            embed,
            is_first,
            jax.random.split(key, num_envs),
            method=RSSM.obs_step,
        )
        return feature(latent), {"action_free_latent": latent}


DYNAMICS = {False: SingleDynamics, True: StackedDynamics}  # by config.stacked
