"""Pre-train a PreLAR (or APV) world model on action-free videos.

    python experiments/pretrain.py --config=configs/prelar_pretrain.py:tiny \
        --config.data.root=runs/videos --workdir=runs/prelar_tiny

Re-running the same command resumes from the latest checkpoint in --workdir.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

if __name__ == "__main__":
    from prelar_jax.runtime import cli  # first: sets the environment JAX and MuJoCo read when they load
    from prelar_jax.runtime import pretrain_loop

    cli.training_cli("configs/prelar_pretrain.py:paper", pretrain_loop.run)
