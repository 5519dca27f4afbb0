"""How fine-tuning feeds a real action to the RSSM's action slot (``action_encoder.kind``), one
component per kind, chosen once when the agent is built (``make_action_encoder``):

* ``mlp`` (PreLAR): a new MLP maps the action into the pre-trained action-code space
  (``action_encoder.code_size`` wide); its parameters are the ``action_encoder`` module.
* ``none`` (DreamerV2): the raw action, ``action_dim`` wide.
* ``pad`` (APV's ``fill_action``): the raw action zero-padded to ``action_encoder.code_size``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections

from prelar_jax.model.nets.common import MLP
from prelar_jax.types import Params


class ActionEncoder:
    """Real actions ``[..., action_dim]`` -> the RSSM's action input ``[..., code_size]`` (float32).
    ``module``: the name of its parameters in the agent's params, or None when it has none."""

    module: str | None = None

    def __init__(self, config: ml_collections.ConfigDict):
        self.code_size = config.action_encoder.code_size

    def init(self, key: jax.Array, action_dim: int) -> Params | None:
        """Fresh parameters (None: the component has none)."""
        return None

    def __call__(self, params: Params, action: jax.Array) -> jax.Array:
        raise NotImplementedError


class MLPActionEncoder(ActionEncoder):
    module = "action_encoder"

    def __init__(self, config: ml_collections.ConfigDict):
        super().__init__(config)
        # In the model's compute dtype like every other layer; the output is cast to float32.
        self.net = MLP([config.action_encoder.hidden], out=self.code_size, dtype=jnp.dtype(config.model.compute_dtype))

    def init(self, key: jax.Array, action_dim: int) -> Params:
        return self.net.init(key, jnp.zeros((2, action_dim)))["params"]

    def __call__(self, params: Params, action: jax.Array) -> jax.Array:
        return self.net.apply({"params": params[self.module]}, action).astype(jnp.float32)


class RawActionEncoder(ActionEncoder):
    def __init__(self, config: ml_collections.ConfigDict):
        self.code_size = config.action_dim

    def __call__(self, params: Params, action: jax.Array) -> jax.Array:
        return action.astype(jnp.float32)


class PaddedActionEncoder(ActionEncoder):
    def __call__(self, params: Params, action: jax.Array) -> jax.Array:
        pad = [(0, 0)] * (action.ndim - 1) + [(0, self.code_size - action.shape[-1])]
        return jnp.pad(action.astype(jnp.float32), pad)


ACTION_ENCODERS = {"mlp": MLPActionEncoder, "none": RawActionEncoder, "pad": PaddedActionEncoder}


def make_action_encoder(config: ml_collections.ConfigDict) -> ActionEncoder:
    kind = config.action_encoder.kind
    if kind not in ACTION_ENCODERS:
        raise ValueError(f"action_encoder.kind={kind!r}: expected one of {sorted(ACTION_ENCODERS)}")
    return ACTION_ENCODERS[kind](config)
