"""Per-token choice of alpha, the teacher's weight in q_alpha ∝ pi_theta^(1 - alpha) * pi_t^alpha.

Owns: `solve_alpha` and its methods (`kl_symmetry`, `ess_balance`, `fixed`, `entropy`).
Knows nothing about models or decoding. Every solver runs a fixed number of iterations with `torch.where`
updates: no data-dependent Python branching and no host sync, so a decode step that calls it can be compiled
with `fullgraph=True` and captured in a CUDA graph.

kl_symmetry (default): the root alpha* of Delta(alpha) = KL(q||pi_theta) - KL(q||pi_t) = E_q[ell],
ell = logp_teacher - logp_policy. Delta is increasing (Delta' = Var_q[ell] >= 0), Delta(0) <= 0 <= Delta(1),
so a safeguarded Newton iteration (Newton inside a shrinking bisection bracket) finds it.

Bad input (the contract of `core.mixture`): wrong types, dtypes, shapes, devices or scalars raise a ValueError; a
row whose inputs are not distributions (a NaN or +inf anywhere, no finite entry, or an empty support) gets
alpha = NaN, for every method, never a plausible 0.5.
"""

import torch
from torch import Tensor

from .mixture import LOGP_FLOOR, check_logps, invalid_rows, restrict

ALPHA_METHODS = ("kl_symmetry", "ess_balance", "fixed", "entropy")
# Two rows whose log-probs differ by at most this everywhere on the support are "the same": alpha = 0.5.
EQUAL_TOL = 1e-6
# Safeguarded Newton takes a bisection step whenever Newton would leave the bracket or not halve the last step,
# so the error keeps shrinking even on one-hot pairs: measured < 1e-6 after 20 iterations on sharp, one-hot and
# +-1e4-logit rows of the full 151,936 vocabulary (tests/core); smooth rows converge in < 8.
KL_SYMMETRY_ITERS = 20
ESS_BALANCE_ITERS = 40  # plain bisection: 2^-40 bracket
# A Newton step this small is accepted even if it did not halve the previous one (converged: float32 noise).
NEWTON_CONVERGED = 1e-6


def solve_alpha(
    logp_policy: Tensor,
    logp_teacher: Tensor,
    support: Tensor | None = None,
    method: str = "kl_symmetry",
    fixed_alpha: float | None = None,
    num_iters: int | None = None,
) -> Tensor:
    """The teacher weight alpha per row, in [0, 1].
    logp_*: (B, V) float32 log-probs over the full vocabulary; support: (B, V) bool or None (= everything).
    With a support, both distributions are restricted to it and renormalised before solving.
    Rows whose two distributions are (numerically) equal get alpha = 0.5 (except for `fixed`); rows that are not
    distributions get NaN (module docstring). Returns (B,) float32."""
    _check_args(logp_policy, logp_teacher, support, method, fixed_alpha, num_iters)
    bad = invalid_rows(logp_policy) | invalid_rows(logp_teacher)  # (B,)
    if support is not None:
        bad = bad | ~support.any(dim=-1)  # (B,) an empty support leaves nothing to sample
    nan = torch.full(bad.shape, float("nan"), dtype=torch.float32, device=bad.device)  # (B,)
    return torch.where(bad, nan, _solve(logp_policy, logp_teacher, support, method, fixed_alpha, num_iters))


def _check_args(logp_policy, logp_teacher, support, method, fixed_alpha, num_iters) -> None:
    check_logps("solve_alpha", support, logp_policy=logp_policy, logp_teacher=logp_teacher)
    if method not in ALPHA_METHODS:
        raise ValueError(f"solve_alpha: alpha method must be one of {ALPHA_METHODS}, got {method!r}")
    if method == "fixed" and (
        isinstance(fixed_alpha, bool) or not isinstance(fixed_alpha, int | float) or not 0.0 <= fixed_alpha <= 1.0
    ):
        raise ValueError(f"fixed_alpha must be a number in [0, 1] when method='fixed', got {fixed_alpha!r}")
    if num_iters is not None and (isinstance(num_iters, bool) or not isinstance(num_iters, int) or num_iters < 1):
        raise ValueError(f"solve_alpha: num_iters must be an int >= 1 or None (the default), got {num_iters!r}")


def _solve(logp_policy, logp_teacher, support, method, fixed_alpha, num_iters) -> Tensor:
    """solve_alpha on checked arguments, before bad rows are marked. Returns (B,) float32."""
    if method == "fixed":
        return torch.full(logp_policy.shape[:-1], float(fixed_alpha), dtype=torch.float32, device=logp_policy.device)
    lp = restrict(logp_policy.float(), support).clamp_min(LOGP_FLOOR)  # (B, V)
    lt = restrict(logp_teacher.float(), support).clamp_min(LOGP_FLOOR)  # (B, V)
    off = _off_support(lp, support)  # (B, V) 0 on the support, -inf off it
    ell = (lt - lp).masked_fill(off < 0, 0.0)  # (B, V)
    if method == "entropy":
        return _entropy_alpha(lp + off, lt + off)
    if method == "kl_symmetry":
        alpha = _kl_symmetry_alpha(lp + off, ell, KL_SYMMETRY_ITERS if num_iters is None else num_iters)
    else:
        alpha = _ess_balance_alpha(lp + off, lt + off, ell, ESS_BALANCE_ITERS if num_iters is None else num_iters)
    same = ell.abs().amax(dim=-1) <= EQUAL_TOL  # (B,)
    return torch.where(same, torch.full_like(alpha, 0.5), alpha)


