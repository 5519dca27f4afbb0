"""prelar-jax: JAX/Flax reimplementation of PreLAR world-model pre-training."""

from prelar_jax.runtime.xla_setup import apply_default_xla_flags as _apply_default_xla_flags

__version__ = "0.1.0"

# Before any JAX backend starts: faster CPU convolutions (see prelar_jax/runtime/xla_setup.py).
_apply_default_xla_flags()
