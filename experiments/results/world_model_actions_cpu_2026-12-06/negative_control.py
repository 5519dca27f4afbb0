"""Negative control of the action test: PreLAR seed 0's fine-tuned world model with its action
encoder's last layer zeroed (every action encodes to the same code, so the model cannot follow
its actions) must give action_effect 1.000, where the intact model gives ~1.04.

    .venv/bin/python experiments/results/world_model_actions_cpu_2026-12-06/negative_control.py RUN_WORKDIR
"""

import sys

import jax
import numpy as np

from prelar_jax.analysis import transfer
from prelar_jax.learners import finetune as agent_lib
from prelar_jax.runtime import pretrained as pretrained_lib

workdir = sys.argv[1]
config, params, stats, _ = pretrained_lib.restore_finetune_state(workdir)
episodes = transfer.collect_random_episodes(
    config.task,
    6,
    config.env.time_limit,
    seed=424242,
    size=config.image_size,
    camera=config.env.camera,
    render=config.env.render.to_dict(),
)
agent = agent_lib.FinetuneAgent(config)
length, context = config.sequence_length, config.log.media_context
windows = transfer.evaluation_windows(episodes, length)
fn = transfer.make_prediction_error_fn(agent, context)
key = jax.random.key(424242)


def effect(p):
    own = transfer._prediction_error(fn, p, stats, episodes, windows, length, config.batch_size, key)
    other = transfer._prediction_error(
        fn,
        p,
        stats,
        transfer.with_other_actions(episodes, windows, length, context),
        windows,
        length,
        config.batch_size,
        key,
    )
    return float(other[:, context:].mean() / own[:, context:].mean())


print("intact model: action_effect", round(effect(params), 4))
encoder = params["action_encoder"]
last = sorted(encoder)[-1]
blind = {
    **params,
    "action_encoder": {
        **encoder,
        last: {k: np.zeros_like(v) if k == "kernel" else v for k, v in encoder[last].items()},
    },
}
print(f"action encoder's {last} kernel zeroed: action_effect", round(effect(blind), 4))
