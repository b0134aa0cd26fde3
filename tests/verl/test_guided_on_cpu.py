"""The `optimal_sampling_guided` estimator through verl 0.9.1's own `compute_advantage` and policy loss, and the
start-up refusals of the `guided_loss` block."""

import numpy as np
import pytest
import torch
from tensordict import TensorDict
from verl import DataProto
from verl.trainer.ppo.core_algos import compute_grpo_outcome_advantage, compute_policy_loss_vanilla
from verl.trainer.ppo.ray_trainer import compute_advantage
from verl.trainer.ppo.rollout_corr_helper import compute_rollout_correction_and_add_to_batch
from verl.utils.config import omega_conf_to_dataclass

from recipe.optimal_sampling.loss import GuidedLossConfig
from recipe.optimal_sampling.main import prepare_config
from recipe.optimal_sampling.verl.guided import GUIDED_ESTIMATOR, GuidedStepInputs, check_guided_loss, guided_step
from tests.verl.fixtures import compose_config

KEY = "actor_rollout_ref.rollout.engine_kwargs.optimal_sampling"
ESTIMATOR = f"algorithm.adv_estimator={GUIDED_ESTIMATOR}"
TEACHER = f"{KEY}.teacher_path=/ckpt/teacher"
OPD = [  # policy-only sampling through the dual backend, the teacher scores every response: on-policy distillation
    ESTIMATOR,
    f"{KEY}.alpha_method=fixed",
    f"{KEY}.fixed_alpha=0.0",
    f"{KEY}.force_teacher_tokens=0",
    f"{KEY}.teacher_top_p=null",
    f"{KEY}.skip_unused_teacher=true",
    f"{KEY}.score_policy_samples=true",
    TEACHER,
    "guided_loss.critic_coef=1.0",
]


def step_batch(seed: int, groups: int = 3, n: int = 4, T: int = 6):
    """A step's batch as verl's _compute_advantage sees it: shuffled rows of `groups` prompts x n responses, 0/1
    rewards on the last response token, ragged response masks, and our per-row extras."""
    g = torch.Generator().manual_seed(seed)
    B = groups * n
    uid = np.array([f"prompt-{i // n}" for i in torch.randperm(B, generator=g).tolist()], dtype=object)
    lengths = torch.randint(1, T + 1, (B,), generator=g)
    mask = (torch.arange(T) < lengths[:, None]).float()  # (B, T)
    reward = (torch.rand(B, generator=g) < 0.5).float()  # (B,)
    rewards = torch.zeros(B, T).scatter(1, (lengths - 1)[:, None], reward[:, None])  # (B, T)
    guided = torch.rand(B, generator=g) < 0.5  # (B,)
    logp_policy = -torch.rand(B, T, generator=g) * 3  # (B, T)
    logp_teacher = -torch.rand(B, T, generator=g) * 3  # (B, T)
    logp_teacher[0] = float("nan")  # a policy-only row the teacher did not score
    data = DataProto(
        batch=TensorDict({"token_level_rewards": rewards, "response_mask": mask}, batch_size=[B]),
        non_tensor_batch={"uid": uid},
    )
    return data, guided, logp_teacher, logp_policy


def verl_advantage(data, inputs, algorithm=None):
    with guided_step(inputs):
        return compute_advantage(data, GUIDED_ESTIMATOR, config=algorithm or {"norm_adv_by_std_in_grpo": True})


@pytest.mark.parametrize("seed", range(3))
def test_plain_mode_equals_verls_own_grpo(seed):
    data, guided, logp_teacher, logp_policy = step_batch(seed)
    inputs = GuidedStepInputs(guided, logp_teacher, logp_policy, 1, 1.0, GuidedLossConfig())
    got = verl_advantage(data, inputs).batch["advantages"]
    want, _ = compute_grpo_outcome_advantage(
        data.batch["token_level_rewards"], data.batch["response_mask"], data.non_tensor_batch["uid"]
    )
    torch.testing.assert_close(got, want, atol=1e-6, rtol=0)


