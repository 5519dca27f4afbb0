"""The implicit-action encoder (the original's VANet, spec section 3).

It infers an action code from each pair of adjacent frames ``(o_{t-1}, o_t)``. Two inputs:

* ``pixels`` (the released code): the two normalised frames concatenated on channels (6) go
  through their own ResNet encoder (with BatchNorm), then ``Dense(hidden) -> ELU -> head``.
* ``embed`` (the cheaper variant of the paper's text): an MLP on the pair of frame embeddings the
  world-model encoder already computed.

Code types: ``stoch`` (diagonal Gaussian, ``std = 2 * sigmoid(raw / 2)`` with no floor, sampled by
reparameterisation), ``deter`` (a deterministic vector), ``mix`` (``[deter; stoch]``), and
``none`` (no encoder at all: all-zero codes, which is APV's action-free pre-training) and
``random`` (no encoder: codes drawn from the prior N(0, prior_std^2), independent of the frames;
the "random codes instead of implicit actions" ablation).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from prelar_jax.model.distributions import sigmoid2
from prelar_jax.model.nets import onednn
from prelar_jax.model.nets.common import MLP, Dtype
from prelar_jax.model.nets.resnet import ResNetEncoder

CODE_TYPES = ("stoch", "deter", "mix", "none", "random")
INPUTS = ("pixels", "embed")


class ImplicitActionEncoder(nn.Module):
    code_type: str = "stoch"
    stoch: int = 64
    deter: int = 64
    hidden: int = 1024
    input: str = "pixels"
    embed_layers: int = 2
    depth: int = 48
    stages: int = 3
    bn_axis_name: str | None = None
    dtype: Dtype = jnp.float32
    # Scale of the output layer's initial kernel (1: the original). 0 starts every code at exactly
    # zero (mean 0, std 2*sigmoid(0) = 1), so that the networks the code feeds do not first learn to
    # ignore it as large noise: the code grows only where it helps them.
    head_init_scale: float = 1.0

    @property
    def code_size(self) -> int:
        """Width of the code fed to the RSSM: ``[deter; stoch sample]``."""
        return (self.deter if self.code_type in ("deter", "mix") else 0) + (
            self.stoch if self.code_type in ("stoch", "mix") else 0
        )

    @property
    def head_size(self) -> int:
        """Width of the network's output: the deterministic part plus mean and raw std."""
        size = 0
        if self.code_type in ("deter", "mix"):
            size += self.deter
        if self.code_type in ("stoch", "mix"):
            size += 2 * self.stoch
        return size

    @nn.compact
    def __call__(self, prev: jax.Array, curr: jax.Array, train: bool) -> dict[str, jax.Array]:
        """``prev``/``curr``: ``[N, 64, 64, 3]`` preprocessed frames (``pixels``) or ``[N, E]``
        embeddings (``embed``). Returns the code's parameters: ``mean``/``std`` ``[N, stoch]``
        and/or ``deter`` ``[N, deter]``."""
        if self.code_type not in CODE_TYPES[:3]:
            raise ValueError(
                f"implicit action code_type {self.code_type!r} has no network; expected one of {CODE_TYPES[:3]}"
            )
        if self.input == "pixels":
            x = jnp.concatenate([prev, curr], axis=-1)  # [N, 64, 64, 6], order (o_{t-1}, o_t)
            x = ResNetEncoder(self.depth, self.stages, bn_axis_name=self.bn_axis_name, dtype=self.dtype)(x, train)
            out = MLP([self.hidden], self.head_size, dtype=self.dtype, out_scale=self.head_init_scale)(x)
        elif self.input == "embed":
            x = jnp.concatenate([prev, curr], axis=-1)
            out = MLP(
                [self.hidden] * self.embed_layers, self.head_size, dtype=self.dtype, out_scale=self.head_init_scale
            )(x)
        else:
            raise ValueError(f"implicit action input {self.input!r}; expected one of {INPUTS}")
        out = out.astype(jnp.float32)
        params = {}
        if self.code_type in ("deter", "mix"):
            params["deter"], out = out[:, : self.deter], out[:, self.deter :]
        if self.code_type in ("stoch", "mix"):
            mean, raw_std = jnp.split(out, 2, axis=-1)
            # sigmoid2 has no floor in the original; 1e-6 only keeps the KL finite once the
            # std underflows to 0 in float32 (raw std below about -200).
            params["mean"], params["std"] = mean, jnp.maximum(sigmoid2(raw_std), 1e-6)
        return params


