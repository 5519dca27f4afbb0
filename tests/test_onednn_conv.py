"""The oneDNN convolution path (nets/onednn): same values and gradients as XLA's convolution and a
float64 numpy reference, routing (which calls go to oneDNN), the choice's errors, FLOP counting,
and a whole network with either kernel."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from prelar_jax.model.nets import onednn
from prelar_jax.model.nets.resnet import ResNetEncoder

NHWC = ("NHWC", "HWIO", "NHWC")
built = pytest.mark.skipif(
    not onednn.load(),
    reason="oneDNN extension not built (experiments/setup_env.sh builds it when libdnnl-dev is there)",
)

# (batch, side, in, out, kernel, stride, padding): the project's convolutions (3x3 SAME, the plain
# CNN's 4x4 VALID stride 2, the ResNet's stride-2 stem, 1x1 skips) and an asymmetric padding.
GEOMETRIES = [
    (3, 9, 5, 7, 3, 1, "SAME"),
    (2, 12, 4, 6, 4, 2, "VALID"),
    (2, 11, 3, 4, 4, 2, "VALID"),  # odd: the last row and column are not read (64 -> 31 -> 14)
    (2, 10, 3, 8, 3, 2, ((1, 1), (1, 1))),
    (2, 8, 6, 6, 1, 1, "SAME"),
    (2, 7, 3, 4, 3, 1, ((0, 2), (1, 0))),
]


def _numpy_conv(x, w, stride, pads):
    """Direct float64 correlation, NHWC x HWIO."""
    x = np.pad(x.astype(np.float64), ((0, 0), pads[0], pads[1], (0, 0)))
    kh, kw, _, co = w.shape
    oh = (x.shape[1] - kh) // stride + 1
    ow = (x.shape[2] - kw) // stride + 1
    y = np.zeros((x.shape[0], oh, ow, co))
    for i in range(kh):
        for j in range(kw):
            patch = x[:, i : i + stride * oh : stride, j : j + stride * ow : stride, :]
            y += patch @ w[i, j].astype(np.float64)
    return y


def _pads(padding, x, w, stride):
    if isinstance(padding, str):
        return tuple(lax.padtype_to_pads(x.shape[1:3], w.shape[:2], (stride, stride), padding))
    return padding


@built
@pytest.mark.parametrize("n,side,ci,co,k,stride,padding", GEOMETRIES)
def test_values_and_gradients_match_xla_and_float64(n, side, ci, co, k, stride, padding):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(n, side, side, ci)).astype(np.float32)
    w = rng.normal(size=(k, k, ci, co)).astype(np.float32)

    def conv(impl):
        return lambda x, w: impl(x, w, (stride, stride), padding, dimension_numbers=NHWC)

    fast, xla = conv(onednn.conv_general_dilated), conv(lax.conv_general_dilated)
    assert "prelar_onednn_conv_forward" in jax.jit(fast).lower(x, w).as_text()
    y = np.asarray(jax.jit(fast)(x, w))
    reference = _numpy_conv(x, w, stride, _pads(padding, x, w, stride))
    np.testing.assert_allclose(y, reference, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(y, np.asarray(xla(x, w)), rtol=1e-5, atol=1e-5)
    cotangent = rng.normal(size=y.shape).astype(np.float32)
    grads = lambda f: jax.jit(jax.grad(lambda x, w: jnp.sum(f(x, w) * cotangent), argnums=(0, 1)))(x, w)
    for got, want in zip(grads(fast), grads(xla)):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-4, atol=1e-4)
    # The weight gradient against float64 too: d/dw sum(conv(x, w) * c) = correlation of x with c.
    eps = 1e-3
    dw = np.asarray(grads(fast)[1])
    bump = np.zeros_like(w)
    bump[0, 0, 0, 0] = eps
    pads = _pads(padding, x, w, stride)
    numeric = (
        np.sum(_numpy_conv(x, w + bump, stride, pads) * cotangent)
        - np.sum(_numpy_conv(x, w - bump, stride, pads) * cotangent)
    ) / (2 * eps)
    np.testing.assert_allclose(dw[0, 0, 0, 0], numeric, rtol=1e-3)


def _targets(fn, *args) -> str:
    return jax.jit(fn).lower(*args).as_text()


@built
def test_only_supported_calls_go_to_onednn(monkeypatch):
    x = jnp.ones((2, 8, 8, 4))
    w = jnp.ones((3, 3, 4, 4))
    call = lambda **kw: lambda x, w: onednn.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=NHWC, **kw)
    assert "prelar_onednn" in _targets(call(), x, w)
    # Dilation, groups, other dtypes or result types and other layouts fall back to XLA's convolution, with
    # XLA's values.
    assert "prelar_onednn" not in _targets(call(rhs_dilation=(2, 2)), x, w)
    assert "prelar_onednn" not in _targets(call(feature_group_count=2), x, jnp.ones((3, 3, 2, 4)))
    assert "prelar_onednn" not in _targets(call(), x.astype(jnp.float16), w.astype(jnp.float16))
    bf16 = x.astype(jnp.bfloat16), w.astype(jnp.bfloat16)
    assert "prelar_onednn" not in _targets(call(preferred_element_type=jnp.float32), *bf16)
    # bfloat16 goes to oneDNN only where this CPU has its bfloat16 kernels.
    assert ("prelar_onednn" in _targets(call(), *bf16)) == onednn.bfloat16_supported()
    monkeypatch.setattr(onednn, "bfloat16_supported", lambda: False)
    assert "prelar_onednn" not in _targets(call(), *bf16)
    assert "prelar_onednn" in _targets(call(), x, w)
    nchw = lambda x, w: onednn.conv_general_dilated(x, w, (1, 1), "SAME")
    assert "prelar_onednn" not in _targets(nchw, jnp.ones((2, 4, 8, 8)), jnp.ones((4, 4, 3, 3)))
    np.testing.assert_allclose(
        jax.jit(call(rhs_dilation=(2, 2)))(x, w),
        lax.conv_general_dilated(x, w, (1, 1), "SAME", rhs_dilation=(2, 2), dimension_numbers=NHWC),
    )
    monkeypatch.setenv("PRELAR_CONV", "xla")
    assert "prelar_onednn" not in _targets(call(), x, w)


@built
@pytest.mark.parametrize("side", [8, 32])
def test_winograd_values_and_gradients_match_float64(monkeypatch, side):
    """float32 3x3 stride-1 convolutions on maps up to 16x16 run oneDNN's Winograd kernels where the
    CPU has them (``uses_winograd``); larger ones stay direct. Both algorithms agree with float64
    references in each direction; Winograd rounds differently from the direct kernels (so it did
    run), and where it does not run the results are bit-identical."""
    n, ci, co = 2, 16, 24
    rng = np.random.default_rng(3)
    x = rng.normal(size=(n, side, side, ci)).astype(np.float32)
    w = (rng.normal(size=(3, 3, ci, co)) / np.sqrt(9 * ci)).astype(np.float32)
    c = rng.normal(size=(n, side, side, co)).astype(np.float32)
    pads = ((1, 1), (1, 1))
    # float64 references: y = x * w; dx = c * (w flipped, in/out swapped); dw[i, j] = sum x_pad[.., i:, j:, :] c.
    y64 = _numpy_conv(x, w, 1, pads)
    dx64 = _numpy_conv(c, np.flip(w, (0, 1)).transpose(0, 1, 3, 2), 1, pads)
    xp = np.pad(x.astype(np.float64), ((0, 0), (1, 1), (1, 1), (0, 0)))
    dw64 = np.stack(
        [
            np.stack([np.einsum("nhwc,nhwo->co", xp[:, i : i + side, j : j + side], c) for j in range(3)])
            for i in range(3)
        ]
    )

    def run():
        conv = lambda x, w: onednn.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=NHWC)
        y, vjp = jax.vjp(conv, x, w)
        return (np.asarray(y), *map(np.asarray, vjp(jnp.asarray(c))))

    results = {}
    for algorithm in ("direct", "auto"):
        monkeypatch.setenv("PRELAR_CONV_ALGORITHM", algorithm)
        results[algorithm] = run()
        for got, want in zip(results[algorithm], (y64, dx64, dw64)):
            np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5 * np.abs(want).max())
    winograd = onednn.uses_winograd(n, side, ci, co)
    assert not (side > 16 and winograd)
    for name, direct, auto in zip(("forward", "backward_data", "backward_weights"), *results.values()):
        assert np.array_equal(direct, auto) == (not winograd), name


@built
def test_a_library_built_from_older_source_is_not_used(monkeypatch):
    """A stale build (its handlers lack this code's attributes) would fail at the first call: under
    ``auto`` it is skipped with a warning that says how to rebuild; ``PRELAR_CONV=onednn`` refuses."""

    def reset():
        for cached in (onednn._library, onednn.stale, onednn._warn_stale):
            cached.cache_clear()

    monkeypatch.setenv("PRELAR_CONV", "auto")
    monkeypatch.setattr(onednn, "_abi_version", lambda lib: onednn.ABI_VERSION - 1)
    reset()
    try:
        assert onednn.stale()
        with pytest.warns(UserWarning, match="older conv.cc.*onednn.build"):
            assert not onednn.enabled()
        monkeypatch.setenv("PRELAR_CONV", "onednn")
        with pytest.raises(onednn.ConvImplError, match="older conv.cc"):
            onednn.enabled()
    finally:
        monkeypatch.undo()
        reset()
    assert onednn.load() and not onednn.stale()


def test_choice_errors_say_what_to_do(monkeypatch, tmp_path):
    monkeypatch.setenv("PRELAR_CONV", "fast")
    with pytest.raises(onednn.ConvImplError, match="choose one of"):
        onednn.enabled()
    monkeypatch.setenv("PRELAR_CONV_ALGORITHM", "winograd")
    with pytest.raises(onednn.ConvImplError, match="PRELAR_CONV_ALGORITHM='winograd'; choose one of"):
        onednn.algorithm()
    monkeypatch.setenv("PRELAR_CONV", "onednn")
    monkeypatch.setattr(onednn, "LIBRARY", str(tmp_path / "missing.so"))
    onednn._library.cache_clear()
    try:
        with pytest.raises(onednn.ConvImplError, match="libdnnl-dev"):
            onednn.enabled()
        monkeypatch.setenv("PRELAR_CONV", "auto")
        assert not onednn.enabled()  # auto without the library: XLA's kernels, no error
    finally:
        monkeypatch.undo()
        onednn._library.cache_clear()


@built
def test_flop_count_includes_the_onednn_calls(monkeypatch):
    x = jnp.ones((4, 16, 16, 6))
    w = jnp.ones((4, 4, 6, 8))

    def compiled_text():
        step = jax.grad(
            lambda x, w: jnp.sum(onednn.conv_general_dilated(x, w, (2, 2), "VALID", dimension_numbers=NHWC) ** 2),
            argnums=(0, 1),
        )
        return jax.jit(step).lower(x, w).compile().as_text()

    # Forward, input gradient, weight gradient: each 2 * (4*7*7*8 outputs) * (4*4*6 taps).
    assert onednn.flops_in_hlo(compiled_text()) == 3 * 2 * (4 * 7 * 7 * 8) * (4 * 4 * 6)
    if onednn.bfloat16_supported():  # the same count from bfloat16 calls
        x, w = x.astype(jnp.bfloat16), w.astype(jnp.bfloat16)
        assert onednn.flops_in_hlo(compiled_text()) == 3 * 2 * (4 * 7 * 7 * 8) * (4 * 4 * 6)
    monkeypatch.setenv("PRELAR_CONV", "xla")
    assert onednn.flops_in_hlo(compiled_text()) == 0


@built
def test_resnet_encoder_same_with_either_kernel(monkeypatch):
    model = ResNetEncoder(depth=4, stages=2)
    x = jax.random.normal(jax.random.key(0), (3, 16, 16, 3))
    variables = model.init(jax.random.key(1), x, train=True)

    def run():
        def loss(params):
            out, _ = model.apply(
                {"params": params, "batch_stats": variables["batch_stats"]}, x, train=True, mutable=["batch_stats"]
            )
            return jnp.sum(out**2), out

        (value, out), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(variables["params"])
        return out, grads

    fast = run()
    monkeypatch.setenv("PRELAR_CONV", "xla")
    xla = run()
    np.testing.assert_allclose(fast[0], xla[0], rtol=1e-4, atol=1e-5)
    for got, want in zip(jax.tree.leaves(fast[1]), jax.tree.leaves(xla[1])):
        np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-4)


@built
def test_sharded_batch_matches_one_device():
    """Four (fake CPU) devices each run their shard's oneDNN calls concurrently: same result."""
    devices = jax.devices()
    if len(devices) < 4:
        pytest.skip("needs 4 devices (tests/conftest.py forces 4 host devices)")
    from jax.sharding import Mesh, PartitionSpec as P

    mesh = Mesh(np.array(devices[:4]), ("d",))
    x = jax.random.normal(jax.random.key(0), (8, 12, 12, 5))
    w = jax.random.normal(jax.random.key(1), (3, 3, 5, 6))
    conv = lambda x, w: onednn.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=NHWC)
    grad = lambda x, w: jax.grad(lambda w: jnp.sum(conv(x, w) ** 2))(w)
    sharded = jax.jit(
        jax.shard_map(
            lambda x, w: jax.lax.psum(grad(x, w), "d"),
            mesh=mesh,
            in_specs=(P("d"), P()),
            out_specs=P(),
            check_vma=False,
        )
    )
    # Float32 sums in another order (per shard, then across shards): agreement to ~1e-4 relative.
    np.testing.assert_allclose(sharded(x, w), jax.jit(grad)(x, w), rtol=1e-4, atol=1e-3)


