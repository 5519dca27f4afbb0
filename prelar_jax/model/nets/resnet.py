"""ResNet image encoder and decoder with BatchNorm residual blocks (spec section 2).

BatchNorm statistics live in the ``batch_stats`` collection and are threaded explicitly by the
caller (``mutable=['batch_stats']`` in training). When ``bn_axis_name`` is set (the data-parallel
mesh axis), batch statistics are averaged across devices, so a sharded batch normalises exactly as
the whole batch would on one device.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from prelar_jax.model.nets.common import Conv, Dense, Dtype, StridedConvTranspose


def _batch_norm(train: bool, axis_name: str | None, dtype: Dtype) -> nn.BatchNorm:
    # torch BatchNorm2d defaults: momentum 0.1 (= flax 0.9), eps 1e-5, affine.
    return nn.BatchNorm(
        use_running_average=not train, momentum=0.9, epsilon=1e-5, axis_name=axis_name if train else None, dtype=dtype
    )


class ResidualLayer(nn.Module):
    """``relu(id(x) + bn(conv(relu(bn(conv(x))))))``; ``id`` is a 1x1 conv + BN when widths differ."""

    features: int
    bn_axis_name: str | None = None
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        conv = lambda k: Conv(self.features, (k, k), padding=((k // 2, k // 2),) * 2, use_bias=False, dtype=self.dtype)
        norm = lambda: _batch_norm(train, self.bn_axis_name, self.dtype)
        h = nn.relu(norm()(conv(3)(x)))
        h = norm()(conv(3)(h))
        skip = x if x.shape[-1] == self.features else norm()(conv(1)(x))
        return nn.relu(skip + h)


# Recomputes a layer's activations in the backward pass instead of storing them (argument 2 is
# `train`, a Python bool; argument 0 is the module itself).
_RematResidualLayer = nn.remat(ResidualLayer, static_argnums=(2,))


class ResidualStack(nn.Module):
    """Two residual layers: encoder form ``(in->out, out->out)``; decoder form ``(in->in, in->out)``.

    ``remat``: store only each layer's input for the backward pass and recompute the rest (about
    one extra forward pass of compute for a fraction of the activation memory; the fine-tuning
    batch of 2500 frames needs it on machines with less than ~32 GiB). Parameter names are the
    same either way, so checkpoints do not depend on it.
    """

    features: int
    decoder: bool = False
    layers: int = 2
    bn_axis_name: str | None = None
    dtype: Dtype = jnp.float32
    remat: bool = False

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        in_features = x.shape[-1]
        layer_class = _RematResidualLayer if self.remat else ResidualLayer
        for i in range(self.layers):
            if self.decoder:
                width = self.features if i == self.layers - 1 else in_features
            else:
                width = self.features
            x = layer_class(width, self.bn_axis_name, self.dtype, name=f"ResidualLayer_{i}")(x, train)
        return x


class ResNetEncoder(nn.Module):
    """64x64xC -> flat embedding. At depth 48, 3 stages: 4x4x192 = 3072 features.

    ``convin`` (3x3, stride 2, ELU) then, per stage, a residual stack to ``depth * 2**i`` channels
    followed by 2x2 average pooling. Input is preprocessed float pixels ``[N, H, W, C]``; the
    channel count C is free (3 for frames, 6 for the implicit-action encoder's frame pairs).
    """

    depth: int = 48
    stages: int = 3
    layers_per_stage: int = 2
    bn_axis_name: str | None = None
    dtype: Dtype = jnp.float32
    remat: bool = False

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        x = nn.elu(
            Conv(self.depth, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)), dtype=self.dtype)(x.astype(self.dtype))
        )
        for stage in range(self.stages):
            x = ResidualStack(
                self.depth * 2**stage,
                layers=self.layers_per_stage,
                bn_axis_name=self.bn_axis_name,
                dtype=self.dtype,
                remat=self.remat,
            )(x, train)
            x = nn.avg_pool(x, (2, 2), (2, 2))
        return x.reshape(x.shape[0], -1)


class ResNetDecoder(nn.Module):
    """Feature vector -> 64x64x3 mean image (unit-variance Gaussian likelihood; spec 2.2).

    Linear to ``4x4x(depth*2**(stages-1))`` without activation, then per stage nearest-neighbour
    upsampling and a decoder residual stack halving the channels, then a stride-2 transposed conv.
    """

    depth: int = 48
    stages: int = 3
    layers_per_stage: int = 2
    image_size: int = 64
    channels: int = 3
    bn_axis_name: str | None = None
    dtype: Dtype = jnp.float32
    remat: bool = False

    @nn.compact
    def __call__(self, feat: jax.Array, train: bool) -> jax.Array:
        width = self.depth * 2 ** (self.stages - 1)
        side = self.image_size // 2 ** (self.stages + 1)
        x = Dense(side * side * width, dtype=self.dtype)(feat.astype(self.dtype))
        x = x.reshape(feat.shape[0], side, side, width)
        for _ in range(self.stages):
            x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
            width //= 2
            x = ResidualStack(
                width,
                decoder=True,
                layers=self.layers_per_stage,
                bn_axis_name=self.bn_axis_name,
                dtype=self.dtype,
                remat=self.remat,
            )(x, train)
        # torch ConvTranspose2d(k3, s2, p1, output_padding=1) == explicit padding (1, 2) here.
        # (StridedConvTranspose: oneDNN's kernels on CPU when built; the parameters keep flax's name.)
        x = StridedConvTranspose(
            self.channels, (3, 3), dtype=self.dtype, padding=((1, 2), (1, 2)), name="ConvTranspose_0"
        )(x)
        return x.astype(jnp.float32)