class CodeForwardModel(nn.Module):
    """A latent forward model for the code (``loss.code_forward_scale``): predicts the embedding
    of ``o_t`` from the uncompressed embedding of ``o_{t-1}`` and the code ``a~_t``, as a residual
    ``e_{t-1} + MLP([e_{t-1}; a~_t])``. Because the previous frame is given in full, the cheapest
    thing for the code to carry is the change between the frames (LAPO's forward model has the
    previous observation for the same reason), not the new frame."""

    hidden: int = 1024
    layers: int = 2
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, prev_embed: jax.Array, code: jax.Array) -> jax.Array:
        """``prev_embed`` ``[N, E]``, ``code`` ``[N, A]`` -> predicted embedding ``[N, E]``."""
        x = jnp.concatenate([prev_embed, code], axis=-1)
        delta = MLP([self.hidden] * self.layers, prev_embed.shape[-1], dtype=self.dtype)(x)
        return prev_embed + delta.astype(prev_embed.dtype)


class PixelForwardModel(nn.Module):
    """The code's forward model in pixel space (``loss.code_forward_space = 'pixels'``), as LAPO's:
    predicts ``o_t`` from the frame ``o_{t-1}`` itself and the code ``a~_t``. A small U-Net:
    two stride-2 convolutions to 16x16, the code tiled over that map, two 3x3 convolutions, then
    nearest-neighbour upsampling with skip connections back to 64x64, output ``o_{t-1} + delta``.
    Moving what is in the frame by what the code says is a local operation for convolutions,
    so the change is the cheap thing for the code to carry; the new frame is not."""

    depth: int = 16
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, prev: jax.Array, code: jax.Array) -> jax.Array:
        """``prev`` ``[N, H, W, C]`` preprocessed frames, ``code`` ``[N, A]`` -> ``[N, H, W, C]``."""
        conv = lambda width, kernel, stride=1: nn.Conv(
            width,
            (kernel, kernel),
            strides=(stride, stride),
            padding="SAME",
            dtype=self.dtype,
            conv_general_dilated=onednn.conv_general_dilated,
        )
        up = lambda x: jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
        x0 = prev.astype(self.dtype)
        h1 = nn.elu(conv(self.depth, 4, 2)(x0))
        h2 = nn.elu(conv(2 * self.depth, 4, 2)(h1))
        tiled = jnp.broadcast_to(code.astype(self.dtype)[:, None, None, :], h2.shape[:3] + (code.shape[-1],))
        h = nn.elu(conv(2 * self.depth, 3)(jnp.concatenate([h2, tiled], -1)))
        h = nn.elu(conv(2 * self.depth, 3)(h))
        h = nn.elu(conv(self.depth, 3)(jnp.concatenate([up(h), h1], -1)))
        delta = conv(prev.shape[-1], 3)(jnp.concatenate([up(h), x0], -1))
        return prev + delta.astype(prev.dtype)


def code_from_params(params: dict[str, jax.Array], keys: jax.Array | None) -> jax.Array:
    """The code fed to the RSSM: ``[deter; mean + std * eps]`` (the mean when ``keys`` is None).

    ``keys`` is a ``[N]`` key array, one per row, so sampling does not depend on sharding.
    """
    parts = []
    if "deter" in params:
        parts.append(params["deter"])
    if "mean" in params:
        mean, std = params["mean"], params["std"]
        if keys is None:
            parts.append(mean)
        else:
            noise = jax.vmap(lambda k: jax.random.normal(k, mean.shape[1:], mean.dtype))(keys)
            parts.append(mean + std * noise)
    return jnp.concatenate(parts, axis=-1)
