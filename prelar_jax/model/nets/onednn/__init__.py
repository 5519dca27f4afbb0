"""oneDNN convolutions for the CPU backend, behind the same signature as ``lax.conv_general_dilated``.

XLA's CPU convolutions run the paper ResNets' 3x3 convolutions at 160-400 GFLOP/s on a 2-core
AVX-512 machine, and their weight gradients need layout transposes of every activation; oneDNN's
kernels run the same convolutions at 390-550 GFLOP/s straight from NHWC (experiments/BENCHMARKS.md,
"oneDNN convolutions and tcmalloc"), and in bfloat16 about twice as fast again where the CPU has
AVX-512 bfloat16 instructions. ``conv_general_dilated`` here sends a float32 or bfloat16 (mixed
precision, ``model.compute_dtype``) 2-D NHWC/HWIO convolution without kernel dilation or groups,
and a transposed one (input dilated by the stride, as ``lax.conv_transpose`` makes it), to three
XLA FFI handlers (forward, input gradient, weight gradient, ``conv.cc``) when the backend is CPU
and the extension is built; every other call, and every other backend, is
``lax.conv_general_dilated`` itself. The network is defined once (``nets.common.Conv``); only the
kernel that runs it differs.

Choice: ``PRELAR_CONV`` = ``auto`` (default: oneDNN on CPU when built, else XLA), ``xla``, or
``onednn`` (an error if the extension is not built). ``PRELAR_CONV_ALGORITHM`` = ``auto`` (default:
oneDNN's Winograd kernels for the float32 3x3 stride-1 convolutions on maps of at most 16x16 where
the CPU has them, measured faster there, ``conv.cc: UseWinograd``; direct kernels elsewhere) or
``direct`` (direct kernels only, for comparisons). Build: ``python -m
prelar_jax.model.nets.onednn.build`` (``experiments/setup_env.sh`` does it when the oneDNN headers
are installed: Debian ``libdnnl-dev``).
"""

from __future__ import annotations

import ctypes
import functools
import math
import os
import re
import warnings
from typing import Any, Sequence

import jax
import jax.numpy as jnp
from jax import lax

from prelar_jax.errors import UserError

LIBRARY = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_prelar_onednn_conv.so")
CHOICES = ("auto", "xla", "onednn")
ALGORITHMS = ("auto", "direct")
ABI_VERSION = 2  # conv.cc's PrelarConvAbiVersion: the handlers' attributes
_TARGETS = {
    "forward": "prelar_onednn_conv_forward",
    "backward_data": "prelar_onednn_conv_backward_data",
    "backward_weights": "prelar_onednn_conv_backward_weights",
}
_SYMBOLS = {
    "forward": "PrelarConvForward",
    "backward_data": "PrelarConvBackwardData",
    "backward_weights": "PrelarConvBackwardWeights",
}
NHWC = ("NHWC", "HWIO", "NHWC")  # the layout the kernels read (activations, kernel, output)
DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16))  # both operands and the result share one


class ConvImplError(UserError, ValueError):
    """``PRELAR_CONV`` names an unknown choice, or oneDNN where the extension is not built."""


@functools.cache
def _library() -> ctypes.CDLL | None:
    """The extension with its FFI handlers registered (once); None when not built or not loadable."""
    if not os.path.exists(LIBRARY):
        return None
    try:
        lib = ctypes.cdll.LoadLibrary(LIBRARY)
    except OSError:
        return None
    if _abi_version(lib) != ABI_VERSION:
        return None
    for kind, target in _TARGETS.items():
        jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(lib, _SYMBOLS[kind])), platform="cpu")
    return lib


def _abi_version(lib: ctypes.CDLL) -> int:
    return lib.PrelarConvAbiVersion() if hasattr(lib, "PrelarConvAbiVersion") else 1


@functools.cache
def stale() -> bool:
    """Whether the built library predates this code (built from an older ``conv.cc``): it is then
    not used, and :func:`enabled` says how to rebuild it."""
    if not os.path.exists(LIBRARY):
        return False
    try:
        return _abi_version(ctypes.cdll.LoadLibrary(LIBRARY)) != ABI_VERSION
    except OSError:
        return False


def load() -> bool:
    """Registers the FFI handlers once; False when the library is not built or does not load."""
    return _library() is not None


@functools.cache
def bfloat16_supported() -> bool:
    """Whether oneDNN has bfloat16 convolution kernels for this CPU (AVX-512 and newer); bfloat16
    convolutions elsewhere stay on XLA."""
    lib = _library()
    return bool(lib is not None and hasattr(lib, "PrelarConvBfloat16Supported") and lib.PrelarConvBfloat16Supported())


