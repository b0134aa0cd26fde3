"""Naive float64 references for the core maths: written for clarity, not speed."""

import torch
from torch import Tensor

from recipe.optimal_sampling.core import LOGP_FLOOR


def random_logp(seed: int, B: int = 4, V: int = 11, scale: float = 2.0) -> Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, V, generator=g) * scale).log_softmax(-1)


def q_alpha64(lp: Tensor, lt: Tensor, alpha: Tensor, support: Tensor | None = None) -> Tensor:
    """log q_alpha in float64 by the textbook formula, one row at a time (log-weights shifted by their max so that
    one-hot rows do not underflow)."""
    rows = []
    for b in range(lp.shape[0]):
        p, t = lp[b].double().clamp_min(LOGP_FLOOR), lt[b].double().clamp_min(LOGP_FLOOR)
        a = float(alpha[b])
        log_w = (1 - a) * p + a * t
        if support is not None:
            log_w = torch.where(support[b], log_w, torch.full_like(log_w, float("-inf")))
        w = torch.exp(log_w - log_w.max())
        rows.append(torch.log(w / w.sum()))
    return torch.stack(rows)


def kl64(logq: Tensor, logp: Tensor) -> Tensor:
    """KL(q || p) per row in float64, 0 * log 0 = 0."""
    q = logq.double().exp()
    terms = torch.where(q > 0, q * (logq.double() - logp.double().clamp_min(LOGP_FLOOR)), torch.zeros_like(q))
    return terms.sum(-1)


def delta64(lp: Tensor, lt: Tensor, alpha: Tensor, support: Tensor | None = None) -> Tensor:
    """Delta(alpha) = KL(q_alpha || pi_theta) - KL(q_alpha || pi_t), both restricted to the support."""
    lp_s, lt_s = restrict64(lp, support), restrict64(lt, support)
    logq = q_alpha64(lp_s, lt_s, alpha, support)
    return kl64(logq, lp_s) - kl64(logq, lt_s)


def restrict64(logp: Tensor, support: Tensor | None) -> Tensor:
    if support is None:
        return logp.double()
    p = torch.where(support, logp.double().exp(), torch.zeros_like(logp, dtype=torch.float64))
    return torch.log(p / p.sum(-1, keepdim=True))


def bisect_root64(fn, B: int, iters: int = 60) -> Tensor:
    """Root of an increasing function of alpha in [0, 1] per row, by float64 bisection."""
    lo, hi = torch.zeros(B, dtype=torch.float64), torch.ones(B, dtype=torch.float64)
    for _ in range(iters):
        mid = (lo + hi) / 2
        neg = fn(mid) < 0
        lo, hi = torch.where(neg, mid, lo), torch.where(neg, hi, mid)
    return (lo + hi) / 2


def top_p_set64(logp_teacher: Tensor, top_p: float) -> Tensor:
    """Smallest set of tokens with teacher mass >= top_p, by a per-row Python loop."""
    out = torch.zeros_like(logp_teacher, dtype=torch.bool)
    for b in range(logp_teacher.shape[0]):
        probs = logp_teacher[b].double().exp()
        total = 0.0
        for idx in torch.argsort(probs, descending=True, stable=True).tolist():
            out[b, idx] = True
            total += float(probs[idx])
            if total >= top_p:
                break
    return out
