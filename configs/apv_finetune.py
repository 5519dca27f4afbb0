"""APV fine-tuning on a Meta-World task (spec 9.1): the pre-trained action-free RSSM (fed zeros)
reads the encoder embedding; a new action-conditional RSSM reads its features with the real
action zero-padded to 50; the decoder (pre-trained) and the heads read the new RSSM; the intrinsic
bonus reads the action-free features; the encoder and the action-free RSSM are the optimiser
group at learning rate 0 for the first ``pretrain`` updates.

    python experiments/finetune.py --config=configs/apv_finetune.py:paper --config.task=drawer-open \
        --config.pretrained=runs/apv_paper --workdir=runs/apv_drawer-open

Presets match ``configs/apv_pretrain.py``: ``paper``/``small``/``tiny`` (the PreLAR repository's
APV: ResNet, auxiliary reward head) and ``original``/``original_tiny`` (the original TF APV: plain
CNN, no auxiliary head).
"""

import ml_collections

from prelar_jax.runtime.config import config_module

_APV_PRETRAIN = config_module("apv_pretrain.py", relative_to=__file__)
PRESETS = _APV_PRETRAIN.PRESETS


def get_config(preset: str = "paper") -> ml_collections.ConfigDict:
    preset, original, sizes = _APV_PRETRAIN.resolve_preset(preset, "fine-tuning")
    finetune = config_module("prelar_finetune.py", relative_to=__file__)
    c = finetune.base_config()
    if original:
        c.model.encoder = "plain"
    c = finetune.apply_preset(c, sizes)
    c.method = "apv"
    c.preset = preset
    c.stacked = True
    c.action_encoder.kind = "pad"
    c.action_encoder.code_size = 50
    c.optimizer.pretrained_group = "encoder,af_rssm"
    if original:
        c.loss.aux_reward_scale = 0.0
    return c
