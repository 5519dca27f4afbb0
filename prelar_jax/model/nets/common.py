"""Shared layer conventions: Glorot-uniform kernels, zero biases, ELU MLPs.

The original code applies ``xavier_uniform`` with zero bias to every Linear, Conv and
ConvTranspose layer once at construction (spec section 0); these partials (and
``StridedConvTranspose``) make that the only way layers are built here.
"""

from __future__ import annotations

import functools
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from prelar_jax.model.nets import onednn

KERNEL_INIT = nn.initializers.glorot_uniform()
BIAS_INIT = nn.initializers.zeros_init()

Dense = functools.partial(nn.Dense, kernel_init=KERNEL_INIT, bias_init=BIAS_INIT)
# On CPU, oneDNN runs the convolutions when its extension is built (nets/onednn: same function,
# a faster kernel); everywhere else this is lax.conv_general_dilated.
Conv = functools.partial(
    nn.Conv, kernel_init=KERNEL_INIT, bias_init=BIAS_INIT, conv_general_dilated=onednn.conv_general_dilated
)

Dtype = Any


def preprocess_image(image: jax.Array, dtype: Dtype = jnp.float32) -> jax.Array:
    """uint8 pixels to the [-0.5, 0.5] range the original feeds its networks (``x/255 - 0.5``)."""
    return (image.astype(jnp.float32) / 255.0 - 0.5).astype(dtype)


class MLP(nn.Module):
    """Dense layers with ELU between them (no norm, as the original ``norm: none``).

    ``layers`` are the hidden widths; ``out`` (if given) is a final linear layer without activation,
    whose initial kernel is scaled by ``out_scale`` (0: the outputs start at exactly zero).
    """

    layers: Sequence[int]
    out: int | None = None
    dtype: Dtype = jnp.float32
    out_scale: float = 1.0

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        for width in self.layers:
            x = nn.elu(Dense(width, dtype=self.dtype)(x))
        if self.out is not None:
            scale = self.out_scale
            init = (
                KERNEL_INIT
                if scale == 1.0
                else (lambda key, shape, dtype=jnp.float32: scale * KERNEL_INIT(key, shape, dtype))
            )
            x = Dense(self.out, dtype=self.dtype, kernel_init=init)(x)
        return x


def conv_transpose_subpixel(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """``lax.conv_transpose(x, kernel, (2, 2), 'VALID')`` (NHWC, HWIO, kernel not transposed, as
    ``flax.linen.ConvTranspose`` calls it) computed without inserting zeros into the input.

    The output has ``(n - 1) * 2 + k`` pixels per side; pixel ``o = 2q + p`` only sees the kernel
    taps of one parity (``j = 2m + r_p``), so each of the four output phases ``(p_h, p_w)`` is an
    ordinary stride-1 convolution of the input with the matching quarter of the kernel, and the
    phases are interleaved (sub-pixel convolution). Same values, a quarter of the multiply-adds,
    and no lhs-dilated convolution, whose gradient XLA's CPU backend computes slowly.
    """
    k_h, k_w = kernel.shape[:2]
    n_h, n_w = x.shape[1:3]
    out_h, out_w = (n_h - 1) * 2 + k_h, (n_w - 1) * 2 + k_w
    q_h, q_w = (out_h + 1) // 2, (out_w + 1) // 2

    def phase(p: int, k: int, n: int, out: int):
        r = (k - 1 - p) % 2  # kernel taps j = 2m + r feed output phase p
        taps = len(range(r, k, 2))
        offset = (r + p - k + 1) // 2  # input index i = q + m + offset
        count = (out - p + 1) // 2  # outputs of this phase
        low = max(0, -offset)
        start = offset + low
        high = max(0, start + count - 1 + taps - (n + low))
        return r, (low, high), slice(start, start + count + taps - 1), count

    rows = []
    for p_h in (0, 1):
        r_h, pad_h, cut_h, count_h = phase(p_h, k_h, n_h, out_h)
        columns = []
        for p_w in (0, 1):
            r_w, pad_w, cut_w, count_w = phase(p_w, k_w, n_w, out_w)
            xp = jnp.pad(x, ((0, 0), pad_h, pad_w, (0, 0)))[:, cut_h, cut_w]
            y = jax.lax.conv_general_dilated(xp, kernel[r_h::2, r_w::2], (1, 1), "VALID", dimension_numbers=onednn.NHWC)
            columns.append(jnp.pad(y, ((0, 0), (0, q_h - count_h), (0, q_w - count_w), (0, 0))))
        rows.append(jnp.stack(columns, axis=3))  # [N, Q_h, Q_w, 2 (p_w), C]
    y = jnp.stack(rows, axis=2)  # [N, Q_h, 2 (p_h), Q_w, 2 (p_w), C]
    y = y.reshape(x.shape[0], 2 * q_h, 2 * q_w, kernel.shape[-1])
    return y[:, :out_h, :out_w]


class StridedConvTranspose(nn.Module):
    """``ConvTranspose(features, kernel, strides=(2, 2), padding=padding)`` with the same parameters
    (``kernel`` [k, k, in, out], ``bias``) and values. On CPU it runs as oneDNN's kernels when they
    are built (``nets.onednn``), else, for ``'VALID'`` padding, as ``conv_transpose_subpixel``
    (several times faster than XLA's dilated convolution there, mostly in the backward pass); elsewhere
    as ``lax.conv_transpose``. ``impl`` = 'auto' | 'subpixel' | 'lax' forces one (not oneDNN)."""

    features: int
    kernel_size: tuple[int, int]
    dtype: Dtype = jnp.float32
    impl: str = "auto"
    padding: str | tuple[tuple[int, int], tuple[int, int]] = "VALID"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kernel = self.param("kernel", KERNEL_INIT, tuple(self.kernel_size) + (x.shape[-1], self.features), jnp.float32)
        bias = self.param("bias", BIAS_INIT, (self.features,), jnp.float32)
        x, kernel, bias = x.astype(self.dtype), kernel.astype(self.dtype), bias.astype(self.dtype)
        if self.impl not in ("auto", "subpixel", "lax"):
            raise ValueError(f"impl={self.impl!r}: expected 'auto', 'subpixel' or 'lax'")
        valid = self.padding == "VALID"
        pads = tuple((k - 1, k - 1) for k in self.kernel_size) if valid else self.padding
        impl = self.impl
        if impl == "auto":
            on_cpu = jax.default_backend() == "cpu"
            # Where oneDNN has no bfloat16 kernels a bfloat16 layer keeps the sub-pixel form on CPU.
            fast = on_cpu and onednn.takes(self.dtype)
            impl = "onednn" if fast else ("subpixel" if on_cpu and valid else "lax")
        if impl == "subpixel" and not valid:
            raise ValueError(f"impl='subpixel' needs padding='VALID', got {self.padding!r}")
        if impl == "subpixel":
            y = conv_transpose_subpixel(x, kernel)
        elif impl == "onednn":  # the dilated convolution lax.conv_transpose makes, run by oneDNN
            y = onednn.conv_general_dilated(x, kernel, (1, 1), pads, lhs_dilation=(2, 2), dimension_numbers=onednn.NHWC)
        else:
            y = jax.lax.conv_transpose(x, kernel, (2, 2), self.padding, dimension_numbers=onednn.NHWC)
        return y + bias
