"""scripts/experiments/pilot_cpu.py with the guided loss: the pilot's advantages are the registered verl estimator's
output on the same tensors, bad flag combinations are refused before loading models, and a guided step runs."""

import numpy as np
import pytest
import torch

from recipe.optimal_sampling.loss import GuidedLossConfig
from tests.experiments.test_pilot_on_cpu import pilot, tiny_pair

verl = pytest.importorskip("verl")

from tensordict import TensorDict  # noqa: E402
from verl import DataProto  # noqa: E402
from verl.trainer.ppo.ray_trainer import compute_advantage  # noqa: E402

from recipe.optimal_sampling.verl.guided import GUIDED_ESTIMATOR, GuidedStepInputs, guided_step  # noqa: E402

CONFIGS = [
    GuidedLossConfig(),
    GuidedLossConfig(mode="imitation"),
    GuidedLossConfig(mode="positive_only", baseline="policy", critic_coef=0.3, critic_rows="guided"),
    GuidedLossConfig(critic_coef=0.5, critic_schedule="cosine", critic_end_step=8, fade_end_step=6, fade_critic=True),
]


@pytest.mark.parametrize("config", CONFIGS)
def test_pilot_advantages_equal_the_registered_verl_estimator(config):
    g = torch.Generator().manual_seed(0)
    P, n, T = 3, 4, 5
    r = (torch.rand(P * n, generator=g) < 0.4).float()  # (B,)
    guided = (torch.arange(P * n) % n) < 2  # (B,) mixed groups, 2 of 4 guided
    lengths = torch.randint(1, T + 1, (P * n,), generator=g)
    mask = (torch.arange(T) < lengths[:, None]).float()  # (B, T)
    logp_policy, logp_teacher = -torch.rand(P * n, T, generator=g) * 3, -torch.rand(P * n, T, generator=g) * 3
    logp_teacher[~guided] = float("nan")  # policy-only rows without teacher scores
    got = pilot.advantages(r, n, guided, mask, logp_teacher, logp_policy, config, step=3, guidance=0.5)
    # verl: rewards on each response's last token, uids per prompt, the estimator under the recipe's trainer
    rewards = torch.zeros(P * n, T).scatter(1, (lengths - 1)[:, None], r[:, None])
    data = DataProto(
        batch=TensorDict({"token_level_rewards": rewards, "response_mask": mask}, batch_size=[P * n]),
        non_tensor_batch={"uid": np.array([f"p{i // n}" for i in range(P * n)], dtype=object)},
    )
    with guided_step(GuidedStepInputs(guided, logp_teacher, logp_policy, 3, 0.5, config)):
        want = compute_advantage(data, GUIDED_ESTIMATOR, config={"norm_adv_by_std_in_grpo": True}).batch["advantages"]
    torch.testing.assert_close(got, want)
    assert torch.isfinite(got).all()


@pytest.mark.parametrize(
    "arm, overrides, match",
    [
        ("on_policy", {"mode": "imitation"}, "samples nothing with the teacher"),
        ("opd", {"critic_rows": "guided"}, "samples nothing with the teacher"),
        ("balanced", {"baseline": "policy"}, "mixed_"),
        ("balanced", {"mode": "imitate"}, "guided_loss.mode"),
    ],
)
def test_contradictory_flags_are_refused_before_loading_models(arm, overrides, match):
    with pytest.raises(ValueError, match=match):
        pilot.run(arm, 1e-4, 1, 0, 1, 4, loss_overrides=overrides)


def test_a_guided_step_with_imitation_and_a_critic_on_scored_policy_rows_runs():
    tok, policy, sampler = tiny_pair("mixed_1of8")
    policy_only = pilot.DualSampler(
        policy, sampler.teacher, pilot.POLICY_ONLY.replace(stop_token_ids=sampler.config.stop_token_ids), tokenizer=tok
    )
    before = [p.detach().clone() for p in policy.parameters()]
    optimizer = torch.optim.SGD(policy.parameters(), lr=1e-2)
    problems = pilot.make_problems(2, seed=0, split="train")
    loss = GuidedLossConfig(mode="imitation", critic_coef=0.5)  # the critic moves the policy even at zero rewards
    out = pilot.grpo_step(policy, optimizer, (sampler, policy_only), tok, problems, 4, 0, 2.0, 1, loss, 1, 1.0)
    assert out["guided_per_prompt"] == 1 and out["policy_reward"] is not None
    assert any(not torch.equal(a, b) for a, b in zip(before, policy.parameters(), strict=True))
