"""The cuda_graph backend of DualSampler against full HF forward passes, on tiny Qwen3 models (CUDA).

float32 models: traces must equal a full forward pass of each model within 1e-4 (cuBLAS float32 without TF32,
attention dots in IEEE float32). bf16 models: within 0.05 nats (bf16 rounding inside the layers differs from HF's
in a few places, e.g. RoPE is applied in float32 and rounded once)."""

import math

import pytest
import torch

from recipe.optimal_sampling import DualSampler, SamplerConfig
from recipe.optimal_sampling.core import mix_logprobs, solve_alpha
from recipe.optimal_sampling.core.fused import logit_keys
from tests.engine.test_fast_engine_on_cpu import tiny_fast_qwen3

pytestmark = pytest.mark.gpu
V = 64
POLICY_PROMPTS = [[1, 2, 3], [4, 5, 6, 7, 8, 9, 10, 11], [12]]
TEACHER_PROMPTS = [[13, 14], [15], [16, 17, 18, 19, 20, 21, 22, 23, 24, 25]]


@pytest.fixture(scope="module")
def models():
    return tiny_fast_qwen3(0, V, device="cuda"), tiny_fast_qwen3(1, V, device="cuda")


def full_logp(model, prompt, tokens, temperature=1.0):
    with torch.no_grad():
        logits = model(torch.tensor([prompt + tokens], device="cuda")).logits[0].float()  # (L, V)
    return (logits[len(prompt) - 1 : len(prompt) - 1 + len(tokens)] / temperature).log_softmax(-1).cpu()  # (T, V)


def fused_support(lt: torch.Tensor, top_p: float) -> torch.Tensor:
    """The fused top-p set on log-probs lt (T, V): the sort-based set plus any ties at the cut (none in float32)."""
    from recipe.optimal_sampling.core import teacher_top_p_support

    ref = teacher_top_p_support(lt, top_p)
    cut = torch.where(ref, lt, float("inf")).amin(-1, keepdim=True)
    return ref | (logit_keys(lt) == logit_keys(cut))


def check_traces(out, policy, teacher, cfg, atol, policy_prompts=POLICY_PROMPTS, teacher_prompts=TEACHER_PROMPTS):
    for i, tokens in enumerate(out.token_ids):
        lp = full_logp(policy, policy_prompts[i], tokens, cfg.temperature)
        lt = full_logp(teacher, teacher_prompts[i], tokens, cfg.temperature)
        idx = torch.tensor(tokens)[:, None]
        torch.testing.assert_close(torch.tensor(out.logp_policy[i]), lp.gather(-1, idx)[:, 0], atol=atol, rtol=0)
        torch.testing.assert_close(torch.tensor(out.logp_teacher[i]), lt.gather(-1, idx)[:, 0], atol=atol, rtol=0)
        support = None if cfg.teacher_top_p is None else fused_support(lt, cfg.teacher_top_p)
        alpha = torch.tensor(out.alpha[i])
        logq = mix_logprobs(lp, lt, alpha, support)
        torch.testing.assert_close(torch.tensor(out.logp_q[i]), logq.gather(-1, idx)[:, 0], atol=atol, rtol=0)
        free = ~torch.tensor(out.forced[i])
        if atol <= 1e-4:
            torch.testing.assert_close(alpha[free], solve_alpha(lp, lt, support)[free], atol=1e-4, rtol=0)
        if support is not None:
            assert support[torch.arange(len(tokens)), idx[:, 0]].all()
            assert out.support_size[i] == support.sum(-1).tolist()


@pytest.mark.parametrize("preset", ["conservative", "balanced", "exploratory"])
def test_traces_equal_a_full_forward_pass_of_each_model(models, preset):
    cfg = SamplerConfig.preset(preset, temperature=0.8)
    sampler = DualSampler(*models, cfg, backend="cuda_graph")
    assert sampler.backend == "cuda_graph"
    out = sampler.generate(POLICY_PROMPTS, TEACHER_PROMPTS, max_new_tokens=12, seed=0)
    assert [len(t) for t in out.token_ids] == [12, 12, 12] and set(out.finish_reasons) == {"length"}
    check_traces(out, *models, cfg, atol=1e-4)


def test_forcing_constraint_and_stops(models):
    cfg = SamplerConfig(force_teacher_tokens=2, teacher_top_p=0.6, stop_token_ids=(5, 17, 33))
    sampler = DualSampler(*models, cfg, backend="cuda_graph")
    prompts_p, prompts_t = POLICY_PROMPTS * 4, TEACHER_PROMPTS * 4  # 12 rows: bucket 16, 4 padding rows
    out = sampler.generate(prompts_p, prompts_t, max_new_tokens=20, seed=3)
    assert "stop" in out.finish_reasons
    for i, (tokens, reason) in enumerate(zip(out.token_ids, out.finish_reasons, strict=True)):
        assert out.forced[i][:2] == [True, True][: len(tokens)] and not any(out.forced[i][2:])
        assert out.alpha[i][: min(2, len(tokens))] == [1.0] * min(2, len(tokens))
        if reason == "stop":
            assert tokens[-1] in cfg.stop_token_ids and not set(tokens[:-1]) & set(cfg.stop_token_ids)
        else:
            assert len(tokens) == 20 and not set(tokens) & set(cfg.stop_token_ids)
    check_traces(out, *models, cfg, atol=1e-4, policy_prompts=prompts_p, teacher_prompts=prompts_t)


