"""Ceiling of the Meta-World action probe for frame pairs k frames apart (data.frame_stride k):
the `cpu` implicit-action network trained by MSE to the summed (dx, dy, dz) of the k actions
between its two frames (the videos store the actions; pre-training never reads them), then the
study's linear probe on held-out probe episodes (split by episode, pairs k apart).
--shift N pads each training pair by N pixels (edge) and crops it back at a random offset, the same
for both frames (DrQ's augmentation). --in_domain trains on the probe episodes of the probe's own fitting split instead (can the frames
show the action at all), else on the pre-training videos (does it carry over to unseen tasks).
Run from the repository root:

    python supervised_ceiling_stride.py TRAIN_DIR PROBE_DIR K [UPDATES] [LR] [--in_domain] [--shift N]
        [--set KEY=VALUE ...]   (config overrides, e.g. --set model.depth=32)
"""
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

sys.path.insert(0, os.getcwd())
from prelar_jax import config as config_lib, pretrain  # noqa: E402
from prelar_jax.evaluation import pretrain_eval, probe  # noqa: E402
from prelar_jax.nets.common import preprocess_image  # noqa: E402

shift = int(sys.argv[sys.argv.index("--shift") + 1]) if "--shift" in sys.argv else 0
sets = dict(sys.argv[i + 1].split("=", 1) for i, a in enumerate(sys.argv) if a == "--set")
args = [a for i, a in enumerate(sys.argv[1:], 1)
        if not a.startswith("--") and sys.argv[i - 1] not in ("--shift", "--set")]
train_dir, probe_dir, k = args[0], args[1], int(args[2])
updates = int(args[3]) if len(args) > 3 else 800
lr = float(args[4]) if len(args) > 4 else 1e-3
in_domain = "--in_domain" in sys.argv


def _value(text):
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


cfg = config_lib.load_config("configs/prelar_pretrain.py:cpu", {
    "data.root": train_dir, "implicit_action.code_type": "deter", **{k: _value(v) for k, v in sets.items()}})
model = pretrain.PretrainModel(cfg)
params, stats = model.init(jax.random.key(0))
raw = probe.read_npz_episodes(probe_dir)
train_eps, held_out = probe.split_episodes(len(raw), 0.7, np.random.default_rng(cfg.seed + 12345))
test = probe.stride_episodes(raw, k)
source = [raw[i] for i in train_eps] if in_domain else probe.read_npz_episodes(train_dir)
# every offset of each episode: all pairs k frames apart
train = probe.stride_episodes([{"image": ep["image"][o:], "action": ep["action"][o:]}
                               for ep in source for o in range(k)], k)
pairs = np.concatenate([np.stack([ep["image"][:-1], ep["image"][1:]], 1) for ep in train])
acts = np.concatenate([ep["action"][1:, :3] for ep in train]).astype(np.float32)
scale = acts.std(axis=0) + 1e-6
print(f"k={k} in_domain={in_domain} shift={shift} overrides={sets} pairs {pairs.shape} "
      f"action std {acts.std(axis=0).round(3)}", flush=True)
net = model.implicit_action
opt = optax.adam(lr)
p, s = params["implicit_action"], stats.get("implicit_action", {})
o = opt.init(p)


def loss(p, s, x, y):
    f = preprocess_image(x)
    out, upd = net.apply({"params": p, "batch_stats": s}, f[:, 0], f[:, 1], train=True, mutable=["batch_stats"])
    return jnp.mean(((out["deter"][:, :3] - y) / scale) ** 2), upd["batch_stats"]


@jax.jit
def step(p, s, o, x, y):
    (value, s2), g = jax.value_and_grad(loss, has_aux=True)(p, s, x, y)
    u, o = opt.update(g, o, p)
    return optax.apply_updates(p, u), s2, o, value


rng = np.random.default_rng(0)


def augment(x):
    """[B, 2, H, W, 3] uint8 -> the same, each pair shifted by one random offset in [-shift, shift]."""
    if not shift:
        return x
    size = x.shape[2]
    padded = np.pad(x, ((0, 0), (0, 0), (shift, shift), (shift, shift), (0, 0)), mode="edge")
    dy, dx = rng.integers(0, 2 * shift + 1, (2, len(x)))
    return np.stack([padded[b, :, dy[b]:dy[b] + size, dx[b]:dx[b] + size] for b in range(len(x))])


code_fn = probe.make_code_fn(model)
start = time.time()
for i in range(updates + 1):
    idx = rng.integers(0, len(pairs), 32)
    p, s, o, value = step(p, s, o, augment(pairs[idx]), acts[idx])
    if i % 200 == 0:
        scores = pretrain_eval.probe_scores(code_fn, {**params, "implicit_action": p},
                                            {**stats, "implicit_action": s}, test, train_eps, held_out)
        print(f"update {i} train nmse {float(value):.3f} held-out probe R2 {scores['r2_mean']:.3f} "
              f"per dim {np.round(scores['r2'], 3).tolist()} ({time.time() - start:.0f} s)", flush=True)
