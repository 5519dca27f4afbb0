"""Optimisers and the guarded update that every learner applies.

``adam`` is the original torch Adam (one per parameter group). ``apply_update`` applies an
optimiser's update; ``keep_if_finite`` then keeps the old values where the loss or gradient was not
finite, so that one bad batch skips an update instead of writing NaN into parameters or optimiser
moments. Pre-training (``steps.make_pretrain_step``), fine-tuning (``agent``) and the transfer
diagnostic all update through these two functions.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax

from prelar_jax.types import Params


def adam(
    optimizer_config: ml_collections.ConfigDict, learning_rate: optax.ScalarOrSchedule | None = None
) -> optax.GradientTransformation:
    """The original torch Adam: clip first, then coupled L2 (``wd * p`` added to the gradient).

    ``optimizer_config`` has ``lr``, ``eps``, ``clip`` and ``weight_decay``; ``learning_rate``
    (a number or a schedule) replaces ``lr`` when given. Every optimiser of every method is one
    of these, one per parameter group (each group clipped by its own global norm).
    """
    opt = optimizer_config
    return optax.chain(
        optax.clip_by_global_norm(opt.clip),
        optax.add_decayed_weights(opt.weight_decay),
        optax.scale_by_adam(b1=0.9, b2=0.999, eps=opt.eps),
        optax.scale_by_learning_rate(opt.lr if learning_rate is None else learning_rate),
    )


def apply_update(
    optimizer: optax.GradientTransformation, grads: Params, opt_state: optax.OptState, params: Params
) -> tuple[Params, optax.OptState]:
    """``(new_params, new_opt_state)`` after one step of ``optimizer`` on ``grads``."""
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state


def all_finite(*trees: Any) -> jax.Array:
    """True when every floating-point leaf of every tree is finite (a scalar bool)."""
    leaves = [x for tree in trees for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.inexact)]
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves])) if leaves else jnp.bool_(True)


def select_finite(finite: jax.Array, new: Any, old: Any) -> Any:
    """``new`` where the update was finite, else ``old``, leaf by leaf."""
    return jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)


def keep_if_finite(checked: tuple, new: Any, old: Any) -> tuple[Any, jax.Array]:
    """``(new if every leaf of checked is finite else old, nonfinite)``: ``checked`` holds the
    losses and gradients of the update (averaged over devices first, so that every device makes
    the same choice); ``nonfinite`` is a float32 scalar, 1 for a skipped update (the
    ``metrics['nonfinite']`` that the loops count)."""
    finite = all_finite(*checked)
    return select_finite(finite, new, old), 1.0 - finite.astype(jnp.float32)
