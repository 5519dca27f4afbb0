"""The pre-training action sources and the fine-tuning dynamics are chosen once from a lookup;
every configurable kind has one, and their distances and parameter maps are what the losses and
the checkpoint loading rely on."""

import numpy as np
import pytest

from prelar_jax.learners.action_sources import ACTION_SOURCES, ImplicitCodes, RandomCodes, ZeroActions
from prelar_jax.learners.finetune import PRETRAINED_MODULES
from prelar_jax.model.dynamics import DYNAMICS
from prelar_jax.model.nets.implicit_action import CODE_TYPES
from prelar_jax.runtime import config as config_lib


def test_every_code_type_has_a_source():
    assert sorted(ACTION_SOURCES) == sorted(CODE_TYPES)
    assert ACTION_SOURCES["none"] is ZeroActions and ACTION_SOURCES["random"] is RandomCodes
    assert all(ACTION_SOURCES[kind] is ImplicitCodes for kind in ("stoch", "deter", "mix"))


def test_mixed_code_distance_is_gaussian_kl_plus_squared_distance():
    config = config_lib.load_config("configs/prelar_pretrain.py:tiny")
    config.implicit_action.code_type = "mix"
    source = ImplicitCodes(config, None, np.float32)
    rng = np.random.default_rng(0)
    a = {"mean": rng.normal(size=(2, 3, 4)), "std": rng.uniform(0.5, 2, (2, 3, 4)), "deter": rng.normal(size=(2, 3, 5))}
    b = {"mean": rng.normal(size=(2, 3, 4)), "std": rng.uniform(0.5, 2, (2, 3, 4)), "deter": rng.normal(size=(2, 3, 5))}
    kl = np.sum(
        np.log(b["std"] / a["std"]) + (a["std"] ** 2 + (a["mean"] - b["mean"]) ** 2) / (2 * b["std"] ** 2) - 0.5, -1
    )
    expected = kl + np.sum((a["deter"] - b["deter"]) ** 2, -1)
    np.testing.assert_allclose(np.asarray(source.code_distance(a, b)), expected, rtol=1e-5)
    config.implicit_action.code_type = "deter"
    deter_only = ImplicitCodes(config, None, np.float32).code_distance(a, b)
    np.testing.assert_allclose(np.asarray(deter_only), np.sum((a["deter"] - b["deter"]) ** 2, -1), rtol=1e-5)


@pytest.mark.parametrize("stacked, rssm_target, extra", [(False, "rssm", ()), (True, "af_rssm", ("af_rssm",))])
def test_dynamics_lookup(stacked, rssm_target, extra):
    dynamics = DYNAMICS[stacked]
    assert dynamics.pretrained_map(PRETRAINED_MODULES)["rssm"] == rssm_target
    assert dynamics.pretrained_map(PRETRAINED_MODULES)["encoder"] == "encoder"
    assert dynamics.extra_modules == extra
