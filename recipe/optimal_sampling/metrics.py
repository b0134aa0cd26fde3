"""Scalar metrics from per-token traces: `{"optimal_sampling/<name>": float}` for console, W&B and verl.

Owns the metric names. Knows nothing about loggers, verl or how the traces were produced: input is a dict of
flat per-token tensors (or lists), e.g. `DualSample.flat_traces()`.
"""

import torch
from torch import Tensor

PREFIX = "optimal_sampling/"


def reduce_metrics(traces: dict[str, Tensor | list], prefix: str = PREFIX) -> dict[str, float]:
    """Summaries over all tokens of a batch. Expected keys (flat, one entry per generated token): alpha, forced,
    support_size, kl_q_policy, kl_q_teacher, ess_policy, ess_teacher, entropy_q, logp_q, logp_policy.
    alpha statistics cover the tokens whose alpha was solved and mattered: forced tokens (alpha = 1 by definition,
    counted by forced_frac) and tokens whose support is a single token (q* is that token whatever alpha is; counted
    by single_support_frac) are left out; `kl_sym_err` is mean |KL(q||pi_theta) - KL(q||pi_t)| over those tokens, ~0 for
    kl_symmetry without a support constraint; `ess_ratio` is the geometric mean of ESS_theta / ESS_t.
    `is_weight_*` describe pi_theta(y)/q*(y), the raw importance weight. When no token is free (all forced or
    single-support), the alpha statistics and kl_sym_err are undefined and absent from the result."""
    t = {k: torch.as_tensor(v).flatten() for k, v in traces.items()}
    if t["alpha"].numel() == 0:
        return {}
    forced = t["forced"].bool()  # (N,)
    single = t["support_size"] <= 1  # (N,)
    free = ~forced & ~single  # (N,)
    log_w = t["logp_policy"].double() - t["logp_q"].double()  # (N,)
    log_ess_ratio = t["ess_policy"].double().log() - t["ess_teacher"].double().log()  # (N,)
    out = {
        **_free_token_stats(t, free),
        "forced_frac": forced.double().mean(),
        "single_support_frac": single.double().mean(),
        "support_size_mean": t["support_size"].double().mean(),
        "kl_q_policy": t["kl_q_policy"].double().mean(),
        "kl_q_teacher": t["kl_q_teacher"].double().mean(),
        "ess_policy": t["ess_policy"].double().mean(),
        "ess_teacher": t["ess_teacher"].double().mean(),
        "ess_ratio": log_ess_ratio.mean().exp(),  # geometric mean of ESS_theta / ESS_t: 1 = balanced
        "entropy_q": t["entropy_q"].double().mean(),
        "is_weight_mean": log_w.exp().mean(),
        "is_weight_max": log_w.exp().max(),
        "num_tokens": float(t["alpha"].numel()),
    }
    return {prefix + k: float(v) for k, v in out.items()}


def _free_token_stats(t: dict[str, Tensor], free: Tensor) -> dict[str, Tensor]:
    """alpha_mean/std/p10/p50/p90 and kl_sym_err over the free tokens (free: (N,) bool). With no free token they
    are undefined and left out (not 0, not the average over forced tokens): loggers show a gap for that step."""
    if not free.any():
        return {}
    alpha = t["alpha"].double()[free]  # (N_free,)
    p10, p50, p90 = torch.quantile(alpha, torch.tensor([0.1, 0.5, 0.9], dtype=torch.float64))
    kl_gap = (t["kl_q_policy"].double() - t["kl_q_teacher"].double()).abs()  # (N,)
    return {
        "alpha_mean": alpha.mean(),
        "alpha_std": alpha.std(unbiased=False),
        "alpha_p10": p10,
        "alpha_p50": p50,
        "alpha_p90": p90,
        "kl_sym_err": kl_gap[free].mean(),
    }