@built
@pytest.mark.parametrize("kernel,size,padding", [(5, 5, "VALID"), (6, 13, "VALID"), (3, 8, ((1, 2), (1, 2)))])
def test_transposed_conv_runs_on_onednn_with_flax_values(kernel, size, padding):
    """The decoders' stride-2 transposed convolutions (plain CNN: VALID; ResNet: padding (1, 2))
    go to oneDNN as the input gradient of a strided convolution, with flax's values and gradients."""
    import flax.linen as nn

    from prelar_jax.model.nets.common import StridedConvTranspose

    x = jax.random.normal(jax.random.key(0), (2, size, size, 5))
    reference = nn.ConvTranspose(3, (kernel, kernel), strides=(2, 2), padding=padding)
    params = jax.tree.map(lambda a: jax.random.normal(jax.random.key(2), a.shape), reference.init(jax.random.key(1), x))
    module = StridedConvTranspose(3, (kernel, kernel), padding=padding)
    assert "prelar_onednn_conv_backward_data" in jax.jit(module.apply).lower(params, x).as_text()
    loss = lambda m: lambda p, x: jnp.sum(jnp.sin(m.apply(p, x)))
    np.testing.assert_allclose(module.apply(params, x), reference.apply(params, x), rtol=1e-5, atol=1e-5)
    for got, want in zip(
        jax.tree.leaves(jax.grad(loss(module), argnums=(0, 1))(params, x)),
        jax.tree.leaves(jax.grad(loss(reference), argnums=(0, 1))(params, x)),
    ):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_resnet_decoder_keeps_flax_parameter_names():
    """Saved checkpoints name the decoder's last layer ConvTranspose_0 (kernel [3, 3, depth/2, 3], bias)."""
    from prelar_jax.model.nets.common import StridedConvTranspose
    from prelar_jax.model.nets.resnet import ResNetDecoder

    params = ResNetDecoder(depth=4, stages=2).init(jax.random.key(0), jnp.ones((1, 8)), train=True)["params"]
    assert params["ConvTranspose_0"]["kernel"].shape == (3, 3, 2, 3)
    assert params["ConvTranspose_0"]["bias"].shape == (3,)
    with pytest.raises(ValueError, match="needs padding='VALID'"):
        StridedConvTranspose(3, (3, 3), impl="subpixel", padding=((1, 2), (1, 2))).init(
            jax.random.key(0), jnp.ones((1, 4, 4, 2))
        )


