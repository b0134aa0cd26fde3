"""Sampling from the policy alone, without running the teacher: the on-policy members of a mixed group, on-policy
GRPO through the dual backend, and policy-only validation (greedy).

q* = pi_theta when the config ignores the teacher (alpha fixed at 0, no forcing, no support constraint):
`POLICY_ONLY`. `generate_policy_only` is `DualSampler.generate`'s reference loop on one model; `sample_step` gets
the policy's logits in the teacher's slot, where alpha = 0 multiplies them by 0, so the samples equal those of a
two-model decode under POLICY_ONLY with the same seed. The cuda_graph backend does the same inside its graphs
(`FastDualEngine.generate(mode="policy" | "greedy")`); `DualSampler.generate_policy_only` picks the path. Teacher
traces are NaN (not computed).
"""

import torch

from .checks import non_finite_rows, raise_non_finite
from .config import SamplerConfig
from .sampler import TEACHER_FIELDS, DualSample, _assemble, _decode, _prefill
from .step import sample_step

POLICY_ONLY = SamplerConfig(alpha_method="fixed", fixed_alpha=0.0, force_teacher_tokens=0, teacher_top_p=None)
TEACHER_DIAGNOSTICS = tuple(k for k in TEACHER_FIELDS if k != "logp_teacher")  # NaN: the teacher was not run


def ignores_teacher(config: SamplerConfig) -> bool:
    """True when q* = pi_theta whatever the teacher says: alpha fixed at 0, no forcing, no support constraint."""
    return (
        config.alpha_method == "fixed"
        and config.fixed_alpha == 0.0
        and config.force_teacher_tokens == 0
        and config.teacher_top_p is None
    )


def policy_only_config(temperature: float, stop_token_ids) -> SamplerConfig:
    """POLICY_ONLY at a sampling temperature (0, greedy, keeps 1.0 in the config: the argmax needs none)."""
    return POLICY_ONLY.replace(temperature=temperature or 1.0, stop_token_ids=tuple(stop_token_ids))


@torch.no_grad()
def generate_policy_only(
    policy,
    vocab_size: int,
    prompt_ids: list[list[int]],
    max_new_tokens: int,
    seed: int,
    stop_token_ids: tuple[int, ...],
    temperature: float = 1.0,
) -> DualSample:
    """The reference loop on the policy alone (any device). temperature 0 = greedy (logp_q = 0: a point mass)."""
    config = policy_only_config(temperature, stop_token_ids)
    device = next(policy.parameters()).device
    generator = torch.Generator(device).manual_seed(seed)
    stop_ids = torch.tensor(config.stop_token_ids, dtype=torch.long, device=device)
    # 1) prefill the policy's cache
    state = _prefill(policy, prompt_ids, device)
    finished = torch.zeros(len(prompt_ids), dtype=torch.bool, device=device)  # (B,)
    records = []
    for step in range(max_new_tokens):
        # 2) one token from pi_theta (or its argmax)
        logits = state.logits[:, :vocab_size]  # (B, V)
        bad = non_finite_rows(logits)  # (B,)
        record = _without_teacher(sample_step(logits, logits, step, config, generator))
        if temperature == 0:
            record = _greedy(record, logits)
        record.token = torch.where(finished, torch.zeros_like(record.token), record.token)  # (B,)
        records.append(record)
        finished = finished | torch.isin(record.token, stop_ids)  # (B,)
        done, bad_any = torch.stack([finished.all(), bad.any()]).tolist()  # one host read per step
        raise_non_finite([bad_any, False], [bad, bad], step)
        if step + 1 == max_new_tokens or done:
            break
        # 3) the policy reads the token; finished rows are fed a pad token that their mask hides
        _decode(policy, state, record.token, ~finished)
    # 4) cut at stop tokens and convert to lists
    return _assemble(records, config.stop_token_ids)


def _without_teacher(record):
    """The record's teacher-dependent entries were computed against the policy: mark them not computed."""
    nan = torch.full_like(record.logp_teacher, float("nan"))  # (B,)
    record.logp_teacher = nan
    record.diagnostics = {**record.diagnostics, **{k: nan for k in TEACHER_DIAGNOSTICS}}
    return record


def _greedy(record, logits):
    """The argmax token instead of the sampled one; its behaviour log-prob is 0 (greedy decoding is a point mass)."""
    record.token = logits.argmax(dim=-1)  # (B,)
    logp = logits.float().log_softmax(dim=-1)  # (B, V)
    record.logp_policy = logp.gather(-1, record.token.unsqueeze(-1)).squeeze(-1)  # (B,)
    record.logp_q = torch.zeros_like(record.logp_policy)  # (B,)
    record.support_size = torch.ones_like(record.support_size)  # (B,)
    return record
