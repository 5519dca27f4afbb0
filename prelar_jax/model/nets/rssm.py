"""DreamerV2 RSSM cell with 32x32 straight-through categorical latents (spec section 1).

The module only defines single steps; ``prelar_jax.model.world_model`` scans them over time. State is a
dict ``{'logit': [B, S, C], 'stoch': [B, S, C], 'deter': [B, D]}``. Sampling takes one PRNG key
per batch row (a ``[B]`` key array) so that a data-parallel run draws exactly the same samples
for each example as a one-device run does.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from prelar_jax.model.distributions import straight_through_sample
from prelar_jax.model.nets.common import Dense, Dtype

State = dict[str, jax.Array]


class LayerNormGRUCell(nn.Module):
    """DreamerV2 GRU: one Linear on ``[x; h]`` to 3*D, one LayerNorm (eps 1e-3) over all 3*D.

    ``r = sigmoid(.)``, ``c = tanh(r * c~)`` (the reset gate scales the whole candidate
    pre-activation, a DreamerV2 quirk), ``u = sigmoid(u~ - 1)``, ``h' = u*c + (1-u)*h``.
    """

    size: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, h: jax.Array) -> jax.Array:
        parts = Dense(3 * self.size, dtype=self.dtype)(jnp.concatenate([x, h.astype(x.dtype)], -1))
        parts = nn.LayerNorm(epsilon=1e-3, dtype=jnp.float32)(parts.astype(jnp.float32))
        reset, cand, update = jnp.split(parts, 3, axis=-1)
        reset = jax.nn.sigmoid(reset)
        cand = jnp.tanh(reset * cand)
        update = jax.nn.sigmoid(update - 1.0)
        return update * cand + (1.0 - update) * h.astype(jnp.float32)


class RSSM(nn.Module):
    deter: int = 1024
    hidden: int = 1024
    stoch: int = 32
    classes: int = 32
    dtype: Dtype = jnp.float32

    def setup(self):
        self.img_in = Dense(self.hidden, dtype=self.dtype)
        self.gru = LayerNormGRUCell(self.deter, dtype=self.dtype)
        self.img_out = Dense(self.hidden, dtype=self.dtype)
        self.img_logits = Dense(self.stoch * self.classes, dtype=self.dtype)
        self.obs_out = Dense(self.hidden, dtype=self.dtype)
        self.obs_logits = Dense(self.stoch * self.classes, dtype=self.dtype)

    def initial(self, batch_size: int) -> State:
        """The all-zero state every sequence starts from (masking with is_first == resetting)."""
        return {
            "logit": jnp.zeros((batch_size, self.stoch, self.classes), jnp.float32),
            "stoch": jnp.zeros((batch_size, self.stoch, self.classes), jnp.float32),
            "deter": jnp.zeros((batch_size, self.deter), jnp.float32),
        }

    def _sample(self, logits: jax.Array, keys: jax.Array | None) -> jax.Array:
        if keys is None:  # the mode, e.g. when only the logits are needed
            return jax.nn.one_hot(jnp.argmax(logits, -1), self.classes, dtype=jnp.float32)
        return jax.vmap(straight_through_sample)(keys, logits)

    def img_step(self, state: State, action: jax.Array, keys: jax.Array | None) -> State:
        """Prior step: ``h_t = GRU(ELU(W [z_{t-1}; a_t]), h_{t-1})``, ``z_t ~ Cat(img_out(h_t))``."""
        batch = action.shape[0]
        x = jnp.concatenate([state["stoch"].reshape(batch, -1), action.astype(jnp.float32)], -1)
        x = nn.elu(self.img_in(x.astype(self.dtype)))
        deter = self.gru(x, state["deter"])
        hidden = nn.elu(self.img_out(deter.astype(self.dtype)))
        logits = self.img_logits(hidden).astype(jnp.float32).reshape(batch, self.stoch, self.classes)
        return {"logit": logits, "stoch": self._sample(logits, keys), "deter": deter}

    def obs_step(
        self, state: State, action: jax.Array, embed: jax.Array, is_first: jax.Array, keys: jax.Array | None
    ) -> tuple[State, State]:
        """Posterior step. ``is_first`` zeroes the previous state *and* the action (a reset)."""
        state, action = mask_reset(state, action, is_first)
        if keys is None:
            prior_keys = post_keys = None
        else:
            both = jax.vmap(lambda k: jax.random.split(k, 2))(keys)
            prior_keys, post_keys = both[:, 0], both[:, 1]
        prior = self.img_step(state, action, prior_keys)
        x = jnp.concatenate([prior["deter"], embed.astype(jnp.float32)], -1).astype(self.dtype)
        hidden = nn.elu(self.obs_out(x))
        batch = action.shape[0]
        logits = self.obs_logits(hidden).astype(jnp.float32).reshape(batch, self.stoch, self.classes)
        post = {"logit": logits, "stoch": self._sample(logits, post_keys), "deter": prior["deter"]}
        return post, prior

    def __call__(
        self, state: State, action: jax.Array, embed: jax.Array, is_first: jax.Array, keys: jax.Array | None = None
    ) -> tuple[State, State]:
        """Used by ``init`` only: one posterior step touches every layer."""
        return self.obs_step(state, action, embed, is_first, keys)


def mask_reset(state: State, action: jax.Array, is_first: jax.Array) -> tuple[State, jax.Array]:
    """Zero the previous state and the action of rows that start an episode (``is_first``
    ``[B]``); since the initial state is all zeros, masking is the same as resetting."""
    keep = 1.0 - is_first.astype(jnp.float32)
    state = jax.tree.map(lambda v: v * keep.reshape((-1,) + (1,) * (v.ndim - 1)), state)
    return state, action * keep[:, None].astype(action.dtype)


def feature(state: State) -> jax.Array:
    """``concat(flatten(stoch), deter)``: stoch first, as the original ``get_feat``."""
    stoch = state["stoch"]
    return jnp.concatenate([stoch.reshape(stoch.shape[:-2] + (-1,)), state["deter"]], -1)
