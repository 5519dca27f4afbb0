"""learners/losses.weighted_sum: the one place a learner's loss terms meet their scales."""

import jax.numpy as jnp
import pytest

from prelar_jax.learners.losses import weighted_sum


def test_weighted_sum_hand_case_and_order():
    losses = {"kl": jnp.float32(2.0), "image": jnp.float32(10.0), "reward": jnp.float32(-1.0)}
    scales = {"reward": 3.0, "kl": 0.5, "image": 1.0}  # matched by name, not by position
    assert float(weighted_sum(losses, scales)) == pytest.approx(0.5 * 2.0 + 1.0 * 10.0 + 3.0 * -1.0)
    # Summed left to right in the order of the losses (not of the scales): in float32
    # (1e8 + -1e8) + 1 = 1, while (1 + 1e8) + -1e8 = 0.
    big, one = jnp.float32(1e8), jnp.float32(1.0)
    total = weighted_sum({"a": big, "b": -big, "c": one}, {"c": 1.0, "a": 1.0, "b": 1.0})
    assert float(total) == 1.0


def test_weighted_sum_refuses_a_term_without_a_scale_and_a_scale_without_a_term():
    with pytest.raises(ValueError, match="consistency"):
        weighted_sum({"kl": 1.0, "consistency": 2.0}, {"kl": 1.0})
    with pytest.raises(ValueError, match="image"):
        weighted_sum({"kl": 1.0}, {"kl": 1.0, "image": 1.0})
    with pytest.raises(ValueError, match="no loss terms"):
        weighted_sum({}, {})
