"""The command line shared by ``experiments/pretrain.py`` and ``experiments/finetune.py``:
``--config=FILE:PRESET`` with ``--config.a.b=value`` overrides, ``--workdir`` and
``--allow_config_override``; bad input ends in one ``error:`` line (exit status 2).

Import this first, and only from a script's ``if __name__ == "__main__":`` block: importing it
sets the environment that JAX and MuJoCo read when they load (so import the loop after it), and
the flags are defined when ``training_cli`` runs, so spawned environment workers, which re-import
the main script, define nothing.
"""

from __future__ import annotations

import os
import sys
from typing import Callable

from prelar_jax.runtime import xla_setup

# tcmalloc when installed (re-executes the script once; PRELAR_MALLOC=system keeps glibc's malloc).
xla_setup.use_fast_allocator()
# Re-runs (resumes) reuse compiled steps; set JAX_COMPILATION_CACHE_DIR="" to turn this off.
os.environ.setdefault("MUJOCO_GL", "egl")
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(os.path.expanduser("~"), ".cache", "prelar_jax", "xla"))


def training_cli(default_config: str, run: Callable[..., object]) -> None:
    """Parses the flags and calls ``run(config, workdir, allow_config_override=...)`` (a loop's
    ``run``: ``pretrain_loop.run`` or ``finetune_loop.run``)."""
    from absl import app, flags
    from ml_collections import config_flags

    from prelar_jax import errors

    def check_overrides():
        from prelar_jax.runtime import config as config_lib

        config_lib.check_override_flags(sys.argv, default_config)

    errors.exit_on_user_error(check_overrides)
    config = config_flags.DEFINE_config_file(
        "config", default_config, f"Config file and preset, e.g. {default_config.rsplit(':', 1)[0]}:tiny"
    )
    workdir = flags.DEFINE_string("workdir", None, "Run directory (created; re-use it to resume).", required=True)
    override = flags.DEFINE_bool(
        "allow_config_override", False, "Resume a workdir even though its saved config differs in keys that matter."
    )

    def main(argv):
        if len(argv) > 1:
            raise app.UsageError(f"unexpected arguments: {argv[1:]}")
        errors.exit_on_user_error(lambda: run(config.value, workdir.value, allow_config_override=override.value))

    app.run(main)
