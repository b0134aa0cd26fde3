"""Per-token diagnostics of a sampling distribution q against the policy and the teacher.

Owns: `token_diagnostics`. Knows nothing about metrics loggers: it returns per-row tensors; reduction to
scalars happens outside `core/` (see `recipe.optimal_sampling.metrics`).
"""

import torch
from torch import Tensor

from .mixture import LOGP_FLOOR, check_logps, invalid_rows


def token_diagnostics(logp_policy: Tensor, logp_teacher: Tensor, logq: Tensor) -> dict[str, Tensor]:
    """KLs, effective sample sizes and entropy of q, per row.
    logp_*: (B, V) full-vocabulary log-probs; logq: (B, V) log q, -inf where q = 0.
    Returns a dict of (B,) float32 tensors:
      kl_q_policy  = KL(q || pi_theta) = sum_y q (log q - log pi_theta)
      kl_q_teacher = KL(q || pi_t)
      ess_policy   = (sum_S pi_theta)^2 / sum_S pi_theta^2 / q   (Kish ESS fraction of samples from q
      ess_teacher  = the same for pi_t                             re-weighted to pi, S = support of q; in [0, 1])
      entropy_q    = -sum_y q log q
    Rows where any of the three is not a distribution (a NaN or +inf, or no finite entry) are NaN in every entry."""
    check_logps("token_diagnostics", logp_policy=logp_policy, logp_teacher=logp_teacher, logq=logq)
    bad = invalid_rows(logp_policy) | invalid_rows(logp_teacher) | invalid_rows(logq)  # (B,)
    nan = torch.full(bad.shape, float("nan"), dtype=torch.float32, device=bad.device)  # (B,)
    return {name: torch.where(bad, nan, value) for name, value in _diagnostics(logp_policy, logp_teacher, logq).items()}


def _diagnostics(logp_policy: Tensor, logp_teacher: Tensor, logq: Tensor) -> dict[str, Tensor]:
    """token_diagnostics on checked arguments, before bad rows are marked."""
    on = logq > float("-inf")  # (B, V) support of q
    logq_f = logq.float().clamp_min(LOGP_FLOOR)  # (B, V)
    q = logq.float().exp()  # (B, V), exactly 0 off the support
    lp = logp_policy.float().clamp_min(LOGP_FLOOR)  # (B, V)
    lt = logp_teacher.float().clamp_min(LOGP_FLOOR)  # (B, V)
    return {
        "kl_q_policy": (q * (logq_f - lp)).sum(dim=-1),
        "kl_q_teacher": (q * (logq_f - lt)).sum(dim=-1),
        "ess_policy": _ess_fraction(lp, logq_f, on),
        "ess_teacher": _ess_fraction(lt, logq_f, on),
        "entropy_q": -(q * logq_f).sum(dim=-1),
    }


def _ess_fraction(logp: Tensor, logq: Tensor, on: Tensor) -> Tensor:
    """(sum_S p)^2 / sum_S p^2 / q in log space. logp, logq: (B, V) floored; on: (B, V) bool. Returns (B,)."""
    neg_inf = float("-inf")
    log_mass = logp.masked_fill(~on, neg_inf).logsumexp(dim=-1)  # (B,)
    log_second = (2 * logp - logq).masked_fill(~on, neg_inf).logsumexp(dim=-1)  # (B,)
    return (2 * log_mass - log_second).exp()
