"""The geometric mixture q_alpha of two next-token distributions, and the top-p trust region.

Owns: `mix_logprobs`, `restrict`, `teacher_top_p_support`, the log-prob floor.
Knows nothing about models, alpha solvers, configs or devices: pure float32 tensor maths in log space.

Convention: alpha is the TEACHER's weight,
    log q_alpha = (1 - alpha) * logp_policy + alpha * logp_teacher - log Z(alpha).
"""

import torch
from torch import Tensor

# Log-probs are floored before they are combined, so that a weight never multiplies -inf (0 * -inf = nan).
# exp(-1e3) is already 0 in float32 (and float64), so flooring changes no probability, while values this small
# keep float32 resolution (ulp 6e-5) when rows with disjoint supports are mixed; a floor of -1e5 lost 2e-3 there.
LOGP_FLOOR = -1e3


def restrict(logp: Tensor, support: Tensor | None) -> Tensor:
    """Restrict a distribution to `support` and renormalise there: -inf off the support.
    logp: (B, V) log-probs; support: (B, V) bool or None (= full vocabulary, returned unchanged)."""
    if support is None:
        return logp
    masked = logp.clamp_min(LOGP_FLOOR).masked_fill(~support, float("-inf"))  # (B, V)
    return masked - masked.logsumexp(dim=-1, keepdim=True)  # (B, V)


def mix_logprobs(logp_policy: Tensor, logp_teacher: Tensor, alpha: Tensor, support: Tensor | None = None) -> Tensor:
    """log q_alpha = (1 - alpha) logp_policy + alpha logp_teacher - log Z, restricted to `support`.
    logp_*: (B, V) float32 log-probs; alpha: (B,) teacher weight in [0, 1]; support: (B, V) bool or None.
    Returns (B, V) normalised log-probs, -inf off the support. Restricting before or after mixing gives the
    same q (the renormalisation constants cancel), so the inputs need not be restricted already."""
    assert logp_policy.shape == logp_teacher.shape, f"{logp_policy.shape=} {logp_teacher.shape=}"
    a = alpha.to(logp_policy.dtype).unsqueeze(-1)  # (B, 1)
    mixed = (1 - a) * logp_policy.clamp_min(LOGP_FLOOR) + a * logp_teacher.clamp_min(LOGP_FLOOR)  # (B, V)
    if support is not None:
        mixed = mixed.masked_fill(~support, float("-inf"))  # (B, V)
    return mixed - mixed.logsumexp(dim=-1, keepdim=True)  # (B, V)


def teacher_top_p_support(logp_teacher: Tensor, top_p: float) -> Tensor:
    """The teacher's top-p set: the smallest set of tokens whose teacher probability sums to >= top_p.
    Always holds at least the teacher's most likely token; ties are broken by token id order of the sort.
    logp_teacher: (B, V) log-probs; top_p in (0, 1]. Returns (B, V) bool."""
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {top_p!r}; use 1.0 (or no constraint) for the full vocabulary")
    if top_p >= 1.0:
        return torch.ones_like(logp_teacher, dtype=torch.bool)  # (B, V)
    sorted_logp, order = logp_teacher.sort(dim=-1, descending=True)  # (B, V), (B, V)
    probs = sorted_logp.exp()  # (B, V)
    mass_before = probs.cumsum(dim=-1) - probs  # (B, V) exclusive prefix sum
    keep_sorted = mass_before < top_p  # (B, V); position 0 always kept (mass_before = 0)
    return torch.zeros_like(keep_sorted).scatter(-1, order, keep_sorted)  # (B, V)
