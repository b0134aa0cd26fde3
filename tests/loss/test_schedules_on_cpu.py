"""loss.schedules: the critic coefficient over steps and the fade of guidance reach their ends."""

import math

import pytest

from recipe.optimal_sampling.loss import critic_coef, faded_guided_per_prompt, guidance_scale


def test_critic_schedules_start_at_the_coefficient_and_reach_zero_at_the_end_step():
    assert [critic_coef(s, 0.5) for s in (1, 50, 500)] == [0.5, 0.5, 0.5]
    assert critic_coef(0, 0.5, "linear", 100) == 0.5 and critic_coef(0, 0.5, "cosine", 100) == pytest.approx(0.5)
    assert critic_coef(25, 0.4, "linear", 100) == pytest.approx(0.3)
    assert critic_coef(50, 0.4, "cosine", 100) == pytest.approx(0.2)
    for schedule in ("linear", "cosine"):
        assert critic_coef(100, 0.4, schedule, 100) == 0.0 and critic_coef(150, 0.4, schedule, 100) == 0.0
        values = [critic_coef(s, 0.4, schedule, 100) for s in range(0, 101, 10)]
        assert all(a >= b for a, b in zip(values, values[1:], strict=False))  # never rises


def test_guidance_fades_with_the_policys_reward_and_with_steps():
    assert guidance_scale(None, 10) == 1.0  # no fade set
    assert guidance_scale(None, 10, reward_threshold=0.5) == 1.0  # not measured yet: full guidance
    assert guidance_scale(0.0, 10, reward_threshold=0.5) == 1.0
    assert guidance_scale(0.25, 10, reward_threshold=0.5) == pytest.approx(0.5)
    assert guidance_scale(0.5, 10, reward_threshold=0.5) == 0.0 and guidance_scale(0.9, 10, 0.5) == 0.0
    assert guidance_scale(None, 30, end_step=40) == pytest.approx(0.25)
    assert guidance_scale(0.1, 30, reward_threshold=0.5, end_step=40) == pytest.approx(0.25)  # the smaller fade
    assert guidance_scale(None, 40, end_step=40) == 0.0 and guidance_scale(None, 99, end_step=40) == 0.0


def test_guided_members_fade_from_k_to_zero_and_stay_until_the_fade_is_complete():
    assert [faded_guided_per_prompt(4, s) for s in (1.0, 0.76, 0.5, 0.26, 0.01, 0.0)] == [4, 4, 2, 2, 1, 0]
    assert faded_guided_per_prompt(1, 1e-3) == 1 and faded_guided_per_prompt(1, 0.0) == 0
    # reward rising step by step past the threshold takes k = 8 to 0 monotonically
    ks = [faded_guided_per_prompt(8, guidance_scale(r / 10, 1, reward_threshold=0.6)) for r in range(11)]
    assert ks[0] == 8 and ks[-1] == 0 and all(a >= b for a, b in zip(ks, ks[1:], strict=False))
    assert ks.index(0) == 6 and not math.isnan(sum(ks))
