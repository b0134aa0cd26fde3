"""The geometric mixture q_alpha of two next-token distributions, and the top-p trust region.

Owns: `mix_logprobs`, `restrict`, `teacher_top_p_support`, the log-prob floor, and the input checks that every
public `core` function shares (`check_logps`, `invalid_rows`).
Knows nothing about models, alpha solvers, configs or devices: pure float32 tensor maths in log space.

Contract on bad input (shared by `solve_alpha`, `mix_logprobs` and `token_diagnostics`):
- what can be checked without reading values (types, dtypes, shapes, devices, Python scalars) raises a one-line
  ValueError at the call;
- values are never read on the host (no sync): a row that is not a distribution (a NaN or +inf anywhere, or no
  finite entry) comes out NaN (alpha, log q, diagnostics), never a plausible number. Callers that need an error
  check the outputs or the logits once per step (the engine does, see `engine.sampler`).

Convention: alpha is the TEACHER's weight,
    log q_alpha = (1 - alpha) * logp_policy + alpha * logp_teacher - log Z(alpha).
"""

import torch
from torch import Tensor

# Log-probs are floored before they are combined, so that a weight never multiplies -inf (0 * -inf = nan).
# exp(-1e3) is already 0 in float32 (and float64), so flooring changes no probability, while values this small
# keep float32 resolution (ulp 6e-5) when rows with disjoint supports are mixed; a floor of -1e5 lost 2e-3 there.
LOGP_FLOOR = -1e3


def check_logps(fn: str, support: Tensor | None = None, **logps: Tensor) -> None:
    """Raise a ValueError unless every `logps` value is a floating tensor of one shape (..., V), V >= 1, all on one
    device, and `support` (if given) a bool tensor of that shape and device. Reads no values (no host sync)."""
    first_name, first = next(iter(logps.items()))
    for name, x in logps.items():
        if not isinstance(x, Tensor):
            raise ValueError(f"{fn}: {name} must be a torch.Tensor of log-probs (..., V), got {type(x).__name__}")
        if not x.is_floating_point():
            raise ValueError(f"{fn}: {name} has dtype {x.dtype}: pass float log-probs (logits.float().log_softmax(-1))")
        if x.dim() < 1 or x.shape[-1] < 1:
            raise ValueError(f"{fn}: {name} has shape {tuple(x.shape)}: expected (B, V) log-probs with V >= 1")
        if x.shape != first.shape:
            raise ValueError(
                f"{fn}: {name} has shape {tuple(x.shape)} but {first_name} {tuple(first.shape)}: both must cover "
                "one batch and one vocabulary (cut padded logits to the shared tokenizer size first)"
            )
        if x.device != first.device:
            raise ValueError(f"{fn}: {name} is on {x.device} but {first_name} on {first.device}: use one device")
    if support is None:
        return
    if not isinstance(support, Tensor) or support.dtype != torch.bool:
        what = support.dtype if isinstance(support, Tensor) else type(support).__name__
        raise ValueError(f"{fn}: support must be a bool tensor (e.g. teacher_top_p_support(...)) or None, got {what}")
    if support.shape != first.shape or support.device != first.device:
        raise ValueError(
            f"{fn}: support has shape {tuple(support.shape)} on {support.device} but {first_name} "
            f"{tuple(first.shape)} on {first.device}: build the support from the same rows"
        )


def invalid_rows(logp: Tensor) -> Tensor:
    """(...,) bool: rows of `logp` (..., V) that are not log-probs of a distribution: a NaN or +inf anywhere, or no
    finite entry. Branch-free and sync-free; callers turn such rows into NaN outputs."""
    return ~(logp < float("inf")).all(dim=-1) | ~(logp > float("-inf")).any(dim=-1)


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
    same q (the renormalisation constants cancel), so the inputs need not be restricted already.
    Rows that are not distributions (see `invalid_rows`), NaN alphas and empty supports give NaN rows; alpha outside
    [0, 1] is not checked (that would read values on the host)."""
    check_logps("mix_logprobs", support, logp_policy=logp_policy, logp_teacher=logp_teacher)
    _check_alpha(alpha, logp_policy)
    a = alpha.to(logp_policy.dtype).unsqueeze(-1)  # (B, 1)
    mixed = (1 - a) * logp_policy.clamp_min(LOGP_FLOOR) + a * logp_teacher.clamp_min(LOGP_FLOOR)  # (B, V)
    if support is not None:
        mixed = mixed.masked_fill(~support, float("-inf"))  # (B, V)
    bad = invalid_rows(logp_policy) | invalid_rows(logp_teacher)  # (B,) flooring would hide these rows
    mixed = mixed.masked_fill(bad.unsqueeze(-1), float("nan"))  # (B, V)
    return mixed - mixed.logsumexp(dim=-1, keepdim=True)  # (B, V)


def _check_alpha(alpha: Tensor, logp: Tensor) -> None:
    if not isinstance(alpha, Tensor) or not alpha.is_floating_point():
        what = alpha.dtype if isinstance(alpha, Tensor) else type(alpha).__name__
        raise ValueError(f"mix_logprobs: alpha must be a float tensor of shape {tuple(logp.shape[:-1])}, got {what}")
    if alpha.shape != logp.shape[:-1] or alpha.device != logp.device:
        raise ValueError(
            f"mix_logprobs: alpha has shape {tuple(alpha.shape)} on {alpha.device} but the log-probs "
            f"{tuple(logp.shape)} on {logp.device}: pass one alpha per row, e.g. solve_alpha(...)"
        )


def teacher_top_p_support(logp_teacher: Tensor, top_p: float) -> Tensor:
    """The teacher's top-p set: the smallest set of tokens whose teacher probability sums to >= top_p.
    Always holds at least the teacher's most likely token; ties are broken by token id order of the sort.
    logp_teacher: (B, V) log-probs; top_p in (0, 1]. Returns (B, V) bool. A row that is not a distribution gets an
    arbitrary support (`solve_alpha` and `mix_logprobs` turn that row into NaN)."""
    check_logps("teacher_top_p_support", logp_teacher=logp_teacher)
    if isinstance(top_p, bool) or not isinstance(top_p, int | float) or not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {top_p!r}; use 1.0 (or no constraint) for the full vocabulary")
    if top_p >= 1.0:
        return torch.ones_like(logp_teacher, dtype=torch.bool)  # (B, V)
    sorted_logp, order = logp_teacher.sort(dim=-1, descending=True)  # (B, V), (B, V)
    probs = sorted_logp.exp()  # (B, V)
    mass_before = probs.cumsum(dim=-1) - probs  # (B, V) exclusive prefix sum
    keep_sorted = mass_before < top_p  # (B, V); position 0 always kept (mass_before = 0)
    return torch.zeros_like(keep_sorted).scatter(-1, order, keep_sorted)  # (B, V)
