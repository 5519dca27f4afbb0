"""The implicit-action encoder (tiny, plain) trained by MSE to the true action: can it see the motion?
Run from the repository root. Printed (2026-12-05): update, loss, held-out R2: 0 1.80 -0.02; 100 0.38 0.26; 200 0.20 0.73;
300 0.079 0.86; 400 0.076 0.90.
"""
import os
import sys, numpy as np, jax, jax.numpy as jnp, optax
sys.path.insert(0, os.getcwd())
from prelar_jax import config as config_lib, pretrain
from prelar_jax.evaluation import probe
from prelar_jax.nets.common import preprocess_image
cfg = config_lib.load_config("configs/prelar_pretrain.py:tiny", {"data.root": "data/sq3_train",
    "model.encoder": "plain", "model.depth": 8, "model.deter": 64, "model.hidden": 64, "model.stoch": 8,
    "model.classes": 8, "batch_size": 8})
model = pretrain.PretrainModel(cfg)
params, stats = model.init(jax.random.key(0))
train = probe.read_npz_episodes("data/sq3_train"); test = probe.read_npz_episodes("data/sq3_probe")
pairs = np.concatenate([np.stack([ep["image"][:-1], ep["image"][1:]], 1) for ep in train])
acts = np.concatenate([ep["action"][1:] for ep in train])
print(pairs.shape, acts.shape)
ia = model.implicit_action
opt = optax.adam(1e-3); p = params["implicit_action"]; s = stats.get("implicit_action", {}); o = opt.init(p)
def loss(p, s, x, y):
    f = preprocess_image(x)
    out, upd = ia.apply({"params": p, "batch_stats": s}, f[:, 0], f[:, 1], train=True, mutable=["batch_stats"])
    return jnp.mean((out["mean"][:, :2] - y) ** 2), upd["batch_stats"]
@jax.jit
def step(p, s, o, x, y):
    (l, s2), g = jax.value_and_grad(loss, has_aux=True)(p, s, x, y)
    u, o = opt.update(g, o, p); return optax.apply_updates(p, u), s2, o, l
rng = np.random.default_rng(0)
code_fn = probe.make_code_fn(model)
for i in range(401):
    idx = rng.integers(0, len(pairs), 64)
    p, s, o, l = step(p, s, o, pairs[idx], acts[idx])
    if i % 100 == 0:
        P = {**params, "implicit_action": p}; S = {**stats, "implicit_action": s}
        codes = probe.episode_codes(code_fn, P, S, test)
        r = probe.linear_probe(codes, [ep["action"][1:].astype(np.float64) for ep in test], list(range(8)), list(range(8, 12)))
        print(i, float(l), r["r2_mean"], flush=True)
