"""Synthetic action-conditioned videos with known dynamics (``prelar_jax.data.synthetic``): a square
moved by random actions on a fixed background, written as DreamerV2 episodes with their actions and
the square's position (``<out>/square/*.npz``).

    python experiments/generate_square_videos.py --out data/squares --episodes 80 --length 48
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from prelar_jax.data import synthetic  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True)
    p.add_argument("--episodes", type=int, default=80)
    p.add_argument("--length", type=int, default=48, help="steps per episode (frames = length + 1)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--square", type=int, default=12, help="side of the square in pixels")
    p.add_argument("--speed", type=float, default=3.0, help="pixels per step at action 1")
    p.add_argument(
        "--smoothness",
        type=float,
        default=0.0,
        help="0: independent actions each step; towards 1: a smooth random walk",
    )
    args = p.parse_args()
    synthetic.write_moving_square_videos(
        args.out,
        args.episodes,
        args.length,
        args.seed,
        square=args.square,
        speed=args.speed,
        smoothness=args.smoothness,
    )
    print(f"wrote {args.episodes} episodes of {args.length + 1} frames to {os.path.join(args.out, 'square')}")


if __name__ == "__main__":
    main()
