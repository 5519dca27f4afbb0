"""APV pre-training: action-free video prediction (spec 9.1), the pre-training code with no
implicit actions (the RSSM is fed 50 zeros, APV's ``fill_action 50``) and no consistency loss.

    python experiments/pretrain.py --config=configs/apv_pretrain.py:paper \
        --config.data.root=data/videos --workdir=runs/apv_paper

Presets: ``paper``, ``small``, ``tiny`` are the APV of the PreLAR repository (ResNet encoder and
decoder with BatchNorm, KL scale 1.0), the baseline the PreLAR paper compares with;
``original`` and ``original_tiny`` are the original TF APV (plain DreamerV2 CNN, KL scale 0.1).
The sizes of ``paper``/``original`` are the paper's; the ``tiny`` ones are CPU smoke runs.
"""

import ml_collections

from prelar_jax.runtime.config import config_module

PRESETS = ("paper", "small", "cpu", "tiny", "original", "original_tiny")


def resolve_preset(preset: str, stage: str) -> tuple[str, bool, str]:
    """``(preset, original, sizes)`` for an APV preset name (shared with ``apv_finetune.py``):
    ``original`` for the original TF APV's presets, ``sizes`` the PreLAR preset whose sizes it uses."""
    preset = preset or "paper"
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r} for APV {stage}; choose one of {PRESETS}")
    return preset, preset.startswith("original"), {"original": "paper", "original_tiny": "tiny"}.get(preset, preset)


def get_config(preset: str = "paper") -> ml_collections.ConfigDict:
    preset, original, sizes = resolve_preset(preset, "pre-training")
    prelar = config_module("prelar_pretrain.py", relative_to=__file__)
    c = prelar.apply_preset(prelar.base_config(), sizes)
    c.method = "apv"
    c.preset = preset
    c.implicit_action.code_type = "none"
    c.implicit_action.action_dim = 50
    c.loss.consistency = "off"
    if original:
        c.model.encoder = "plain"
        c.loss.kl_scale = 0.1
    return c
