"""One flax BatchNorm + ReLU, forward and forward + backward, on a 400x32x32x48 activation:
``python bn_microbench.py f32`` or ``bf16`` (minimum of 5 calls after compiling)."""

import time
import jax
import jax.numpy as jnp
import numpy as np
import flax.linen as nn
import sys

dt = jnp.bfloat16 if sys.argv[1] == "bf16" else jnp.float32
x = jnp.asarray(np.random.rand(400, 32, 32, 48), dt)
bn = nn.BatchNorm(use_running_average=False, momentum=0.9, epsilon=1e-5, dtype=dt)
v = bn.init(jax.random.key(0), x)
c = jnp.asarray(np.random.rand(*x.shape), dt)


def loss(p, x):
    y, _ = bn.apply({"params": p, "batch_stats": v["batch_stats"]}, x, mutable=["batch_stats"])
    return jnp.sum((nn.relu(y) * c).astype(jnp.float32))


fwd = jax.jit(lambda p, x: bn.apply({"params": p, "batch_stats": v["batch_stats"]}, x, mutable=["batch_stats"])[0])
g = jax.jit(jax.grad(loss, argnums=(0, 1)))
for name, f in (("fwd", fwd), ("fwd+bwd", g)):
    jax.block_until_ready(f(v["params"], x))
    ts = []
    for _ in range(5):
        t = time.perf_counter()
        jax.block_until_ready(f(v["params"], x))
        ts.append(time.perf_counter() - t)
    print(sys.argv[1], name, round(min(ts) * 1000, 1), "ms; tensor", x.nbytes / 1e6, "MB")
