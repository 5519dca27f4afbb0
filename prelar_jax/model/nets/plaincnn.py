"""DreamerV2's plain CNN encoder and decoder (spec 2.3), used by the DreamerV2 baseline.

They take a ``train`` argument only so they are interchangeable with the ResNet pair; they have
no BatchNorm and hence no ``batch_stats``.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from prelar_jax.model.nets.common import Conv, Dense, Dtype, StridedConvTranspose


class PlainEncoder(nn.Module):
    """4 x [Conv k4 s2 VALID, ELU] with ``depth * (1, 2, 4, 8)`` channels: 64x64 -> 2x2x384 = 1536."""

    depth: int = 48
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        del train
        x = x.astype(self.dtype)
        for i in range(4):
            x = nn.elu(Conv(self.depth * 2**i, (4, 4), strides=(2, 2), padding="VALID", dtype=self.dtype)(x))
        return x.reshape(x.shape[0], -1)


class PlainDecoder(nn.Module):
    """Linear to 1x1x(32*depth), then ConvT k5,k5,k6,k6 stride 2 VALID: 1->5->13->30->64."""

    depth: int = 48
    channels: int = 3
    dtype: Dtype = jnp.float32
    impl: str = "auto"  # transposed convolutions: 'subpixel' on CPU, 'lax' elsewhere (StridedConvTranspose)

    @nn.compact
    def __call__(self, feat: jax.Array, train: bool = False) -> jax.Array:
        del train
        x = Dense(32 * self.depth, dtype=self.dtype)(feat.astype(self.dtype))
        x = x.reshape(feat.shape[0], 1, 1, 32 * self.depth)
        for i, (width, kernel) in enumerate(
            [(4 * self.depth, 5), (2 * self.depth, 5), (self.depth, 6), (self.channels, 6)]
        ):
            # Same parameter names as flax's ConvTranspose (checkpoints do not depend on `impl`).
            x = StridedConvTranspose(
                width, (kernel, kernel), dtype=self.dtype, impl=self.impl, name=f"ConvTranspose_{i}"
            )(x)
            if i < 3:
                x = nn.elu(x)
        return x.astype(jnp.float32)
