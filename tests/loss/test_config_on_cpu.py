"""GuidedLossConfig: every key's bad values are refused with a one-line ValueError naming the key."""

import pytest

from recipe.optimal_sampling.loss import GuidedLossConfig


def test_defaults_are_plain_grpo_with_every_switch_off():
    c = GuidedLossConfig.from_mapping(None)
    assert (c.mode, c.baseline, c.critic_on, c.fades) == ("grpo", "group", False, False)


@pytest.mark.parametrize(
    "block, key",
    [
        ({"mode": "imitate"}, "mode"),
        ({"baseline": "teacher"}, "baseline"),
        ({"imitation_value": 1.0}, "imitation_value"),  # without mode=imitation
        ({"mode": "imitation", "imitation_value": -1.0}, "imitation_value"),
        ({"critic_coef": -0.1}, "critic_coef"),
        ({"critic_coef": float("nan")}, "critic_coef"),
        ({"critic_coef": True}, "critic_coef"),
        ({"critic_schedule": "step"}, "critic_schedule"),
        ({"critic_coef": 0.1, "critic_schedule": "linear"}, "critic_end_step"),  # decays to 0 by a null step
        ({"critic_end_step": 0}, "critic_end_step"),
        ({"critic_rows": "teacher"}, "critic_rows"),
        ({"critic_clip": 0.0}, "critic_clip"),
        ({"fade_reward_threshold": 1.5}, "fade_reward_threshold"),  # a 0/1 reward never gets there
        ({"fade_reward_threshold": 0.0}, "fade_reward_threshold"),
        ({"fade_end_step": 2.5}, "fade_end_step"),
        ({"critic_coef": 0.1, "fade_critic": True}, "fade_critic"),  # no fade set
        ({"fade_critic": True, "fade_end_step": 3}, "fade_critic"),  # no critic to fade
        ({"fade_critic": "yes", "fade_end_step": 3}, "fade_critic"),
        ({"critic_coef": 0.1, "critic_end_step": 5}, "critic_end_step"),  # a constant beta never reads it
        ({"critic_coeff": 0.1}, "critic_coeff"),  # unknown key
    ],
)
def test_bad_values_name_the_key_in_one_line(block, key):
    with pytest.raises(ValueError, match=f"guided_loss.*{key}") as info:
        GuidedLossConfig.from_mapping(block)
    assert "\n" not in str(info.value)


def test_a_full_block_is_accepted():
    c = GuidedLossConfig.from_mapping(
        {
            "mode": "imitation",
            "imitation_value": 1.0,
            "baseline": "policy",
            "critic_coef": 0.05,
            "critic_schedule": "linear",
            "critic_end_step": 100,
            "critic_rows": "guided",
            "critic_clip": 10.0,
            "fade_reward_threshold": 0.5,
            "fade_end_step": 80,
            "fade_critic": True,
        }
    )
    assert c.critic_on and c.fades