def uses_winograd(n: int, side: int, in_channels: int, out_channels: int) -> bool:
    """Whether a float32 3x3 stride-1 'SAME' convolution of an ``[n, side, side, in_channels]`` batch
    runs oneDNN's Winograd kernels under ``PRELAR_CONV_ALGORITHM=auto`` (in all three directions;
    never where this CPU has no Winograd kernels or the extension is not loaded)."""
    lib = _library()
    if lib is None:
        return False
    fn = lib.PrelarConvUsesWinograd
    fn.argtypes = [ctypes.c_int64] * 4
    answer = fn(n, side, in_channels, out_channels)
    if answer < 0:
        raise RuntimeError(f"oneDNN could not make a convolution for {(n, side, side, in_channels)} -> {out_channels}")
    return bool(answer)


def _setting(name: str, allowed: tuple[str, ...]) -> str:
    value = os.environ.get(name, "auto")
    if value not in allowed:
        raise ConvImplError(f"{name}={value!r}; choose one of {allowed}")
    return value


def choice() -> str:
    return _setting("PRELAR_CONV", CHOICES)


def algorithm() -> str:
    """``PRELAR_CONV_ALGORITHM`` (read at trace time): ``auto`` lets oneDNN's Winograd kernels run
    where they are faster, ``direct`` keeps the direct kernels."""
    return _setting("PRELAR_CONV_ALGORITHM", ALGORITHMS)


def enabled() -> bool:
    """Whether convolutions traced now go to oneDNN (checked at trace time)."""
    which = choice()
    if which == "xla" or jax.default_backend() != "cpu":
        return False
    if not load():
        if which == "onednn":
            problem = "built from an older conv.cc" if stale() else "not built"
            raise ConvImplError(
                f"PRELAR_CONV=onednn but the oneDNN extension is {problem} ({LIBRARY}): "
                "install the oneDNN headers (Debian: apt-get install libdnnl-dev) and run "
                "'python -m prelar_jax.model.nets.onednn.build' (or experiments/setup_env.sh), or set PRELAR_CONV=auto"
            )
        if stale():
            _warn_stale()
        return False
    return True


@functools.cache
def _warn_stale() -> None:
    warnings.warn(
        f"the oneDNN extension {LIBRARY} was built from an older conv.cc and is not used: convolutions run on "
        "XLA's slower kernels until it is rebuilt ('python -m prelar_jax.model.nets.onednn.build' or "
        "experiments/setup_env.sh)",
        stacklevel=3,
    )


def takes(dtype) -> bool:
    """Whether a convolution in ``dtype`` traced now goes to oneDNN (:func:`enabled`, and bfloat16
    only where this CPU has oneDNN's bfloat16 kernels)."""
    if jnp.dtype(dtype) not in DTYPES or not enabled():
        return False
    return jnp.dtype(dtype) == jnp.float32 or bfloat16_supported()


def _pairs(padding, lhs_shape, rhs_shape, strides) -> tuple[tuple[int, int], ...] | None:
    if isinstance(padding, str):
        return tuple(lax.padtype_to_pads(lhs_shape[1:3], rhs_shape[0:2], strides, padding))
    pads = tuple((int(lo), int(hi)) for lo, hi in padding)
    return pads if all(lo >= 0 and hi >= 0 for lo, hi in pads) else None


def _supported(lhs, rhs, strides, rhs_dilation, dimension_numbers, groups, batch_groups) -> bool:
    # Which dtypes oneDNN takes is :func:`takes`' question; here only that both operands share one.
    if lhs.ndim != 4 or rhs.ndim != 4 or lhs.dtype != rhs.dtype or len(strides) != 2:
        return False
    if groups != 1 or batch_groups != 1 or any(d != 1 for d in (rhs_dilation or ())):
        return False
    want = lax.conv_dimension_numbers(lhs.shape, rhs.shape, NHWC)
    have = lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers or ("NCHW", "OIHW", "NCHW"))
    return have == want


def _call(kind: str, shape, a, b, strides, pads):
    (pt, pb), (pl, pr) = pads
    out = jax.ShapeDtypeStruct(shape, a.dtype)
    return jax.ffi.ffi_call(_TARGETS[kind], out, vmap_method="sequential")(
        a,
        b,
        stride_h=strides[0],
        stride_w=strides[1],
        pad_top=pt,
        pad_bottom=pb,
        pad_left=pl,
        pad_right=pr,
        winograd=int(algorithm() == "auto"),
    )


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _conv(x, kernel, strides, pads):
    n, h, w, _ = x.shape
    kh, kw, _, co = kernel.shape
    oh = (h + pads[0][0] + pads[0][1] - kh) // strides[0] + 1
    ow = (w + pads[1][0] + pads[1][1] - kw) // strides[1] + 1
    return _call("forward", (n, oh, ow, co), x, kernel, strides, pads)


def _conv_fwd(x, kernel, strides, pads):
    return _conv(x, kernel, strides, pads), (x, kernel)


def _conv_bwd(strides, pads, residuals, dy):
    x, kernel = residuals
    dx = _call("backward_data", x.shape, dy, kernel, strides, pads)
    dk = _call("backward_weights", kernel.shape, x, dy, strides, pads)
    return dx, dk


_conv.defvjp(_conv_fwd, _conv_bwd)


