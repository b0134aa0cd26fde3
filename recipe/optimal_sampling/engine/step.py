"""One token of dual sampling, from the two models' next-token logits to the sampled token and its trace.

Owns `sample_step`: temperature, top-p support, alpha, forcing, mixing, sampling and the per-token record.
Knows nothing about models, caches or batching. No host sync and no data-dependent Python branching: the
config decides the branches once, so the function can be compiled (`fullgraph=True`) and graph-captured.
"""

from dataclasses import dataclass

import torch
from torch import Tensor

from ..core import mix_logprobs, solve_alpha, teacher_top_p_support, token_diagnostics
from .config import SamplerConfig


@dataclass
class StepRecord:
    """What one decode step produces, per row; every field is a (B,) tensor."""

    token: Tensor  # int64, the sampled token
    logp_q: Tensor  # log q*(token): the behaviour log-prob that importance weights divide by
    logp_policy: Tensor  # log pi_theta(token) over the full vocabulary, at the temperature
    logp_teacher: Tensor  # log pi_t(token) over the full vocabulary, at the temperature
    alpha: Tensor  # the teacher weight used (1 when forced)
    forced: Tensor  # bool, the token was drawn from the teacher by forcing
    support_size: Tensor  # int64, tokens q* could have drawn
    diagnostics: dict[str, Tensor]  # kl_q_policy, kl_q_teacher, ess_policy, ess_teacher, entropy_q


def sample_step(
    logits_policy: Tensor, logits_teacher: Tensor, step: int | Tensor, config: SamplerConfig, generator: torch.Generator
) -> StepRecord:
    """Draw one token per row from q* = mix(pi_theta, pi_t; alpha) restricted to the teacher's top-p set.
    logits_*: (B, V) logits of each model over the shared vocabulary; step: tokens generated so far (forcing)."""
    assert logits_policy.shape == logits_teacher.shape, f"{logits_policy.shape=} {logits_teacher.shape=}"
    # 1) both models at the temperature, float32 (bf16 log-probs lose the tail that the solver integrates over)
    logp_policy = (logits_policy.float() / config.temperature).log_softmax(dim=-1)  # (B, V)
    logp_teacher = (logits_teacher.float() / config.temperature).log_softmax(dim=-1)  # (B, V)
    # 2) trust region and alpha; forcing overrides alpha with 1 for the first tokens
    support = None if config.teacher_top_p is None else teacher_top_p_support(logp_teacher, config.teacher_top_p)
    alpha = solve_alpha(logp_policy, logp_teacher, support, config.alpha_method, config.fixed_alpha)  # (B,)
    forced = torch.full_like(alpha, bool(config.force_teacher_tokens), dtype=torch.bool)  # (B,)
    forced = forced & (torch.as_tensor(step, device=alpha.device) < config.force_teacher_tokens)  # (B,)
    alpha = torch.where(forced, torch.ones_like(alpha), alpha)  # (B,)
    # 3) mix and sample with the exponential race (argmax log q - log E, E ~ Exp(1)): no host sync
    logq = mix_logprobs(logp_policy, logp_teacher, alpha, support)  # (B, V)
    noise = torch.empty_like(logq).exponential_(generator=generator)  # (B, V)
    token = (logq - noise.log()).argmax(dim=-1)  # (B,)
    # 4) the per-token record
    pick = lambda logp: logp.gather(-1, token.unsqueeze(-1)).squeeze(-1)  # noqa: E731  (B, V) -> (B,)
    return StepRecord(
        token=token,
        logp_q=pick(logq),
        logp_policy=pick(logp_policy),
        logp_teacher=pick(logp_teacher),
        alpha=alpha,
        forced=forced,
        support_size=(logq > float("-inf")).sum(dim=-1),
        diagnostics=token_diagnostics(logp_policy, logp_teacher, logq),
    )
