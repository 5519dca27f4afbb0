"""Fine-tune a pre-trained world model (PreLAR) or train DreamerV2 from scratch on a Meta-World task.

    python experiments/finetune.py --config=configs/prelar_finetune.py:tiny \
        --config.task=drawer-open --config.pretrained=runs/prelar_tiny --workdir=runs/ft_tiny
    python experiments/finetune.py --config=configs/dreamerv2.py:tiny --workdir=runs/dv2_tiny

Re-running the same command resumes from the latest checkpoint in --workdir.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("MUJOCO_GL", "egl")
# Re-runs (resumes) reuse compiled steps; set JAX_COMPILATION_CACHE_DIR="" to turn this off.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR",
                      os.path.join(os.path.expanduser("~"), ".cache", "prelar_jax", "xla"))

from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

DEFAULT_CONFIG = "configs/prelar_finetune.py:paper"
_CONFIG = config_flags.DEFINE_config_file(
    "config", DEFAULT_CONFIG, "Config file and preset, e.g. configs/prelar_finetune.py:tiny")
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory (created; re-use it to resume).", required=True)
_OVERRIDE = flags.DEFINE_bool("allow_config_override", False,
                              "Resume a workdir even though its saved config differs in keys that matter.")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    from prelar_jax import errors, finetune_loop

    errors.exit_on_user_error(lambda: finetune_loop.run(
        _CONFIG.value, _WORKDIR.value, allow_config_override=_OVERRIDE.value))


if __name__ == "__main__":
    from prelar_jax import config as config_lib, errors

    errors.exit_on_user_error(lambda: config_lib.check_override_flags(sys.argv, DEFAULT_CONFIG))
    app.run(main)
