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
    `is_weight_*` describe pi_theta(y)/q*(y), the raw importance weight."""
    t = {k: torch.as_tensor(v).flatten() for k, v in traces.items()}
    if t["alpha"].numel() == 0:
        return {}
    forced = t["forced"].bool()  # (N,)
    single = t["support_size"] <= 1  # (N,)
    free = ~forced & ~single  # (N,)
    alpha = t["alpha"].double()[free] if free.any() else t["alpha"].double()  # (N_free,)
    q = torch.tensor([0.1, 0.5, 0.9], dtype=torch.float64)
    p10, p50, p90 = torch.quantile(alpha, q).tolist()
    kl_gap = (t["kl_q_policy"].double() - t["kl_q_teacher"].double()).abs()  # (N,)
    log_w = t["logp_policy"].double() - t["logp_q"].double()  # (N,)
    log_ess_ratio = t["ess_policy"].double().log() - t["ess_teacher"].double().log()  # (N,)
    out = {
        "alpha_mean": alpha.mean(),
        "alpha_std": alpha.std(unbiased=False),
        "alpha_p10": p10,
        "alpha_p50": p50,
        "alpha_p90": p90,
        "forced_frac": forced.double().mean(),
        "single_support_frac": single.double().mean(),
        "support_size_mean": t["support_size"].double().mean(),
        "kl_q_policy": t["kl_q_policy"].double().mean(),
        "kl_q_teacher": t["kl_q_teacher"].double().mean(),
        "kl_sym_err": kl_gap[free].mean() if free.any() else 0.0,
        "ess_policy": t["ess_policy"].double().mean(),
        "ess_teacher": t["ess_teacher"].double().mean(),
        "ess_ratio": log_ess_ratio.mean().exp(),  # geometric mean of ESS_theta / ESS_t: 1 = balanced
        "entropy_q": t["entropy_q"].double().mean(),
        "is_weight_mean": log_w.exp().mean(),
        "is_weight_max": log_w.exp().max(),
        "num_tokens": float(t["alpha"].numel()),
    }
    return {prefix + k: float(v) for k, v in out.items()}
