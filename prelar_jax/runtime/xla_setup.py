"""Process settings that make this project's steps faster, applied before JAX starts a backend:
default XLA flags, and (for the entry scripts) a faster memory allocator.

On jaxlib 0.10 the CPU convolutions are kept away from YNNPACK, whose weight-gradient
convolutions are slow at this project's shapes (measurements: experiments/BENCHMARKS.md). The
flag only affects the CPU backend.

An unknown flag aborts XLA, so flags are only added for jaxlib versions where they were
checked. ``PRELAR_XLA_DEFAULTS=0`` turns this off; flags already in ``XLA_FLAGS`` win.
"""

from __future__ import annotations

import importlib.metadata
import os
import sys
from typing import Callable, Mapping

from prelar_jax import errors
from prelar_jax.errors import UserError

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


# A faster memory allocator for the whole process (tcmalloc, preloaded). With glibc's malloc, XLA's
# large per-step buffers go back to the operating system when freed and are faulted in (and zeroed)
# again on the next step; tcmalloc keeps them. Measured on the 2-core CPU (experiments/BENCHMARKS.md,
# "Memory allocator"): paper pre-training step 7.07 -> 5.88 s, `cpu` preset step 1.3x.
TCMALLOC_PATHS = (
    "/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4",
    "/usr/lib/aarch64-linux-gnu/libtcmalloc_minimal.so.4",
    "/usr/lib64/libtcmalloc_minimal.so.4",
    "/usr/lib/libtcmalloc_minimal.so.4",
)
MALLOC_CHOICES = ("auto", "tcmalloc", "system")


class AllocatorError(UserError, ValueError):
    """``PRELAR_MALLOC`` names an unknown choice, or tcmalloc where it is not installed."""


def allocator_environment(environ: Mapping[str, str], exists: Callable[[str], bool] = os.path.exists) -> dict | None:
    """The environment that preloads tcmalloc, or None when nothing is to change: ``PRELAR_MALLOC``
    is ``system``, tcmalloc is preloaded already, or (``auto``) it is not installed."""
    choice = environ.get("PRELAR_MALLOC", "auto")
    if choice not in MALLOC_CHOICES:
        raise AllocatorError(f"PRELAR_MALLOC={choice!r}; choose one of {MALLOC_CHOICES}")
    preload = environ.get("LD_PRELOAD", "")
    if choice == "system" or "tcmalloc" in preload:
        return None
    library = next((path for path in TCMALLOC_PATHS if exists(path)), None)
    if library is None:
        if choice == "tcmalloc":
            raise AllocatorError(
                "PRELAR_MALLOC=tcmalloc but libtcmalloc_minimal.so.4 is not installed "
                "(Debian: apt-get install libtcmalloc-minimal4), or set PRELAR_MALLOC=auto"
            )
        return None
    return {"LD_PRELOAD": f"{library} {preload}".strip()}


def use_fast_allocator() -> None:
    """Re-executes this Python program with tcmalloc preloaded when :func:`allocator_environment`
    says so (same interpreter, same arguments, ``-m`` included). Call it first thing in a script's
    main block, before JAX starts; it returns normally when nothing is to change."""
    if not sys.platform.startswith("linux"):
        return
    change = errors.exit_on_user_error(lambda: allocator_environment(os.environ))
    if change is None:
        return
    os.environ.update(change)
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(sys.executable, [sys.executable, *sys.orig_argv[1:]])
