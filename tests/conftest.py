"""Test-session set-up: 4 fake CPU devices, headless rendering, no network logging.

The environment variables must be set before JAX or MuJoCo is imported anywhere, which is why
they live here. Single-device tests build a mesh of one device explicitly.
"""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
_flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in _flags:
    os.environ["XLA_FLAGS"] = (_flags + " --xla_force_host_platform_device_count=4").strip()
os.environ.setdefault("MUJOCO_GL", "egl")
os.environ.setdefault("PYOPENGL_PLATFORM", os.environ["MUJOCO_GL"])
os.environ["WANDB_MODE"] = "disabled"
# Runs in different tests often compile the very same step; XLA's persistent cache (keyed on the
# computation, the flags and the jax version) compiles each one once per machine.
import tempfile  # noqa: E402

os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(tempfile.gettempdir(), "prelar_jax_xla_cache"))
# Cache every compilation, not only those over JAX's default 1 s: the tests compile many small
# functions, and reading them back costs less than compiling them again (experiments/BENCHMARKS.md).
# The CLI subprocesses inherit the setting.
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
