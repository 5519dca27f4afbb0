"""Ceiling of the probe on Meta-World frame pairs: the `cpu` implicit-action network trained by MSE
to the true (dx, dy, dz) of the pre-training videos (which store the actions; pre-training never
reads them), then the study's linear probe on the held-out probe tasks (split by episode).
Run from the repository root:

    python supervised_ceiling.py TRAIN_DIR PROBE_DIR [UPDATES] [LR]
"""
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax

sys.path.insert(0, os.getcwd())
from prelar_jax import config as config_lib, pretrain  # noqa: E402
from prelar_jax.evaluation import pretrain_eval, probe  # noqa: E402
from prelar_jax.nets.common import preprocess_image  # noqa: E402

train_dir, probe_dir = sys.argv[1], sys.argv[2]
updates = int(sys.argv[3]) if len(sys.argv) > 3 else 800
lr = float(sys.argv[4]) if len(sys.argv) > 4 else 1e-3
cfg = config_lib.load_config("configs/prelar_pretrain.py:cpu", {"data.root": train_dir,
                                                                "implicit_action.code_type": "deter"})
model = pretrain.PretrainModel(cfg)
params, stats = model.init(jax.random.key(0))
train = probe.read_npz_episodes(train_dir)
test = probe.read_npz_episodes(probe_dir)
pairs = np.concatenate([np.stack([ep["image"][:-1], ep["image"][1:]], 1) for ep in train])
acts = np.concatenate([ep["action"][1:, :3] for ep in train]).astype(np.float32)
print("pairs", pairs.shape, "action std", acts.std(axis=0).round(3), flush=True)
net = model.implicit_action
opt = optax.adam(lr)
p, s = params["implicit_action"], stats.get("implicit_action", {})
o = opt.init(p)


def loss(p, s, x, y):
    f = preprocess_image(x)
    out, upd = net.apply({"params": p, "batch_stats": s}, f[:, 0], f[:, 1], train=True, mutable=["batch_stats"])
    return jnp.mean((out["deter"][:, :3] - y) ** 2), upd["batch_stats"]


@jax.jit
def step(p, s, o, x, y):
    (value, s2), g = jax.value_and_grad(loss, has_aux=True)(p, s, x, y)
    u, o = opt.update(g, o, p)
    return optax.apply_updates(p, u), s2, o, value


rng = np.random.default_rng(0)
code_fn = probe.make_code_fn(model)
train_eps, held_out = probe.split_episodes(len(test), 0.7, np.random.default_rng(cfg.seed + 12345))
for i in range(updates + 1):
    idx = rng.integers(0, len(pairs), 32)
    p, s, o, value = step(p, s, o, pairs[idx], acts[idx])
    if i % 200 == 0:
        scores = pretrain_eval.probe_scores(code_fn, {**params, "implicit_action": p},
                                            {**stats, "implicit_action": s}, test, train_eps, held_out)
        print(f"update {i} train mse {float(value):.4f} held-out probe R2 {scores['r2_mean']:.3f} "
              f"per dim {np.round(scores['r2'], 3).tolist()}", flush=True)