@pytest.mark.parametrize("seed", range(3))
def test_critic_and_modes_through_verl_equal_a_float64_loop(seed):
    data, guided, logp_teacher, logp_policy = step_batch(seed)
    config = GuidedLossConfig(mode="positive_only", baseline="policy", critic_coef=0.4, critic_schedule="linear",
                              critic_end_step=10, critic_rows="all")  # fmt: skip
    inputs = GuidedStepInputs(guided, logp_teacher, logp_policy, 5, 1.0, config)
    got = verl_advantage(data, inputs, {"norm_adv_by_std_in_grpo": False}).batch["advantages"]
    # naive: per row, baseline = mean of the group's unguided rewards (else the group's), guided negatives to 0,
    # then + beta(5) = 0.4 * (1 - 5/10) times (log pi_t - log pi_theta) on every scored response token
    uid, mask = data.non_tensor_batch["uid"], data.batch["response_mask"].double()
    r = data.batch["token_level_rewards"].double().sum(-1).tolist()
    want = torch.zeros_like(mask)
    for i in range(len(r)):
        same = [j for j in range(len(r)) if uid[j] == uid[i]]
        own = [r[j] for j in same if not guided[j]] or [r[j] for j in same]
        a = r[i] - sum(own) / len(own)
        a = max(a, 0.0) if guided[i] else a
        for t in range(mask.shape[1]):
            if mask[i, t]:
                c = float(logp_teacher[i, t]) - float(logp_policy[i, t])
                want[i, t] = a + (0.2 * c if c == c else 0.0)  # c != c: NaN, an unscored token gives 0
    torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=0)
    assert torch.isfinite(got).all()


def test_the_is_weight_multiplies_the_whole_per_token_advantage_critic_included():
    """verl's decoupled rollout correction and its vanilla policy loss: d loss / d log pi(y_t) = -A_t w_t / N with
    A_t = A_i + beta c_t, w_t = min(pi_old / q*, 2): the critic term is importance-weighted like the rest."""
    data, guided, logp_teacher, logp_policy = step_batch(0)
    config = GuidedLossConfig(critic_coef=0.5)
    g = torch.Generator().manual_seed(1)
    rollout_lp = logp_policy + torch.randn(logp_policy.shape, generator=g)  # log q*
    data.batch["old_log_probs"], data.batch["rollout_log_probs"] = logp_policy, rollout_lp
    correction = {"rollout_is": "token", "rollout_is_threshold": 2.0, "bypass_mode": False}
    data, _ = compute_rollout_correction_and_add_to_batch(data, correction)
    inputs = GuidedStepInputs(guided, logp_teacher, logp_policy, 1, 1.0, config)
    data = verl_advantage(data, inputs)
    adv, w, mask = data.batch["advantages"], data.batch["rollout_is_weights"], data.batch["response_mask"]
    actor = omega_conf_to_dataclass(
        compose_config(["actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=4"]).actor_rollout_ref.actor
    )
    log_prob = logp_policy.clone().requires_grad_(True)
    loss, _ = compute_policy_loss_vanilla(logp_policy, log_prob, adv, mask, "token-mean", actor, w)
    loss.backward()
    torch.testing.assert_close(log_prob.grad, -adv * w * mask / mask.sum(), atol=1e-6, rtol=0)
    plain = verl_advantage(data, GuidedStepInputs(guided, logp_teacher, logp_policy, 1, 1.0, GuidedLossConfig()))
    assert not torch.allclose(adv, plain.batch["advantages"])  # the critic term is in A_t
    assert (w[mask.bool()] != 1).any()


def test_the_estimator_outside_the_recipes_trainer_is_an_error():
    data, *_ = step_batch(0)
    with pytest.raises(ValueError, match="trainer_mode=optimal_sampling_sync"):
        compute_advantage(data, GUIDED_ESTIMATOR, config={})


