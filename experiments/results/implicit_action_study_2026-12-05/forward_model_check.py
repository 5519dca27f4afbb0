"""Does a code network trained only through a forward model (no world model) learn the action?

    python forward_model_check.py FREE_NATS KL_SCALE FORWARD_SCALE MODE WIDTH LR STEPS [HEAD_INIT_SCALE]
    MODE: true (the forward model gets the true action), none (zeros), det (the code mean),
          code (a sampled stochastic code). HEAD_INIT_SCALE: implicit_action.head_init_scale
          (default 1, the original). Run from the repository root; data as in command.sh.
Prints the forward model's unexplained fraction of the frame change, the code KL and the held-out
linear-probe R2 of the code mean every 250 updates (logs in forward_model_check/).
"""
import os, sys, numpy as np, jax, jax.numpy as jnp, optax
sys.path.insert(0, os.getcwd())
from prelar_jax import config as config_lib, pretrain, distributions
from prelar_jax.evaluation import probe
from prelar_jax.nets.common import preprocess_image
from prelar_jax.nets.implicit_action import PixelForwardModel
FREE = float(sys.argv[1]); KLS = float(sys.argv[2]); SCALE = float(sys.argv[3]); MODE = sys.argv[4]
cfg = config_lib.load_config("configs/prelar_pretrain.py:tiny", {"data.root": "data/sq3_train",
    "model.encoder": "plain", "model.depth": 8, "model.deter": 64, "model.hidden": 64, "model.stoch": 8,
    "model.classes": 8, "batch_size": 8,
    "implicit_action.head_init_scale": float(sys.argv[8]) if len(sys.argv) > 8 else 1.0})
model = pretrain.PretrainModel(cfg)
params, stats = model.init(jax.random.key(0))
train = probe.read_npz_episodes("data/sq3_train"); test = probe.read_npz_episodes("data/sq3_probe")
pairs = np.concatenate([np.stack([ep["image"][:-1], ep["image"][1:]], 1) for ep in train])
acts = np.concatenate([ep["action"][1:] for ep in train])
ia = model.implicit_action; fdm = PixelForwardModel(depth=int(sys.argv[5]))
fp = fdm.init(jax.random.key(1), jnp.zeros((2, 64, 64, 3)), jnp.zeros((2, 8)))["params"]
p = {"ia": params["implicit_action"], "f": fp}
opt = optax.adam(float(sys.argv[6])); s = stats.get("implicit_action", {}); o = opt.init(p)
def loss(p, s, x, y, key):
    f = preprocess_image(x)
    out, upd = ia.apply({"params": p["ia"], "batch_stats": s}, f[:, 0], f[:, 1], train=True, mutable=["batch_stats"])
    if MODE == "true":
        code = jnp.concatenate([y, jnp.zeros((y.shape[0], 6))], -1)
    elif MODE == "none":
        code = jnp.zeros((y.shape[0], 8))
    elif MODE == "det":
        code = out["mean"]
    else:
        code = out["mean"] + out["std"] * jax.random.normal(key, out["mean"].shape)
    pred = fdm.apply({"params": p["f"]}, f[:, 0], code)
    frac = jnp.sum((pred - f[:, 1]) ** 2) / jnp.sum((f[:, 1] - f[:, 0]) ** 2)
    kl = distributions.gaussian_kl(out["mean"], out["std"], 0.0, 1.2449).mean()
    return SCALE * frac + KLS * jnp.maximum(kl, FREE), (upd["batch_stats"], frac, kl)
@jax.jit
def step(p, s, o, x, y, key):
    (l, (s2, frac, kl)), g = jax.value_and_grad(loss, has_aux=True)(p, s, x, y, key)
    u, o = opt.update(g, o, p); return optax.apply_updates(p, u), s2, o, frac, kl
rng = np.random.default_rng(0)
code_fn = probe.make_code_fn(model)
for i in range(int(sys.argv[7])):
    idx = rng.integers(0, len(pairs), 56)
    p, s, o, frac, kl = step(p, s, o, pairs[idx], acts[idx], jax.random.key(i))
    if i % 250 == 0:
        P = {**params, "implicit_action": p["ia"]}; S = {**stats, "implicit_action": s}
        codes = probe.episode_codes(code_fn, P, S, test)
        r = probe.linear_probe(codes, [ep["action"][1:].astype(np.float64) for ep in test], list(range(8)), list(range(8, 12)))
        print(i, "frac", round(float(frac), 3), "kl", round(float(kl), 3), "R2", round(r["r2_mean"], 3), flush=True)
