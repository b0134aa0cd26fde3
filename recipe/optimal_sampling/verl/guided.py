"""The `optimal_sampling_guided` advantage estimator, registered in verl 0.9.1's own registry
(`algorithm.adv_estimator=optimal_sampling_guided`, options in the top-level `guided_loss` block), and the start-up
refusals of `guided_loss` settings that contradict the rest of the trainer config.

verl hands a registered estimator only the rewards, the response mask, the group uids and `config.algorithm`. The rest
(which responses were sampled with the teacher, log pi_t(y_t), the trainer's log pi_theta(y_t), the step and the fade)
is read from TransferQueue by `OptimalSamplingTrainer._compute_advantage` (`read_step_inputs`) and handed over for the
duration of verl's own `_compute_advantage` (`guided_step`). The maths is `loss.guided_token_advantages`, which the
CPU pilot calls too; this module only adapts. Knows nothing about models or sampling.
"""

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor
from verl.trainer.ppo.core_algos import register_adv_est

from ..engine.policy_only import ignores_teacher
from ..loss import GuidedLossConfig, guided_token_advantages
from ..loss.config import KEY as LOSS_KEY
from . import ENGINE_KWARGS_KEY, ROLLOUT_NAME
from .config import OptimalSamplingConfig

GUIDED_ESTIMATOR = "optimal_sampling_guided"  # algorithm.adv_estimator


@dataclass
class GuidedStepInputs:
    """What the estimator needs beyond verl's arguments, rows in the order of the step's batch."""

    guided: Tensor  # (B,) bool: sampled with the teacher (from q*)
    logp_teacher: Tensor  # (B, T) log pi_t(y_t); NaN where the teacher did not score the response
    logp_policy: Tensor  # (B, T) the trainer's log pi_theta_old(y_t)
    step: int  # verl's global_steps
    guidance: float  # the fade's scale in [0, 1]
    config: GuidedLossConfig


_INPUTS: ContextVar[GuidedStepInputs | None] = ContextVar("optimal_sampling_guided_inputs", default=None)


@contextmanager
def guided_step(inputs: GuidedStepInputs) -> Iterator[None]:
    """The estimator reads `inputs` while this block runs (verl calls it synchronously inside)."""
    token = _INPUTS.set(inputs)
    try:
        yield
    finally:
        _INPUTS.reset(token)


def group_ids(index) -> Tensor:
    """verl's per-row group uids (any hashable) -> (B,) int64 ids in [0, B)."""
    return torch.as_tensor(np.unique(np.asarray(index), return_inverse=True)[1].reshape(-1), dtype=torch.long)


@register_adv_est(GUIDED_ESTIMATOR)
def compute_guided_advantage(
    token_level_rewards: Tensor, response_mask: Tensor, index, config=None, epsilon: float = 1e-6, **_
) -> tuple[Tensor, Tensor]:
    """verl's estimator signature: token_level_rewards, response_mask (B, T); index: (B,) group uids; config:
    `config.algorithm` (its norm_adv_by_std_in_grpo is honoured). Returns (advantages, returns), both (B, T)."""
    inputs = _INPUTS.get()
    if inputs is None:
        raise ValueError(
            f"algorithm.adv_estimator={GUIDED_ESTIMATOR} was called without the step's guided flags and teacher "
            "log-probs: it runs only under the recipe's trainer (trainer.v1.trainer_mode=optimal_sampling_sync)"
        )
    B, T = response_mask.shape
    assert inputs.guided.shape == (B,) and inputs.logp_teacher.shape == (B, T), (
        f"{inputs.logp_teacher.shape=} {B=} {T=}"
    )
    norm = bool(config.get("norm_adv_by_std_in_grpo", True)) if config is not None else True
    with torch.no_grad():
        adv = guided_token_advantages(
            token_level_rewards.sum(dim=-1),  # (B,)
            group_ids(index).to(response_mask.device),
            inputs.guided.to(response_mask.device),
            response_mask,
            inputs.config,
            inputs.step,
            inputs.logp_teacher.to(response_mask.device),
            inputs.logp_policy.to(response_mask.device),
            inputs.guidance,
            norm,
            epsilon,
        )  # (B, T)
    return adv, adv


def policy_reward_mean(scores: Tensor, guided: Tensor) -> float | None:
    """The policy's own mean training reward (over responses sampled without the teacher); None when there is none.
    scores: (B,); guided: (B,) bool."""
    own = scores[~guided.bool()]  # (N,)
    return float(own.double().mean()) if own.numel() else None


