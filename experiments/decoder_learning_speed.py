"""How fast does a decoder learn a fixed-background video? (experiments/BENCHMARKS.md, 2026-12-05)

    python experiments/decoder_learning_speed.py --decoder resnet --depth 8 --stages 3 --lr 3e-4
    python experiments/decoder_learning_speed.py --decoder plain --depth 8 --lr 3e-4

The decoder alone maps a fixed random 64-d feature per frame to that frame (the 420 frames of 20
synthetic square episodes, ``prelar_jax.data.synthetic``), batch 32, Adam (eps 1e-5) on the summed
squared error; prints the per-pixel MSE in [0, 1] every 150 steps beside the mean-frame MSE.
"""

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

from prelar_jax.data import synthetic  # noqa: E402
from prelar_jax.model.nets.plaincnn import PlainDecoder  # noqa: E402
from prelar_jax.model.nets.resnet import ResNetDecoder  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--decoder", choices=("resnet", "plain"), required=True)
    p.add_argument("--depth", type=int, default=8)
    p.add_argument("--stages", type=int, default=3, help="ResNet stages")
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--steps", type=int, default=600)
    args = p.parse_args()

    episodes = synthetic.moving_square_episodes(20, 20, seed=0)
    images = np.concatenate([e["image"] for e in episodes]).astype(np.float32) / 255 - 0.5  # [N, 64, 64, 3]
    mean_frame_mse = float(np.mean((images - images.mean(0)) ** 2))
    decoder = (
        ResNetDecoder(args.depth, args.stages, image_size=64) if args.decoder == "resnet" else PlainDecoder(args.depth)
    )
    features = jax.random.normal(jax.random.key(0), (len(images), 64))
    variables = decoder.init(jax.random.key(1), jnp.zeros((2, 64)), train=False)
    params, stats = variables["params"], variables.get("batch_stats", {})
    optimizer = optax.adam(args.lr, eps=1e-5)
    opt_state = optimizer.init(params)

    @jax.jit
    def step(params, stats, opt_state, x, y):
        def loss(p):
            variables = {"params": p, **({"batch_stats": stats} if stats else {})}
            if stats:
                out, updated = decoder.apply(variables, x, train=True, mutable=["batch_stats"])
                new_stats = updated["batch_stats"]
            else:
                out, new_stats = decoder.apply(variables, x, train=True), stats
            return 0.5 * jnp.sum((out - y) ** 2, axis=(1, 2, 3)).mean(), (new_stats, jnp.mean((out - y) ** 2))

        (_, (new_stats, mse)), grads = jax.value_and_grad(loss, has_aux=True)(params)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), new_stats, opt_state, mse

    rng = np.random.default_rng(0)
    start = time.perf_counter()
    for i in range(1, args.steps + 1):
        index = rng.integers(len(images), size=32)
        params, stats, opt_state, mse = step(params, stats, opt_state, features[index], images[index])
        if i % 150 == 0:
            print(
                f"{args.decoder} depth {args.depth} lr {args.lr}: step {i} mse {float(mse):.5f} "
                f"(mean frame {mean_frame_mse:.5f}), {time.perf_counter() - start:.0f}s",
                flush=True,
            )


if __name__ == "__main__":
    main()
