"""FLOP rate of each part of a 3x3 convolution at the paper ResNets' shapes, against a large matmul.

    python experiments/conv_rates.py --batch 400 --out /tmp/conv_rates.json

Times the forward convolution, the input gradient and the weight gradient at 32x32x48, 16x16x96
and 8x8x192 as separately jitted programs, and a float32 square matmul as the machine's reference
rate: how fast this device can run the paper step's dominant work at best (experiments/BENCHMARKS.md).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from prelar_jax.runtime.xla_setup import apply_default_xla_flags  # noqa: E402

apply_default_xla_flags()  # the project's default XLA flags, before JAX starts a backend

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from prelar_jax.perf.throughput_report import matmul_rate, time_calls  # noqa: E402

# (side, input channels, output channels) of the paper ResNets' 3x3 convolutions (depth 48).
PAPER_SHAPES = ((32, 48, 48), (16, 96, 96), (8, 192, 192))


def conv3x3(x: jax.Array, kernel: jax.Array) -> jax.Array:
    return jax.lax.conv_general_dilated(x, kernel, (1, 1), ((1, 1), (1, 1)), dimension_numbers=("NHWC", "HWIO", "NHWC"))


def median_seconds(fn, *args, repeats: int) -> float:
    compiled = jax.jit(fn)
    return statistics.median(time_calls(lambda: compiled(*args), 1, repeats))  # 1: compile and warm up


def measure(batch: int, side: int, cin: int, cout: int, repeats: int, dtype=jnp.float32) -> dict:
    keys = jax.random.split(jax.random.key(0), 3)
    x = jax.random.normal(keys[0], (batch, side, side, cin), dtype)
    kernel = (jax.random.normal(keys[1], (3, 3, cin, cout)) * 0.05).astype(dtype)
    grad = jax.random.normal(keys[2], (batch, side, side, cout), dtype)
    parts = {
        "fwd": lambda x, k, g: conv3x3(x, k),
        "dgrad": lambda x, k, g: jax.vjp(lambda x: conv3x3(x, k), x)[1](g)[0],
        "wgrad": lambda x, k, g: jax.vjp(lambda k: conv3x3(x, k), k)[1](g)[0],
    }
    flops = 2.0 * batch * side * side * 9 * cin * cout  # the same for each part
    row = {"shape": f"{batch}x{side}x{side}x{cin}->{cout}", "gflop": flops / 1e9}
    for name, fn in parts.items():
        seconds = median_seconds(fn, x, kernel, grad, repeats=repeats)
        row[f"{name}_ms"] = seconds * 1e3
        row[f"{name}_gflops"] = flops / seconds / 1e9
    return row


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=400, help="frames per convolution (paper step: 400)")
    parser.add_argument("--matmul", type=int, default=4096, help="side of the reference square matmul")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    args = parser.parse_args(argv)
    if args.batch < 1 or args.matmul < 1 or args.repeats < 1:
        parser.error("--batch, --matmul and --repeats must be positive")
    device = jax.devices()[0]
    print(f"device: {device.platform} ({device.device_kind}); float32; median of {args.repeats} calls", flush=True)

    reference = matmul_rate(args.matmul, jnp.float32, device, warmup=1, steps=args.repeats)
    matmul_gflops = reference["flops_per_second"] / 1e9
    print(
        f"reference matmul {args.matmul}^3: {reference['seconds'] * 1e3:.1f} ms, {matmul_gflops:.1f} GFLOP/s",
        flush=True,
    )

    rows = []
    header = f"{'shape':22s} {'GFLOP':>6s} " + " ".join(
        f"{p + ' ms':>9s} {'GFLOP/s':>8s}" for p in ("fwd", "dgrad", "wgrad")
    )
    print(header + "\n" + "-" * len(header))
    for side, cin, cout in PAPER_SHAPES:
        row = measure(args.batch, side, cin, cout, args.repeats)
        rows.append(row)
        print(
            f"{row['shape']:22s} {row['gflop']:6.2f} "
            + " ".join(f"{row[p + '_ms']:9.1f} {row[p + '_gflops']:8.1f}" for p in ("fwd", "dgrad", "wgrad")),
            flush=True,
        )
    if args.out:
        result = {
            "device": f"{device.platform} ({device.device_kind})",
            "host": platform.node(),
            "jax": jax.__version__,
            "batch": args.batch,
            "repeats": args.repeats,
            "matmul": {"side": args.matmul, "gflops": matmul_gflops},
            "convolutions": rows,
        }
        Path(args.out).write_text(json.dumps(result, indent=2))
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
