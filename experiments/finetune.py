"""Fine-tune a pre-trained world model (PreLAR, APV) or train DreamerV2 from scratch on a
Meta-World task.

    python experiments/finetune.py --config=configs/prelar_finetune.py:tiny \
        --config.task=drawer-open --config.pretrained=runs/prelar_tiny --workdir=runs/ft_tiny
    python experiments/finetune.py --config=configs/dreamerv2.py:tiny --workdir=runs/dv2_tiny

Re-running the same command resumes from the latest checkpoint in --workdir.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

if __name__ == "__main__":
    from prelar_jax.runtime import cli  # first: sets the environment JAX and MuJoCo read when they load
    from prelar_jax.runtime import finetune_loop

    cli.training_cli("configs/prelar_finetune.py:paper", finetune_loop.run)
