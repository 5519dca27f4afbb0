"""DreamerV2 from scratch on a Meta-World task: the fine-tuning code with no pre-trained modules
(spec 9.2): raw 4-d actions into the RSSM, the plain-CNN encoder and decoder, no intrinsic bonus,
no auxiliary reward head, one optimiser group over the whole world model.

    python experiments/finetune.py --config=configs/dreamerv2.py:paper --config.task=drawer-open \
        --workdir=runs/dreamerv2-drawer-open
"""

import ml_collections

from prelar_jax.runtime.config import config_module

PRESETS = ("paper", "small", "cpu", "tiny")


def get_config(preset: str = "paper") -> ml_collections.ConfigDict:
    finetune = config_module("prelar_finetune.py", relative_to=__file__)
    c = finetune.base_config()
    c.method = "dreamerv2"
    c.model.encoder = "plain"
    c = finetune.apply_preset(c, preset or "paper")
    c.pretrained = ""
    c.action_encoder.kind = "none"
    c.intrinsic.beta = 0.0
    c.loss.aux_reward_scale = 0.0
    c.optimizer.pretrained_group = ""
    return c
