import time, sys
import numpy as np
import prelar_jax  # default XLA flags
import jax, jax.numpy as jnp

BT = np.array([[1,0,-1,0],[0,1,1,0],[0,-1,1,0],[0,1,0,-1]], np.float32)
G = np.array([[1,0,0],[.5,.5,.5],[.5,-.5,.5],[0,0,1]], np.float32)
AT = np.array([[1,1,1,0],[0,1,-1,-1]], np.float32)

def lincomb(mat, parts):
    out = []
    for row in mat:
        acc = None
        for c, p in zip(row, parts):
            if c == 0: continue
            term = p if c == 1 else (-p if c == -1 else c * p)
            acc = term if acc is None else acc + term
        out.append(acc)
    return out

def wino_conv(x, w):
    n, h, wd, c = x.shape
    k = w.shape[-1]
    xp = jnp.pad(x, ((0,0),(1,1),(1,1),(0,0)))
    d = [[xp[:, i:i+h:2, j:j+wd:2, :] for j in range(4)] for i in range(4)]  # [i][j] -> [N,h/2,w/2,C]
    # rows: B^T d
    t = [lincomb(BT[a], [d[i] for i in range(4)]) if False else None for a in range(4)]
    rows = [[None]*4 for _ in range(4)]
    for a in range(4):
        for j in range(4):
            rows[a][j] = lincomb([BT[a]], [d[i][j] for i in range(4)])[0]
    V = []
    for a in range(4):
        for b in range(4):
            V.append(lincomb([BT[b]], [rows[a][j] for j in range(4)])[0])
    V = jnp.stack(V).reshape(16, -1, c)  # [16, P, C]
    U = jnp.einsum("ai,bj,ijck->abck", G, G, w).reshape(16, c, k)
    M = jnp.einsum("spc,sck->spk", V, U).reshape(4, 4, n, h//2, wd//2, k)
    Mr = [[M[a, b] for b in range(4)] for a in range(4)]
    r1 = [[lincomb([AT[o]], [Mr[a][b] for a in range(4)])[0] for b in range(4)] for o in range(2)]
    Y = [[lincomb([AT[q]], [r1[o][b] for b in range(4)])[0] for q in range(2)] for o in range(2)]
    Y = jnp.stack([jnp.stack(Y[o], axis=3) for o in range(2)], axis=2)  # [N, h/2, 2, w/2, 2, K]
    return Y.reshape(n, h, wd, k)

def ref_conv(x, w):
    return jax.lax.conv_general_dilated(x, w, (1,1), "SAME", dimension_numbers=("NHWC","HWIO","NHWC"))

def timeit(f, *a, reps=5):
    out = f(*a); jax.block_until_ready(out)
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter(); jax.block_until_ready(f(*a)); ts.append(time.perf_counter() - t0)
    return np.median(ts)

rng = np.random.default_rng(0)
for (n, hw, c) in [(400, 32, 48), (400, 16, 96), (400, 8, 192)]:
    x = jnp.asarray(rng.normal(size=(n, hw, hw, c)).astype(np.float32))
    w = jnp.asarray((rng.normal(size=(3, 3, c, c)) / np.sqrt(9*c)).astype(np.float32))
    yr, yw = ref_conv(x, w), jax.jit(wino_conv)(x, w)
    err = float(jnp.max(jnp.abs(yr - yw)))
    for name, f in [("xla", ref_conv), ("wino", wino_conv)]:
        fwd = jax.jit(f)
        loss = lambda x, w, f=f: jnp.sum(f(x, w) ** 2) * 0.5
        g = jax.jit(jax.grad(loss, argnums=(0, 1)))
        print(f"{n}x{hw}x{hw}x{c} {name}: fwd {timeit(fwd, x, w)*1e3:.1f} ms, fwd+grads {timeit(g, x, w)*1e3:.1f} ms", flush=True)
    gx_r, gw_r = jax.jit(jax.grad(lambda x, w: jnp.sum(ref_conv(x, w) ** 2) * 0.5, argnums=(0,1)))(x, w)
    gx_w, gw_w = jax.jit(jax.grad(lambda x, w: jnp.sum(wino_conv(x, w) ** 2) * 0.5, argnums=(0,1)))(x, w)
    print(f"   max |y diff| {err:.2e}, rel grad_w diff {float(jnp.linalg.norm(gw_r-gw_w)/jnp.linalg.norm(gw_r)):.2e}, rel grad_x {float(jnp.linalg.norm(gx_r-gx_w)/jnp.linalg.norm(gx_r)):.2e}", flush=True)
