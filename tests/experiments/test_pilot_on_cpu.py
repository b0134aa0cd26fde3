"""scripts/experiments/pilot_cpu.py: the trainer-side log-probs of the sampled responses are the sampler's own
traces, and one GRPO step on policy samples has importance weights 1 and moves the policy."""

import importlib.util
from pathlib import Path

import torch

from recipe.optimal_sampling.engine import DualSampler
from recipe.optimal_sampling.tasks import build_tokenizer, make_problems, stop_token_ids
from tests.tiny_models import tiny_qwen3

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "experiments" / "pilot_cpu.py"


def load_script():
    spec = importlib.util.spec_from_file_location("pilot_cpu", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


pilot = load_script()


def tiny_pair(arm: str):
    tok = build_tokenizer()
    policy, teacher = tiny_qwen3(0, len(tok), sharpness=4.0), tiny_qwen3(1, len(tok), sharpness=4.0)
    config = pilot.ARMS[arm].replace(stop_token_ids=tuple(stop_token_ids(tok)))
    return tok, policy, DualSampler(policy, teacher, config, tokenizer=tok, teacher_tokenizer=tok)


def test_response_logprobs_are_the_samplers_policy_traces():
    tok, policy, sampler = tiny_pair("balanced")
    prompts = [[5, 6, 7], [8], [9, 10, 11, 12]]
    sample = sampler.generate(prompts, [[3, 4]] * 3, max_new_tokens=6, seed=0)
    with torch.no_grad():
        logp, _ = pilot.response_logprobs(policy, prompts, sample.token_ids)  # (B, T)
    for i, row in enumerate(sample.logp_policy):
        torch.testing.assert_close(logp[i, : len(row)], torch.tensor(row), atol=1e-5, rtol=0)
        assert (logp[i, len(row) :] == 0).all()


def test_one_grpo_step_on_policy_samples_has_unit_weights_and_updates_the_policy():
    tok, policy, sampler = tiny_pair("on_policy")
    before = [p.detach().clone() for p in policy.parameters()]
    optimizer = torch.optim.AdamW(policy.parameters(), lr=1e-3, weight_decay=0.01)
    problems = make_problems(4, seed=0, split="train")
    out = pilot.grpo_step(policy, optimizer, (sampler, sampler), tok, problems, n=4, seed=0, threshold=2.0)
    assert abs(out["is_weight_mean"] - 1.0) < 1e-4  # q* = pi_theta: w = pi_old / q* = 1
    assert 0.0 <= out["train_reward"] <= 1.0
    # random models rarely answer right: with all-zero rewards every advantage is 0 and only weight decay acts
    assert any(not torch.equal(a, b) for a, b in zip(before, policy.parameters(), strict=True))


def test_a_mixed_group_takes_its_first_k_responses_from_q_star():
    """k = 1 of n = 4: the q* sampler answers one response per prompt, the policy-only sampler the other three."""
    tok, policy, sampler = tiny_pair("mixed_1of8")
    policy_only = DualSampler(
        policy, sampler.teacher, pilot.POLICY_ONLY.replace(stop_token_ids=sampler.config.stop_token_ids), tokenizer=tok
    )
    calls = []

    def recording(s):
        original = s.generate

        def generate(policy_ids, teacher_ids, max_new_tokens, seed):
            calls.append((s, len(policy_ids)))
            return original(policy_ids, teacher_ids, max_new_tokens, seed=seed)

        s.generate = generate
        return s

    optimizer = torch.optim.SGD(policy.parameters(), lr=0.0)  # keep pi_theta fixed: weights checked below
    problems = make_problems(2, seed=0, split="train")
    out = pilot.grpo_step(policy, optimizer, (recording(sampler), recording(policy_only)), tok, problems, 4, 0, 2.0, 1)
    assert calls == [(sampler, 2), (policy_only, 6)]  # one q* response per prompt, three from the policy
    assert 0.0 <= out["train_reward"] <= 1.0 and out["is_weight_mean"] <= 2.0