# A transposed convolution (``lax.conv_transpose``: the input dilated by the stride, then a
# stride-1 convolution with padding ``(lo, hi)``) is the input gradient of an ordinary strided
# convolution from its output back to its input, with the kernel flipped and its in/out swapped and
# padding ``(k - 1 - lo, k - 1 - hi)``; its own gradients are that convolution's forward pass and
# weight gradient. So oneDNN's three kernels serve it too, without the zeros of the dilation.
def _flip(kernel):
    return jnp.flip(kernel, (0, 1)).transpose(0, 1, 3, 2)


def _forward_pads(kernel_shape, pads):
    return tuple((k - 1 - lo, k - 1 - hi) for k, (lo, hi) in zip(kernel_shape[:2], pads))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _conv_transposed(x, kernel, strides, pads):
    n, h, w, _ = x.shape
    kh, kw, _, co = kernel.shape
    oh = (h - 1) * strides[0] + 1 + pads[0][0] + pads[0][1] - kh + 1
    ow = (w - 1) * strides[1] + 1 + pads[1][0] + pads[1][1] - kw + 1
    return _call("backward_data", (n, oh, ow, co), x, _flip(kernel), strides, _forward_pads(kernel.shape, pads))


def _conv_transposed_fwd(x, kernel, strides, pads):
    return _conv_transposed(x, kernel, strides, pads), (x, kernel)


def _conv_transposed_bwd(strides, pads, residuals, dy):
    x, kernel = residuals
    flipped, forward_pads = _flip(kernel), _forward_pads(kernel.shape, pads)
    dx = _call("forward", x.shape, dy, flipped, strides, forward_pads)
    dflipped = _call("backward_weights", flipped.shape, dy, x, strides, forward_pads)
    return dx, _flip(dflipped)


_conv_transposed.defvjp(_conv_transposed_fwd, _conv_transposed_bwd)


def _route(lhs, rhs, strides, padding, lhs_dilation):
    """oneDNN's result for a supported call, else None."""
    dilation = tuple(int(d) for d in (lhs_dilation or (1, 1)))
    if dilation == (1, 1):
        pads = _pairs(padding, lhs.shape, rhs.shape, strides)
        return None if pads is None else _conv(lhs, rhs, strides, pads)
    if strides != (1, 1) or isinstance(padding, str):
        return None
    pads = tuple((int(lo), int(hi)) for lo, hi in padding)
    if not all(0 <= lo < k and 0 <= hi < k for k, (lo, hi) in zip(rhs.shape[:2], pads)):
        return None
    return _conv_transposed(lhs, rhs, dilation, pads)


def conv_general_dilated(
    lhs: jax.Array,
    rhs: jax.Array,
    window_strides: Sequence[int],
    padding: Any,
    lhs_dilation: Sequence[int] | None = None,
    rhs_dilation: Sequence[int] | None = None,
    dimension_numbers: Any = None,
    feature_group_count: int = 1,
    batch_group_count: int = 1,
    precision: Any = None,
    preferred_element_type: Any = None,
) -> jax.Array:
    """``lax.conv_general_dilated``, run by oneDNN where :func:`enabled` and the call is supported."""
    strides = tuple(int(s) for s in window_strides)
    if (
        preferred_element_type in (None, lhs.dtype)
        and _supported(lhs, rhs, strides, rhs_dilation, dimension_numbers, feature_group_count, batch_group_count)
        and takes(lhs.dtype)
    ):
        routed = _route(lhs, rhs, strides, padding, lhs_dilation)
        if routed is not None:
            return routed
    return lax.conv_general_dilated(
        lhs,
        rhs,
        window_strides,
        padding,
        lhs_dilation=lhs_dilation,
        rhs_dilation=rhs_dilation,
        dimension_numbers=dimension_numbers,
        feature_group_count=feature_group_count,
        batch_group_count=batch_group_count,
        precision=precision,
        preferred_element_type=preferred_element_type,
    )


_CALL = re.compile(
    r"= (?:f32|bf16)\[([\d,]*)\][^=]*custom-call\([^)]*\), custom_call_target=\"prelar_onednn_conv_(\w+)\", "
    r"operand_layout_constraints=\{(?:f32|bf16)\[([\d,]*)\]\{[\d,]*\}, (?:f32|bf16)\[([\d,]*)\]"
)


def flops_in_hlo(hlo_text: str) -> float:
    """Multiply-adds x 2 of the oneDNN convolutions in a compiled module's HLO text: XLA's cost
    analysis cannot see inside custom calls, so a step's FLOP count adds these."""
    total = 0.0
    for result, kind, first, second in _CALL.findall(hlo_text):
        shape = lambda text: [int(d) for d in text.split(",") if d]
        if kind == "forward":
            y, kernel = shape(result), shape(second)
        elif kind == "backward_data":
            y, kernel = shape(first), shape(second)
        else:  # backward_weights: (x, dy) -> kernel
            y, kernel = shape(second), shape(result)
        total += 2.0 * math.prod(y) * math.prod(kernel[:3])
    return total
