"""prelar-jax: JAX/Flax reimplementation of PreLAR world-model pre-training."""

__version__ = "0.1.0"