needs_bf16 = pytest.mark.skipif(
    not (onednn.load() and onednn.bfloat16_supported()), reason="oneDNN has no bfloat16 kernels for this CPU"
)


@needs_bf16
@pytest.mark.parametrize("n,side,ci,co,k,stride,padding", GEOMETRIES[:4])
def test_bfloat16_values_and_gradients_within_rounding(n, side, ci, co, k, stride, padding):
    """Mixed precision: bfloat16 inputs, products accumulated in float32, a bfloat16 result. Against
    a float64 reference on the same bfloat16-rounded inputs the error is the output's rounding
    (2^-8 relative) and no more; XLA's own bfloat16 convolution gives the same values to that."""
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.normal(size=(n, side, side, ci)), jnp.bfloat16)
    w = jnp.asarray(rng.normal(size=(k, k, ci, co)), jnp.bfloat16)
    fast = lambda x, w: onednn.conv_general_dilated(x, w, (stride, stride), padding, dimension_numbers=NHWC)
    xla = lambda x, w: lax.conv_general_dilated(x, w, (stride, stride), padding, dimension_numbers=NHWC)
    assert "prelar_onednn_conv_forward" in _targets(fast, x, w)
    y = jax.jit(fast)(x, w)
    assert y.dtype == jnp.bfloat16
    x64, w64 = np.asarray(x, np.float64), np.asarray(w, np.float64)
    pads = _pads(padding, x64, w64, stride)
    reference = _numpy_conv(x64, w64, stride, pads)
    scale = np.abs(reference).max()
    np.testing.assert_allclose(np.asarray(y, np.float64), reference, rtol=2**-7, atol=2**-7 * scale)
    np.testing.assert_allclose(
        np.asarray(y, np.float64), np.asarray(xla(x, w), np.float64), rtol=2**-6, atol=2**-6 * scale
    )
    # Gradients against float32 ones of the same bfloat16-rounded numbers (float32's error is ~1e-6
    # here, far below bfloat16's): each element within the result's rounding.
    c = jnp.asarray(rng.normal(size=y.shape), jnp.bfloat16)
    grads = lambda f, x, w: jax.jit(jax.grad(lambda x, w: jnp.sum(f(x, w).astype(jnp.float32) * c), argnums=(0, 1)))(
        x, w
    )
    got = grads(fast, x, w)
    want = grads(xla, x.astype(jnp.float32), w.astype(jnp.float32))
    for g, r in zip(got, want):
        assert g.dtype == jnp.bfloat16
        r = np.asarray(r, np.float64)
        np.testing.assert_allclose(np.asarray(g, np.float64), r, rtol=2**-7, atol=2**-7 * np.abs(r).max())


@built
def test_bfloat16_transposed_conv_runs_on_onednn_or_keeps_the_subpixel_form(monkeypatch):
    """A bfloat16 decoder layer on CPU runs on oneDNN's bfloat16 kernels where it has them, else the
    sub-pixel form; never XLA's slow dilated convolution."""
    from prelar_jax.model.nets.common import StridedConvTranspose

    x = jnp.ones((2, 5, 5, 4), jnp.bfloat16)
    module = StridedConvTranspose(3, (5, 5), dtype=jnp.bfloat16)
    params = module.init(jax.random.key(0), x)
    text = jax.jit(module.apply).lower(params, x).as_text()
    assert "lhs_dilate = [2, 2]" not in text
    assert ("prelar_onednn" in text) == onednn.bfloat16_supported()
    monkeypatch.setattr(onednn, "bfloat16_supported", lambda: False)
    text = jax.jit(module.apply).lower(params, x).as_text()
    assert "lhs_dilate = [2, 2]" not in text and "prelar_onednn" not in text