def _off_support(logp: Tensor, support: Tensor | None) -> Tensor:
    """(B, V) additive mask: 0 where a token may be sampled, -inf where it may not."""
    if support is None:
        return torch.zeros_like(logp)
    return torch.zeros_like(logp).masked_fill(~support, float("-inf"))


def _moments(lp: Tensor, ell: Tensor, alpha: Tensor) -> tuple[Tensor, Tensor]:
    """Delta(alpha) = E_q[ell] and Delta'(alpha) = Var_q[ell] under log q ∝ lp + alpha * ell. Returns (B,), (B,)."""
    logits = lp + alpha.unsqueeze(-1) * ell  # (B, V)
    q = (logits - logits.logsumexp(dim=-1, keepdim=True)).exp()  # (B, V)
    mean = (q * ell).sum(dim=-1)  # (B,)
    var = (q * (ell - mean.unsqueeze(-1)).square()).sum(dim=-1)  # (B,)
    return mean, var


def _kl_symmetry_alpha(lp: Tensor, ell: Tensor, num_iters: int) -> Tensor:
    """Safeguarded Newton for Delta(alpha) = 0 (Numerical Recipes' rtsafe with a fixed iteration count).
    lp: (B, V) floored policy log-probs, -inf off the support; ell: (B, V), 0 off the support."""
    lo = torch.zeros(lp.shape[:-1], dtype=torch.float32, device=lp.device)  # (B,)
    hi = torch.ones_like(lo)  # (B,)
    alpha = torch.full_like(lo, 0.5)  # (B,)
    last_step = torch.ones_like(lo)  # (B,)
    for _ in range(num_iters):
        delta, slope = _moments(lp, ell, alpha)
        lo = torch.where(delta < 0, alpha, lo)
        hi = torch.where(delta > 0, alpha, hi)
        newton_step = delta / slope  # inf/nan where slope == 0: rejected below
        newton = alpha - newton_step
        shrinking = (newton_step.abs() <= 0.5 * last_step.abs()) | (newton_step.abs() <= NEWTON_CONVERGED)
        take_newton = (newton >= lo) & (newton <= hi) & shrinking
        new_alpha = torch.where(take_newton, newton, 0.5 * (lo + hi))
        last_step = new_alpha - alpha
        alpha = new_alpha
    return alpha.clamp(0.0, 1.0)


def _ess_balance_alpha(lp: Tensor, lt: Tensor, ell: Tensor, num_iters: int) -> Tensor:
    """Bisection for log sum pi_theta^2 / q = log sum pi_t^2 / q (equal effective sample sizes).
    lp, lt: (B, V) floored log-probs, -inf off the support; ell: (B, V)."""
    lo = torch.zeros(lp.shape[:-1], dtype=torch.float32, device=lp.device)  # (B,)
    hi = torch.ones_like(lo)  # (B,)
    on = lp > float("-inf")  # (B, V) the support: off it 2 lp - log q would be -inf - (-inf) = NaN
    for _ in range(num_iters):
        alpha = 0.5 * (lo + hi)  # (B,)
        logits = lp + alpha.unsqueeze(-1) * ell  # (B, V)
        logq = logits - logits.logsumexp(dim=-1, keepdim=True)  # (B, V)
        log_ess_p = torch.where(on, 2 * lp - logq, float("-inf")).logsumexp(dim=-1)  # (B,) log sum pi_theta^2 / q
        log_ess_t = torch.where(on, 2 * lt - logq, float("-inf")).logsumexp(dim=-1)  # (B,) log sum pi_t^2 / q
        gap = log_ess_p - log_ess_t  # (B,) increasing in alpha
        lo = torch.where(gap < 0, alpha, lo)
        hi = torch.where(gap < 0, hi, alpha)
    return 0.5 * (lo + hi)


def _entropy_alpha(lp: Tensor, lt: Tensor) -> Tensor:
    """alpha = H(pi_theta) / (H(pi_theta) + H(pi_t)): the more confident model gets the larger weight.
    lp, lt: (B, V) log-probs, -inf off the support."""
    h_policy = -(lp.exp() * lp.clamp_min(LOGP_FLOOR)).sum(dim=-1)  # (B,)
    h_teacher = -(lt.exp() * lt.clamp_min(LOGP_FLOOR)).sum(dim=-1)  # (B,)
    total = h_policy + h_teacher  # (B,)
    return torch.where(total > 0, h_policy / total.clamp_min(1e-30), torch.full_like(total, 0.5))
