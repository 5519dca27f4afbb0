"""Actor and scalar MLP heads of the Dreamer(V2) learner (spec sections 5.1 and 6).

Both read the RSSM feature ``concat(flat(stoch), deter)`` and follow the original ``nets.MLP``:
``layers`` Dense(units) + ELU layers without norm, then a linear output layer. Every layer is
Glorot-uniform with a zero bias (``prelar_jax.model.nets.common``). ``dtype`` is the compute dtype of
the Dense layers; the outputs are always float32, because they feed losses and distributions.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from prelar_jax.model.nets.common import MLP, Dense, Dtype


class Actor(nn.Module):
    """Truncated-normal policy parameters ``(mean, std)``, each ``[..., action_dim]`` float32.

    As the original ``DistLayer(dist='trunc_normal')``: two linear heads on the shared trunk,
    ``mean = tanh(mu_raw)`` in (-1, 1) and ``std = 2 * sigmoid((sigma_raw + init_std) / 2) +
    min_std`` in (min_std, 2 + min_std). The policy is ``TruncNormal(mean, std, [-1, 1])``,
    independent over the action dimensions (``prelar_jax.model.distributions.truncated_normal_*``);
    its mode, used in evaluation, is ``mean``.
    """

    layers: int = 4
    units: int = 400
    action_dim: int = 4
    min_std: float = 0.1
    init_std: float = 0.0
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, feat: jax.Array) -> tuple[jax.Array, jax.Array]:
        x = MLP([self.units] * self.layers, dtype=self.dtype, name="trunk")(feat.astype(self.dtype))
        mean_raw = Dense(self.action_dim, dtype=self.dtype, name="mean")(x).astype(jnp.float32)
        std_raw = Dense(self.action_dim, dtype=self.dtype, name="std")(x).astype(jnp.float32)
        mean = jnp.tanh(mean_raw)
        std = 2.0 * jax.nn.sigmoid((std_raw + self.init_std) / 2.0) + self.min_std
        return mean, std


class ScalarHead(nn.Module):
    """MLP to one number per input row, ``[...] `` float32 (last axis squeezed).

    Used for the critic and its slow copy, the reward head and the auxiliary reward head: all
    are unit-variance Gaussians in the original (``dist: mse``), so the output is the mean.
    """

    layers: int = 4
    units: int = 400
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, feat: jax.Array) -> jax.Array:
        out = MLP([self.units] * self.layers, out=1, dtype=self.dtype, name="mlp")(feat.astype(self.dtype))
        return out[..., 0].astype(jnp.float32)
