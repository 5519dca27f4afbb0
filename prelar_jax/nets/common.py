"""Shared layer conventions: Glorot-uniform kernels, zero biases, ELU MLPs.

The original code applies ``xavier_uniform`` with zero bias to every Linear, Conv and
ConvTranspose layer once at construction (spec section 0); these partials make that the only
way layers are built here.
"""

from __future__ import annotations

import functools
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

KERNEL_INIT = nn.initializers.glorot_uniform()
BIAS_INIT = nn.initializers.zeros_init()

Dense = functools.partial(nn.Dense, kernel_init=KERNEL_INIT, bias_init=BIAS_INIT)
Conv = functools.partial(nn.Conv, kernel_init=KERNEL_INIT, bias_init=BIAS_INIT)
ConvTranspose = functools.partial(nn.ConvTranspose, kernel_init=KERNEL_INIT, bias_init=BIAS_INIT)

Dtype = Any


def preprocess_image(image: jax.Array, dtype: Dtype = jnp.float32) -> jax.Array:
    """uint8 pixels to the [-0.5, 0.5] range the original feeds its networks (``x/255 - 0.5``)."""
    return (image.astype(jnp.float32) / 255.0 - 0.5).astype(dtype)


class MLP(nn.Module):
    """Dense layers with ELU between them (no norm, as the original ``norm: none``).

    ``layers`` are the hidden widths; ``out`` (if given) is a final linear layer without activation.
    """

    layers: Sequence[int]
    out: int | None = None
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        for width in self.layers:
            x = nn.elu(Dense(width, dtype=self.dtype)(x))
        if self.out is not None:
            x = Dense(self.out, dtype=self.dtype)(x)
        return x
