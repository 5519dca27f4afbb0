"""Default XLA flags that make this project's steps faster, applied before JAX starts a backend.

On jaxlib 0.10 the CPU convolutions are kept away from YNNPACK, whose weight-gradient
convolutions are slow at this project's shapes (measurements: experiments/BENCHMARKS.md). The
flag only affects the CPU backend.

An unknown flag aborts XLA, so flags are only added for jaxlib versions where they were
checked. ``PRELAR_XLA_DEFAULTS=0`` turns this off; flags already in ``XLA_FLAGS`` win.
"""

from __future__ import annotations

import importlib.metadata
import os

# jaxlib version prefix -> (flag name, value) pairs checked on that version.
_CHECKED_FLAGS = {
    "0.10.": [("xla_cpu_experimental_ynn_fusion_type", "-individual_convolution")],
}


def default_flags(jaxlib_version: str) -> list[str]:
    for prefix, flags in _CHECKED_FLAGS.items():
        if jaxlib_version.startswith(prefix):
            return [f"--{name}={value}" for name, value in flags]
    return []


def apply_default_xla_flags() -> list[str]:
    """Appends the checked flags to ``XLA_FLAGS`` unless set already; returns what was added.

    Has no effect on a backend JAX has already started (flags are read when it starts).
    """
    if os.environ.get("PRELAR_XLA_DEFAULTS", "1") == "0":
        return []
    try:
        version = importlib.metadata.version("jaxlib")
    except importlib.metadata.PackageNotFoundError:
        return []
    current = os.environ.get("XLA_FLAGS", "")
    added = [flag for flag in default_flags(version) if flag.split("=")[0] not in current]
    if added:
        os.environ["XLA_FLAGS"] = " ".join([current, *added]).strip()
    return added