def test_graphs_are_reused_and_seeds_reproduce(models):
    sampler = DualSampler(*models, SamplerConfig.preset("exploratory"), backend="cuda_graph")
    a = sampler.generate(POLICY_PROMPTS, TEACHER_PROMPTS, 8, seed=7)
    engine = sampler._fast_engine()
    captured = dict(engine.warmup_seconds)
    b = sampler.generate(POLICY_PROMPTS, TEACHER_PROMPTS, 8, seed=7)
    c = sampler.generate(POLICY_PROMPTS[::-1], TEACHER_PROMPTS[::-1], 8, seed=8)
    assert engine.warmup_seconds == captured  # same bucket and config: no new capture
    assert a.token_ids == b.token_ids and a.logp_q == b.logp_q
    assert a.token_ids != c.token_ids
    assert all(s < 20 for s in captured.values()), captured


def test_bf16_models_decode_close_to_hf():
    policy, teacher = (
        tiny_fast_qwen3(0, V, dtype=torch.bfloat16, device="cuda"),
        tiny_fast_qwen3(1, V, dtype=torch.bfloat16, device="cuda"),
    )
    cfg = SamplerConfig.preset("balanced")
    out = DualSampler(policy, teacher, cfg, backend="cuda_graph").generate(POLICY_PROMPTS, TEACHER_PROMPTS, 10, seed=0)
    for i, tokens in enumerate(out.token_ids):
        lp = full_logp(policy, POLICY_PROMPTS[i], tokens)
        idx = torch.tensor(tokens)[:, None]
        torch.testing.assert_close(torch.tensor(out.logp_policy[i]), lp.gather(-1, idx)[:, 0], atol=0.05, rtol=0)


def test_too_large_a_batch_fails_early_naming_the_memory(models):
    from recipe.optimal_sampling.engine.fast.engine import FastDualEngine

    engine = FastDualEngine(*models, V)
    with pytest.raises(MemoryError, match="GiB"):
        engine.reserve(4096, 10**7, 8)
    assert engine.state is None


def test_policy_only_decode_has_its_own_graphs_and_skips_the_teacher(models):
    """DualSampler.generate_policy_only on the cuda_graph backend: the teacher's model is never prefilled or decoded
    (spied, capture included), log q* = log pi_theta of a full forward pass, alpha 0, teacher traces NaN, seeds
    reproduce; at temperature 0 the argmax continuation of full forward passes; and a dual decode on the same engine
    afterwards still matches both models."""
    policy, teacher = models
    sampler = DualSampler(*models, SamplerConfig.preset("balanced", temperature=0.8), backend="cuda_graph")
    engine = sampler._fast_engine()
    calls = []
    for name in ("prefill", "decode"):
        real = getattr(engine.models[1], name)
        setattr(engine.models[1], name, lambda *a, _real=real, _name=name: calls.append(_name) or _real(*a))
    prompts = POLICY_PROMPTS * 4  # 12 rows: bucket 16
    out = sampler.generate_policy_only(prompts, 12, seed=5)
    assert calls == [] and {key[2] for key in engine.graphs} == {"policy"}
    for i, tokens in enumerate(out.token_ids):
        idx = torch.tensor(tokens)[:, None]
        lp = full_logp(policy, prompts[i], tokens, 0.8).gather(-1, idx)[:, 0]
        torch.testing.assert_close(torch.tensor(out.logp_policy[i]), lp, atol=1e-4, rtol=0)
        torch.testing.assert_close(torch.tensor(out.logp_q[i]), lp, atol=1e-4, rtol=0)
        assert set(out.alpha[i]) == {0.0} and all(math.isnan(x) for x in out.logp_teacher[i])
    again = sampler.generate_policy_only(prompts, 12, seed=5)
    assert again.token_ids == out.token_ids and again.logp_q == out.logp_q
    greedy = sampler.generate_policy_only(prompts, 12, seed=0, temperature=0)
    for i, tokens in enumerate(greedy.token_ids):  # the argmax continuation of full forward passes
        ids = list(prompts[i])
        for t in tokens:
            with torch.no_grad():
                assert t == int(policy(torch.tensor([ids], device="cuda")).logits[0, -1].argmax())
            ids.append(t)
        assert set(greedy.logp_q[i]) == {0.0} and set(greedy.support_size[i]) == {1}
    assert calls == []
    dual = sampler.generate(POLICY_PROMPTS, TEACHER_PROMPTS, 12, seed=0)
    check_traces(dual, *models, sampler.config, atol=1e-4)
    assert {key[2] for key in engine.graphs} == {"policy", "greedy", "dual"}
