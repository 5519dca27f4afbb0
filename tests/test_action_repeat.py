"""``env.action_repeat``: one ``MetaWorldTask.step`` applies its action for k control steps.

Checked against the same environment stepped k times by hand (same seed): the frame and state are
those after the k-th control step, the reward is the sum, success is that of any of the k steps,
and an episode still ends after ``time_limit`` control steps (its last action repeats fewer times
where k does not divide it). The fine-tuning loop's counts are checked in test_finetune.
"""

from __future__ import annotations

import numpy as np
import pytest

from prelar_jax.envs.metaworld import MetaWorldTask


def test_one_step_is_k_control_steps_of_the_same_action():
    actions = np.random.default_rng(0).uniform(-1, 1, (3, 4)).astype(np.float32)
    with (
        MetaWorldTask("reach", seed=3, size=16, time_limit=7, action_repeat=3) as env,
        MetaWorldTask("reach", seed=3, size=16, time_limit=7) as reference,
    ):
        first, expected_first = env.reset(), reference.reset()
        np.testing.assert_array_equal(first["image"], expected_first["image"])
        for i, action in enumerate(actions):
            obs = env.step(action)
            rewards = []
            for _ in range(3 if i < 2 else 1):  # 3 + 3 + 1 = time_limit 7
                expected = reference.step(action)
                rewards.append(expected["reward"])
            np.testing.assert_array_equal(obs["image"], expected["image"])
            np.testing.assert_array_equal(obs["state"], expected["state"])
            assert obs["reward"] == pytest.approx(sum(rewards), rel=1e-12)
            assert len(rewards) == 1 or obs["reward"] != pytest.approx(rewards[-1])  # not the last step's
            assert obs["is_last"] == (i == 2) == expected["is_last"]
            assert env.steps == reference.steps
        assert env.steps == 7
        with pytest.raises(RuntimeError, match="reset"):
            env.step(actions[0])


def test_success_in_any_of_the_repeated_steps_counts():
    with MetaWorldTask("reach", seed=0, size=16, time_limit=6, action_repeat=3) as env:
        env.reset()
        raw_step, calls = env.env.step, []

        def step(action):  # success on the second control step only
            state, reward, terminated, truncated, info = raw_step(action)
            calls.append(1)
            return state, reward, terminated, truncated, {**info, "success": float(len(calls) == 2)}

        env.env.step = step
        assert env.step(np.zeros(4, np.float32))["success"] and len(calls) == 3
        assert not env.step(np.zeros(4, np.float32))["success"] and len(calls) == 6


@pytest.mark.parametrize("repeat", [0, -1, 1.5, True])
def test_bad_action_repeat_is_refused(repeat):
    with pytest.raises(ValueError, match="action_repeat must be a positive integer"):
        MetaWorldTask("reach", seed=0, size=16, action_repeat=repeat)


def test_random_policy_baseline_holds_each_action_for_k_steps():
    """experiments/random_policy.py at --action_repeat 3 gives what fine-tuning's environment gives
    for the same random actions: each drawn once and applied for 3 control steps."""
    import importlib.util
    import os

    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "experiments", "random_policy.py")
    spec = importlib.util.spec_from_file_location("random_policy", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    result = module.random_policy_baseline("reach", episodes=2, time_limits=[6], seed=4, action_repeat=3)

    rng, returns = np.random.default_rng(4), []
    with MetaWorldTask("reach", seed=4, size=8, time_limit=6, action_repeat=3) as env:
        for _ in range(2):
            env.reset()
            returns.append(sum(env.step(rng.uniform(-1, 1, 4).astype(np.float32))["reward"] for _ in range(2)))
    assert result["6"]["return"] == pytest.approx(np.mean(returns), rel=1e-9)
    plain = module.random_policy_baseline("reach", episodes=2, time_limits=[6], seed=4)
    assert plain["6"]["return"] != pytest.approx(result["6"]["return"])  # other actions after the first
