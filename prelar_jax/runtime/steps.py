"""The compiled, data-parallel training steps of both stages, built from the learners' pure
functions: ``make_pretrain_step`` (one update of a pre-training loss) and ``make_finetune_step``
(one fine-tuning update: world model, then actor-critic). Both fold ``seed`` with the update count
into the step's key, give each row its global batch index (so results do not depend on the device
count) and skip an update whose loss or gradient is not finite (``learners.optim``).
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import optax
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from prelar_jax.learners import optim
from prelar_jax.learners.finetune import FinetuneAgent
from prelar_jax.runtime import parallel
from prelar_jax.runtime.parallel import AXIS

LossFn = Callable[..., tuple[jax.Array, tuple[Any, dict[str, jax.Array]]]]


def make_pretrain_step(loss_fn: LossFn, optimizer: optax.GradientTransformation, mesh: Mesh, seed: int) -> Callable:
    """``step(state, batch) -> (state, metrics)``: one jitted, donated, data-parallel update.

    An update whose loss or gradient is not finite is skipped (parameters, statistics and
    optimiser state stay as they were, the step counter advances past the batch) and reported as
    ``metrics['nonfinite'] == 1``.

    ``loss_fn(params, batch_stats, batch, key, example_index) -> (loss, (new_batch_stats,
    metrics))`` sees the local shard. The state must have ``step``, ``params``, ``batch_stats``
    and ``opt_state`` fields (a ``flax.struct`` dataclass).
    """
    base_key = jax.random.key(seed)

    def per_device(state, batch):
        example_index = parallel.local_example_index(batch["image"].shape[0])
        key = jax.random.fold_in(base_key, state.step)
        grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
        # The loss also sees the update count (schedules such as the implicit-KL warm-up).
        (loss, (batch_stats, metrics)), grads = grad_fn(
            state.params, state.batch_stats, {**batch, "step": state.step}, key, example_index
        )
        grads = jax.lax.pmean(grads, AXIS)
        metrics = jax.lax.pmean(metrics, AXIS)
        params, opt_state = optim.apply_update(optimizer, grads, state.opt_state, state.params)
        # Modules without BatchNorm keep their (empty) statistics.
        batch_stats = {**state.batch_stats, **batch_stats}
        # The same decision on every device: gradients are averaged, the loss is averaged here.
        (params, batch_stats, opt_state), nonfinite = optim.keep_if_finite(
            (jax.lax.pmean(loss, AXIS), grads),
            (params, batch_stats, opt_state),
            (state.params, state.batch_stats, state.opt_state),
        )
        metrics = dict(metrics, grad_norm=optax.tree.norm(grads), nonfinite=nonfinite)
        new_state = state.replace(step=state.step + 1, params=params, batch_stats=batch_stats, opt_state=opt_state)
        return new_state, metrics

    return parallel.data_parallel(per_device, mesh)


UPDATE_PARTS = ("all", "world_model", "actor_critic")


def make_finetune_step(agent: FinetuneAgent, mesh, seed: int, part: str = "all"):
    """One jitted, donated, data-parallel update (or one half of it, for measuring each half).

    * ``part='all'``: ``step(state, batch) -> (state, metrics)``, ``FinetuneAgent.update``.
    * ``part='world_model'``: ``step(state, batch) -> (state, metrics, post)``,
      ``update_world_model``; ``post`` (``[B, T, ...]``) is sharded like the batch.
    * ``part='actor_critic'``: ``step(state, post) -> (state, metrics)``, ``update_actor_critic``.

    All three fold the same per-update key (``seed`` folded with ``state.step``), so the
    world-model step followed by the actor-critic step from its ``post`` computes what one
    ``'all'`` step computes (up to XLA fusing the two programs differently).
    """
    if part not in UPDATE_PARTS:
        raise ValueError(f"part={part!r}: expected one of {UPDATE_PARTS}")
    base_key = jax.random.key(seed)
    # The update function, how many local rows its data has, and what it returns.
    update, rows, out_specs = {
        "all": (agent.update, lambda batch: batch["image"].shape[0], (P(), P())),
        "world_model": (agent.update_world_model, lambda batch: batch["image"].shape[0], (P(), P(), P(AXIS))),
        "actor_critic": (agent.update_actor_critic, lambda post: post["deter"].shape[0], (P(), P())),
    }[part]

    def per_device(state, data):
        return update(
            state,
            data,
            jax.random.fold_in(base_key, state.step),
            parallel.local_example_index(rows(data)),
            axis_name=AXIS,
        )

    return parallel.data_parallel(per_device, mesh, out_specs)
