"""The guided estimator of one training step: per-token advantages from rewards, groups, guided flags and the two
models' log-probs of the sampled tokens, under a `GuidedLossConfig`. The one function that both the verl estimator
(`verl/guided.py`) and the CPU pilot call, so that a pilot result speaks for the trainer.

Knows nothing about verl or how the inputs were gathered.
"""

from torch import Tensor

from .advantages import guided_advantages, teacher_critic, token_advantages
from .config import GuidedLossConfig
from .schedules import critic_coef


def guided_token_advantages(
    scores: Tensor,
    group: Tensor,
    guided: Tensor,
    mask: Tensor,
    config: GuidedLossConfig,
    step: int,
    logp_teacher: Tensor | None = None,
    logp_policy: Tensor | None = None,
    guidance: float = 1.0,
    norm_by_std: bool = True,
    eps: float = 1e-6,
) -> Tensor:
    """A_t = A_i(mode, baseline) + beta(step) * (log pi_t(y_t) - log pi_theta(y_t)) on the critic's rows.
    scores, group, guided: (B,); mask, logp_teacher, logp_policy: (B, T) (the log-probs may be None when the critic is
    off); guidance: the fade's scale in [0, 1], which multiplies beta when `config.fade_critic`. Returns (B, T)."""
    adv = guided_advantages(
        scores, group, guided, config.mode, config.baseline, norm_by_std, eps, config.imitation_value
    )  # (B,)
    if not config.critic_on:
        return token_advantages(adv, mask)
    assert logp_teacher is not None and logp_policy is not None, "the critic needs both models' log-probs"
    beta = critic_coef(step, config.critic_coef, config.critic_schedule, config.critic_end_step)
    beta = beta * guidance if config.fade_critic else beta
    critic = teacher_critic(logp_teacher, logp_policy, mask, config.critic_clip)  # (B, T)
    rows = {"all": None, "guided": guided.bool(), "policy": ~guided.bool()}[config.critic_rows]  # (B,) or None
    return token_advantages(adv, mask, critic, beta, rows)  # (B, T)