# ---- start-up refusals -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "overrides, match",
    [
        (["guided_loss.mode=imitation"], "adv_estimator=grpo"),  # the block set, the estimator not
        ([ESTIMATOR, "actor_rollout_ref.rollout.name=vllm"], "rollout.name=dual"),
        ([ESTIMATOR, "guided_loss.mode=imitation", f"{KEY}.guided_per_prompt=0"], "none is guided"),
        ([*OPD[:5], "guided_loss.mode=imitation"], "none is guided"),  # a pure policy-only run
        ([ESTIMATOR, "guided_loss.baseline=policy"], "every response is guided"),
        ([ESTIMATOR, f"{KEY}.score_policy_samples=true"], "critic_coef=0"),
        ([ESTIMATOR, "guided_loss.critic_coef=0.1"], "needs a teacher"),  # no teacher_path
        ([*OPD[:6], TEACHER, "guided_loss.critic_coef=1.0"], "score_policy_samples=true"),  # critic on unscored rows
        ([ESTIMATOR, TEACHER, f"{KEY}.guided_per_prompt=2", "guided_loss.critic_coef=0.1"], "score_policy_samples"),
        ([*OPD, "guided_loss.critic_rows=guided"], "no response is sampled with the teacher"),
        ([ESTIMATOR, TEACHER, "guided_loss.critic_coef=0.1", "guided_loss.critic_rows=policy"], "every response is"),
        ([ESTIMATOR, "guided_loss.fade_reward_threshold=1.5"], "never fades"),
        ([ESTIMATOR, "guided_loss.fade_reward_threshold=0.5"], "not measured"),  # all guided
        ([*OPD, "guided_loss.fade_end_step=5"], "nothing is guided"),
        ([ESTIMATOR, "trainer.total_training_steps=20", "guided_loss.fade_end_step=30"], "never reach 0"),
        (
            [
                ESTIMATOR,
                TEACHER,
                "guided_loss.critic_coef=0.1",
                "guided_loss.critic_schedule=linear",
                "trainer.total_training_steps=20",
                "guided_loss.critic_end_step=21",
            ],
            "critic_end_step=21",
        ),
        ([ESTIMATOR, "+guided_loss.critic_rowz=all"], "unknown keys"),
    ],
)
def test_contradictory_settings_are_refused_naming_the_key(overrides, match):
    with pytest.raises(ValueError, match=match) as info:
        check_guided_loss(compose_config(["actor_rollout_ref.rollout.n=4", *overrides]))
    assert "\n" not in str(info.value)


def test_prepare_config_refuses_before_loading_anything():
    with pytest.raises(ValueError, match="guided_loss.mode=imitation"):
        prepare_config(compose_config([ESTIMATOR, "guided_loss.mode=imitation", f"{KEY}.guided_per_prompt=0"]))


@pytest.mark.parametrize(
    "overrides",
    [
        [],  # plain GRPO, the defaults
        OPD,  # on-policy distillation + the task reward
        [*OPD[:5], TEACHER, "guided_loss.critic_coef=1.0"],  # OPD with the teacher in lockstep: scores while decoding
        [ESTIMATOR, "guided_loss.mode=imitation"],  # all-guided groups, reward-filtered imitation
        [
            ESTIMATOR,
            TEACHER,
            f"{KEY}.guided_per_prompt=1",
            "guided_loss.baseline=policy",
            "guided_loss.mode=positive_only",
            "guided_loss.critic_coef=0.05",
            "guided_loss.critic_rows=guided",
            "guided_loss.fade_reward_threshold=0.5",
            "trainer.total_training_steps=100",
            "guided_loss.fade_end_step=80",
        ],  # fmt: skip
        [
            ESTIMATOR,
            TEACHER,
            f"{KEY}.guided_per_prompt=1",
            f"{KEY}.score_policy_samples=true",
            "guided_loss.critic_coef=0.05",
        ],
    ],
)
def test_consistent_settings_are_accepted(overrides):
    assert isinstance(
        check_guided_loss(compose_config(["actor_rollout_ref.rollout.n=4", *overrides])), GuidedLossConfig
    )