def critic_metrics(inputs: GuidedStepInputs, mask: Tensor, keep: Tensor) -> dict[str, float]:
    """What the teacher critic saw this step, over the response tokens of the rows in `keep` (B,) bool, mask (B, T):
    `critic_scored_frac`, the share of tokens with a teacher score, and `critic_logratio_mean`, the mean of
    log pi_t(y_t) - log pi_theta_old(y_t) over those (minus a per-token estimate of KL(pi_theta || pi_t) on the
    policy's rows); the latter is left out when no token was scored."""
    ell = inputs.logp_teacher.double() - inputs.logp_policy.double()  # (B, T)
    on = mask.bool() & keep[:, None]  # (B, T)
    scored = on & torch.isfinite(ell)  # (B, T)
    out = {"critic_scored_frac": float(scored.sum() / on.sum().clamp(min=1))}
    if scored.any():
        out["critic_logratio_mean"] = float(ell[scored].mean())
    return out


def read_step_inputs(
    batch, step: int, guidance: float, config: GuidedLossConfig
) -> tuple[GuidedStepInputs, Tensor, Tensor]:
    """The estimator's inputs from TransferQueue, rows in `batch.keys` order (as verl's own `_compute_advantage`
    reads them), the per-response scores (B,) and the response mask (B, T)."""
    import transfer_queue as tq

    from .server import GUIDED_KEY

    select = ["dual_logp_teacher", "old_log_probs", "rm_scores", "response_mask"]
    data = tq.kv_batch_get(keys=batch.keys, partition_id=batch.partition_id, select_fields=[*select, "extra_fields"])
    extra = data.pop("extra_fields").tolist()
    guided = torch.tensor([bool(e[GUIDED_KEY]) for e in extra])  # (B,) as the server flags each response
    pad = {n: torch.nested.to_padded_tensor(data[n], 0.0) if data[n].is_nested else data[n] for n in select}
    inputs = GuidedStepInputs(guided, pad["dual_logp_teacher"], pad["old_log_probs"], step, guidance, config)
    return inputs, pad["rm_scores"].sum(dim=-1), pad["response_mask"]


# ---- start-up checks --------------------------------------------------------------------------------------------


def check_guided_loss(config: Mapping) -> GuidedLossConfig:
    """Parse `guided_loss` and refuse settings that contradict the trainer config (ValueError naming the key, the
    value and the fix). Returns the parsed block."""
    loss = GuidedLossConfig.from_mapping(config.get(LOSS_KEY))
    estimator = (config.get("algorithm") or {}).get("adv_estimator")
    rollout = config["actor_rollout_ref"]["rollout"]
    if estimator != GUIDED_ESTIMATOR:
        if changed := loss.changed():
            overrides = ", ".join(f"{k}={v}" for k, v in changed.items())
            raise ValueError(
                f"{LOSS_KEY} is set ({overrides}) but algorithm.adv_estimator={estimator}: set "
                f"algorithm.adv_estimator={GUIDED_ESTIMATOR} or drop the {LOSS_KEY} overrides"
            )
        return loss
    if rollout["name"] != ROLLOUT_NAME:
        raise ValueError(
            f"algorithm.adv_estimator={GUIDED_ESTIMATOR} needs actor_rollout_ref.rollout.name={ROLLOUT_NAME} (got "
            f"{rollout['name']}): only the dual backend records which responses were guided and log pi_t(y_t)"
        )
    os_config = OptimalSamplingConfig.from_engine_kwargs(rollout.get("engine_kwargs"))
    n = int(rollout.get("n", 1))
    _check_members(loss, os_config, n)
    _check_critic(loss, os_config, n)
    _check_fade(loss, os_config, n, (config.get("trainer") or {}).get("total_training_steps"))
    return loss


def _guided_members(os_config: OptimalSamplingConfig, n: int) -> tuple[int, int]:
    """(guided, unguided) responses per group at the start; 'guided' means the teacher shaped the sample."""
    k = n if os_config.guided_per_prompt is None else min(os_config.guided_per_prompt, n)
    if ignores_teacher(os_config.sampler_config()):
        k = 0  # q* = pi_theta: every response is the policy's own
    return k, n - k


