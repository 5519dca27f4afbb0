"""A learner's loss as named terms and their scales, summed in one checked place."""

from __future__ import annotations

import jax


def weighted_sum(losses: dict[str, jax.Array], scales: dict[str, float | jax.Array]) -> jax.Array:
    """``sum(scales[name] * losses[name])``, in the order of ``losses``. Every term needs a scale
    and every scale a term: a loss added without its scale (or a scale whose term was never
    computed) is a bug, so it raises instead of silently weighting by 1 or 0."""
    if set(losses) != set(scales):
        raise ValueError(
            f"loss terms {sorted(losses)} and scales {sorted(scales)} differ: {sorted(set(losses) ^ set(scales))}"
        )
    if not losses:
        raise ValueError("no loss terms")
    names = iter(losses)
    first = next(names)
    total = scales[first] * losses[first]
    for name in names:
        total = total + scales[name] * losses[name]
    return total
