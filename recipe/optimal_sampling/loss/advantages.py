"""Advantages of a GRPO batch whose groups may hold guided responses (sampled from q* with the teacher) next to the
policy's own: the per-response advantage modes, the group baselines and the teacher's dense per-token critic term.

Owns the maths only. Pure tensor functions: any dtype and device, no host syncs, no data-dependent Python branching
(the string arguments are configuration). Knows nothing about how the samples were drawn, configs, verl or trainers.

Groups are given as int64 ids in [0, B) per row (e.g. the inverse of `np.unique` over verl's `uid`s); a group's
statistics are scattered into a (B,) table so that no host sync is needed to count the groups.
"""

import torch
from torch import Tensor

MODES = ("grpo", "positive_only", "imitation")
BASELINES = ("group", "policy")


def group_stats(scores: Tensor, group: Tensor, members: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Mean, unbiased std and count of `scores` over the `members` of each row's group, read back per row.
    scores: (B,) float; group: (B,) int64 ids in [0, B); members: (B,) bool. Returns three (B,) tensors; a group with
    no member gets mean 0, one member std 0 (torch.std would give NaN)."""
    assert scores.shape == group.shape == members.shape, f"{scores.shape=} {group.shape=} {members.shape=}"
    w = members.to(scores.dtype)  # (B,)
    count = torch.zeros_like(scores).index_add_(0, group, w)  # (B,) per group id
    total = torch.zeros_like(scores).index_add_(0, group, scores * w)  # (B,)
    mean = total / count.clamp_min(1)  # (B,) per group id
    dev = (scores - mean[group]) ** 2 * w  # (B,) per row
    var = torch.zeros_like(scores).index_add_(0, group, dev) / (count - 1).clamp_min(1)  # (B,) per group id
    return mean[group], var.sqrt()[group], count[group]


def guided_advantages(
    scores: Tensor,
    group: Tensor,
    guided: Tensor,
    mode: str = "grpo",
    baseline: str = "group",
    norm_by_std: bool = True,
    eps: float = 1e-6,
    imitation_value: float | None = None,
) -> Tensor:
    """One advantage per response. scores: (B,) rewards R; group: (B,) int64 group ids; guided: (B,) bool, True for
    responses sampled with the teacher. Returns (B,), in the dtype of `scores`.

    Baseline b and scale s of a row's group (verl's GRPO: b = mean, s = std over all members; a one-member group
    gets b = 0, s = 1):
    - `group`: over all members (verl's GRPO);
    - `policy`: b = mean over the group's unguided members only (the policy's own success rate), s = std over all
      members. A group without an unguided member falls back to `group`. The scale stays the whole group's because
      a policy-only std is 0 exactly where guidance matters (every policy member failed) and would divide by eps.
    A = (R - b) / (s + eps), or R - b without `norm_by_std` (Dr. GRPO). Then on guided rows only:
    - `grpo`: unchanged;
    - `positive_only`: max(A, 0): a failed guided sample is not pushed away;
    - `imitation`: reward-filtered imitation: `imitation_value` (or R when None) where R > 0 (a correct sample),
      else 0. Unguided rows keep A."""
    assert mode in MODES and baseline in BASELINES, f"{mode=} {baseline=}"
    everyone = torch.ones_like(guided, dtype=torch.bool)  # (B,)
    mean_all, std_all, n_all = group_stats(scores, group, everyone)  # (B,) each
    single = n_all <= 1  # (B,)
    mean = torch.where(single, torch.zeros_like(mean_all), mean_all)  # (B,)
    scale = torch.where(single, torch.ones_like(std_all), std_all)  # (B,)
    if baseline == "policy":
        mean_policy, _, n_policy = group_stats(scores, group, ~guided.bool())  # (B,) each
        mean = torch.where(n_policy > 0, mean_policy, mean)  # (B,)
    adv = scores - mean  # (B,)
    if norm_by_std:
        adv = adv / (scale + eps)  # (B,)
    if mode == "positive_only":
        adv = torch.where(guided.bool(), adv.clamp_min(0), adv)  # (B,)
    elif mode == "imitation":
        target = scores if imitation_value is None else torch.full_like(scores, imitation_value)  # (B,)
        imitate = torch.where(scores > 0, target, torch.zeros_like(scores))  # (B,)
        adv = torch.where(guided.bool(), imitate, adv)  # (B,)
    return adv


def teacher_critic(logp_teacher: Tensor, logp_policy: Tensor, mask: Tensor, clip: float | None = None) -> Tensor:
    """The teacher as a dense critic (on-policy distillation's per-token reward, discount 0):
    c_t = log pi_t(y_t) - log pi_theta(y_t). logp_teacher, logp_policy, mask: (B, T). Returns (B, T), 0 off the mask
    and where the teacher gave no score (NaN: a policy-only row the teacher did not score); clipped to [-clip, clip]
    when `clip` is set, and -inf (a token the teacher rules out) becomes -clip, or 0 without a clip."""
    ell = logp_teacher.float() - logp_policy.float()  # (B, T)
    if clip is not None:
        ell = ell.clamp(-clip, clip)  # (B, T); NaN stays NaN
    keep = torch.isfinite(ell) & mask.bool()  # (B, T)
    return torch.where(keep, ell, torch.zeros_like(ell))  # (B, T): never 0 * NaN


def token_advantages(
    response_adv: Tensor, mask: Tensor, critic: Tensor | None = None, coef: float = 0.0, rows: Tensor | None = None
) -> Tensor:
    """Per-token advantage A_t = A_i + coef * c_t on the response tokens. response_adv: (B,); mask: (B, T);
    critic: (B, T) from `teacher_critic` or None; rows: (B,) bool, the rows that get the critic (None = all).
    verl multiplies the whole A_t by the truncated IS weight min(pi_old/q*, C) in the loss, so the critic term on q*
    tokens is importance-weighted like the rest. Returns (B, T), 0 off the mask."""
    m = mask.to(response_adv.dtype)  # (B, T)
    adv = response_adv.unsqueeze(-1) * m  # (B, T)
    if critic is None or coef == 0.0:
        return adv
    on = m if rows is None else m * rows.to(m.dtype).unsqueeze(-1)  # (B, T)
    return adv + coef * critic.to(adv.dtype) * on  # (B, T)