def _check_members(loss: GuidedLossConfig, os_config: OptimalSamplingConfig, n: int) -> None:
    guided, unguided = _guided_members(os_config, n)
    if guided == 0 and (loss.mode != "grpo" or loss.baseline != "group"):
        raise ValueError(
            f"{LOSS_KEY}.mode={loss.mode}, baseline={loss.baseline} act on guided responses, but none is guided "
            f"(guided_per_prompt={os_config.guided_per_prompt}, alpha_method={os_config.alpha_method}, fixed_alpha="
            f"{os_config.fixed_alpha}): sample some from q* or use mode=grpo, baseline=group"
        )
    if unguided == 0 and loss.baseline == "policy":
        raise ValueError(
            f"{LOSS_KEY}.baseline=policy takes the baseline from the policy's own responses, but every response is "
            f"guided (guided_per_prompt={os_config.guided_per_prompt}, rollout.n={n}): set "
            f"{ENGINE_KWARGS_KEY}.guided_per_prompt below {n} or baseline=group"
        )


def _teacher_decoded(os_config: OptimalSamplingConfig, n: int) -> int:
    """Responses per group whose log pi_t(y_t) the server records while decoding (the teacher runs in lockstep);
    the others are sampled without the teacher and carry a teacher score only with score_policy_samples."""
    if os_config.skip_unused_teacher and ignores_teacher(os_config.sampler_config()):
        return 0
    return n if os_config.guided_per_prompt is None else min(os_config.guided_per_prompt, n)


def _check_critic(loss: GuidedLossConfig, os_config: OptimalSamplingConfig, n: int) -> None:
    if os_config.score_policy_samples and not loss.critic_on:
        raise ValueError(
            f"{ENGINE_KWARGS_KEY}.score_policy_samples=true costs a teacher prefill per policy-only response but "
            f"{LOSS_KEY}.critic_coef=0 reads no teacher score: set critic_coef > 0 or score_policy_samples=false"
        )
    if not loss.critic_on:
        return
    if not os_config.teacher_path:
        raise ValueError(
            f"{LOSS_KEY}.critic_coef={loss.critic_coef} needs a teacher: set {ENGINE_KWARGS_KEY}.teacher_path"
        )
    decoded = _teacher_decoded(os_config, n)
    if loss.critic_rows != "guided" and decoded < n and not os_config.score_policy_samples:
        raise ValueError(
            f"{LOSS_KEY}.critic_rows={loss.critic_rows} puts the teacher critic on policy-only responses, which carry "
            f"no teacher score unless {ENGINE_KWARGS_KEY}.score_policy_samples=true (one teacher prefill each): "
            "turn it on, or set critic_rows=guided"
        )
    if loss.critic_rows == "guided" and decoded == 0:
        raise ValueError(
            f"{LOSS_KEY}.critic_rows=guided but no response is sampled with the teacher: set critic_rows=policy "
            f"with {ENGINE_KWARGS_KEY}.score_policy_samples=true (on-policy distillation), or guide some responses"
        )
    if loss.critic_rows == "policy" and decoded == n:
        raise ValueError(
            f"{LOSS_KEY}.critic_rows=policy but every response is guided (guided_per_prompt="
            f"{os_config.guided_per_prompt}): set critic_rows=guided or all, or guided_per_prompt below rollout.n"
        )


def _check_fade(loss: GuidedLossConfig, os_config: OptimalSamplingConfig, n: int, total_steps) -> None:
    guided, unguided = _guided_members(os_config, n)
    if loss.fades and guided == 0 and not (loss.fade_critic and loss.critic_on):
        raise ValueError(
            f"{LOSS_KEY} asks guidance to fade (fade_reward_threshold={loss.fade_reward_threshold}, fade_end_step="
            f"{loss.fade_end_step}) but nothing is guided and the critic does not fade: drop the fade or guide some "
            "responses (guided_per_prompt) or set fade_critic=true with critic_coef > 0"
        )
    if loss.fade_reward_threshold is not None and unguided == 0:
        raise ValueError(
            f"{LOSS_KEY}.fade_reward_threshold={loss.fade_reward_threshold} fades on the policy's own success rate, "
            f"which is not measured when every response is guided (guided_per_prompt={os_config.guided_per_prompt}, "
            f"rollout.n={n}): set guided_per_prompt below {n} or use fade_end_step"
        )
    for name in ("fade_end_step", "critic_end_step"):
        end = getattr(loss, name)
        if end is not None and total_steps is not None and end > int(total_steps):
            raise ValueError(
                f"{LOSS_KEY}.{name}={end} is beyond trainer.total_training_steps={total_steps}: it would never reach "
                f"0 in this run; use a step <= {total_steps}"
            )
