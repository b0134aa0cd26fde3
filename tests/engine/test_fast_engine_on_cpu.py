"""The fast path's static-cache Qwen3 forward and engine loop on CPU (torch twins of the kernels, no graphs),
against full HF forward passes."""

import math

import pytest
import torch
from transformers import Qwen3Config, Qwen3ForCausalLM

from recipe.optimal_sampling import SamplerConfig
from recipe.optimal_sampling.core import mix_logprobs, teacher_top_p_support
from recipe.optimal_sampling.engine.fast.engine import FastDualEngine, bucket_for
from recipe.optimal_sampling.engine.fast.model import StaticQwen3, unsupported_reason


def tiny_fast_qwen3(seed: int, vocab_size: int = 64, sharpness: float = 6.0, dtype=torch.float32, device="cpu"):
    """A 2-layer Qwen3 (hidden 64, 4 query heads, 2 KV heads, head_dim 16), output head scaled by `sharpness`."""
    torch.manual_seed(seed)
    config = Qwen3Config(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=512,
        tie_word_embeddings=False,
    )
    model = Qwen3ForCausalLM(config).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(sharpness)
        for layer in model.model.layers:  # non-trivial norm weights, so that a mixed-up weight shows
            for norm in (layer.input_layernorm, layer.post_attention_layernorm, layer.self_attn.q_norm):
                norm.weight.uniform_(0.5, 1.5)
    return model.to(device=device, dtype=dtype)


V = 64
POLICY_PROMPTS = [[1, 2, 3], [4, 5, 6, 7, 8, 9, 10, 11], [12]]
TEACHER_PROMPTS = [[13, 14], [15], [16, 17, 18, 19, 20, 21, 22, 23, 24, 25]]


@pytest.fixture(scope="module")
def models():
    return tiny_fast_qwen3(0, V), tiny_fast_qwen3(1, V)


def full_logp(model, prompt, tokens, temperature=1.0):
    with torch.no_grad():
        logits = model(torch.tensor([prompt + tokens])).logits[0].float()  # (L, V)
    return (logits[len(prompt) - 1 : len(prompt) - 1 + len(tokens)] / temperature).log_softmax(-1)  # (T, V)


def test_static_forward_matches_hf(models):
    policy = models[0]
    static = StaticQwen3(policy, V, use_triton=False)
    static.allocate(batch=3, seq=32)
    logits = torch.empty(3, V)
    lengths = static.prefill(POLICY_PROMPTS, logits)
    for i, p in enumerate(POLICY_PROMPTS):
        with torch.no_grad():
            ref = policy(torch.tensor([p])).logits[0, -1]
        torch.testing.assert_close(logits[i], ref, atol=1e-4, rtol=1e-4)
    # decode two tokens per row at each row's own position
    for t in (7, 9):
        static.decode(torch.tensor([t, t, t]), lengths, logits)
        for i, p in enumerate(POLICY_PROMPTS):
            p.append(t)
            with torch.no_grad():
                ref = policy(torch.tensor([p])).logits[0, -1]
            torch.testing.assert_close(logits[i], ref, atol=1e-4, rtol=1e-4)
        lengths = lengths + 1
    for p in POLICY_PROMPTS:
        del p[-2:]


@pytest.mark.parametrize("preset", ["balanced", "exploratory"])
def test_engine_traces_equal_a_full_forward_pass(models, preset):
    policy, teacher = models
    cfg = SamplerConfig.preset(preset, temperature=0.8)
    engine = FastDualEngine(policy, teacher, V, use_graphs=False)
    out = engine.generate(POLICY_PROMPTS, TEACHER_PROMPTS, 10, seed=0, config=cfg)
    for i, tokens in enumerate(out.token_ids):
        assert len(tokens) == 10 and out.finish_reasons[i] == "length"
        lp, lt = full_logp(policy, POLICY_PROMPTS[i], tokens, 0.8), full_logp(teacher, TEACHER_PROMPTS[i], tokens, 0.8)
        idx = torch.tensor(tokens)[:, None]
        torch.testing.assert_close(torch.tensor(out.logp_policy[i]), lp.gather(-1, idx)[:, 0], atol=1e-4, rtol=0)
        torch.testing.assert_close(torch.tensor(out.logp_teacher[i]), lt.gather(-1, idx)[:, 0], atol=1e-4, rtol=0)
        support = None if cfg.teacher_top_p is None else teacher_top_p_support(lt, cfg.teacher_top_p)
        logq = mix_logprobs(lp, lt, torch.tensor(out.alpha[i]), support)
        torch.testing.assert_close(torch.tensor(out.logp_q[i]), logq.gather(-1, idx)[:, 0], atol=1e-4, rtol=0)
        assert out.forced[i][0] == (cfg.force_teacher_tokens > 0)


def test_engine_stops_rows_independently(models):
    cfg = SamplerConfig(stop_token_ids=(5, 17, 33))
    engine = FastDualEngine(*models, V, use_graphs=False, check_every=2)
    out = engine.generate(POLICY_PROMPTS * 3, TEACHER_PROMPTS * 3, 16, seed=4, config=cfg)
    assert "stop" in out.finish_reasons
    for tokens, reason in zip(out.token_ids, out.finish_reasons, strict=True):
        if reason == "stop":
            assert tokens[-1] in cfg.stop_token_ids and not set(tokens[:-1]) & set(cfg.stop_token_ids)
        else:
            assert len(tokens) == 16


def test_buckets_and_unsupported_models():
    assert [bucket_for(b) for b in (1, 3, 64, 65, 256, 300)] == [1, 4, 64, 128, 256, 512]
    from tests.tiny_models import tiny_qwen3

    assert "head_dim" in unsupported_reason(tiny_qwen3(0, 32))  # head_dim 8
    with pytest.raises(ValueError, match="backend='reference'"):
        StaticQwen3(tiny_qwen3(0, 32), 32, use_triton=False)


def check_policy_only(out, policy, prompts, temperature: float, atol: float) -> None:
    """A policy-only decode: log q* = log pi_theta of a full forward pass at each sampled token, alpha 0, nothing
    forced, and the teacher's traces NaN (not computed)."""
    for i, tokens in enumerate(out.token_ids):
        idx = torch.tensor(tokens)[:, None]
        lp = full_logp(policy, prompts[i], tokens, temperature).gather(-1, idx)[:, 0]
        torch.testing.assert_close(torch.tensor(out.logp_policy[i]), lp, atol=atol, rtol=0)
        torch.testing.assert_close(torch.tensor(out.logp_q[i]), torch.tensor(out.logp_policy[i]), atol=1e-5, rtol=0)
        assert set(out.alpha[i]) == {0.0} and not any(out.forced[i])
        for trace in (out.logp_teacher[i], out.diagnostics["kl_q_teacher"][i], out.diagnostics["ess_teacher"][i]):
            assert all(math.isnan(x) for x in trace)


def test_engine_policy_only_decode_runs_the_policy_alone(models):
    """mode "policy": the teacher's model is never prefilled or decoded (spied), and a dual decode afterwards still
    equals a full forward pass of both models (the teacher's stale cache is refilled)."""
    from recipe.optimal_sampling.engine.policy_only import policy_only_config

    policy, teacher = models
    engine = FastDualEngine(policy, teacher, V, use_graphs=False)
    calls = []
    for name in ("prefill", "decode"):
        real = getattr(engine.models[1], name)
        setattr(engine.models[1], name, lambda *a, _real=real, _name=name: calls.append(_name) or _real(*a))
    cfg = policy_only_config(0.8, stop_token_ids=(5, 17, 33))
    out = engine.generate(POLICY_PROMPTS * 2, None, 12, seed=3, config=cfg, mode="policy")
    assert calls == [] and len(out.token_ids) == 6
    check_policy_only(out, policy, POLICY_PROMPTS * 2, 0.8, atol=1e-4)
    dual = engine.generate(POLICY_PROMPTS, TEACHER_PROMPTS, 6, seed=0, config=SamplerConfig.preset("exploratory"))
    assert calls and calls[0] == "prefill"
    for i, tokens in enumerate(dual.token_ids):
        lt = full_logp(teacher, TEACHER_PROMPTS[i], tokens).gather(-1, torch.tensor(tokens)[:, None])[:, 0]
        torch.testing.assert_close(torch.tensor(dual.logp_teacher[i]), lt, atol=1e-4, rtol=0)


def test_engine_policy_only_decode_draws_the_reference_loops_samples(models):
    """Same seed and prompts: the engine's eager policy-only path and the reference loop (`generate_policy_only`)
    sample with the same generator from logits equal to 1e-4, so their tokens agree (4 rows: a full bucket, as
    padding rows would draw from the generator too)."""
    from recipe.optimal_sampling.engine.policy_only import generate_policy_only, policy_only_config

    policy, teacher = models
    engine = FastDualEngine(policy, teacher, V, use_graphs=False)
    prompts, config = [*POLICY_PROMPTS, [20, 21]], policy_only_config(1.0, ())
    for seed in range(3):
        got = engine.generate(prompts, None, 10, seed=seed, config=config, mode="policy")
        want = generate_policy_only(policy, V, prompts, 10, seed, stop_token_ids=())
        assert got.token_ids == want.token_ids, seed
        torch.testing.assert_close(torch.tensor(got.logp_q), torch.tensor(want.logp_q), atol=1e-4, rtol=0)


def test_engine_greedy_mode_is_the_reference_loops_argmax(models):
    """mode "greedy" (policy-only validation at temperature 0): the argmax continuation of the reference loop, with
    its point-mass record (log q* = 0, support 1, log pi at the argmax) and stops per row."""
    from recipe.optimal_sampling.engine.policy_only import generate_policy_only, policy_only_config

    policy, teacher = models
    engine = FastDualEngine(policy, teacher, V, use_graphs=False)
    stops = (5, 17, 33)
    got = engine.generate(POLICY_PROMPTS, None, 12, seed=0, config=policy_only_config(0, stops), mode="greedy")
    want = generate_policy_only(policy, V, POLICY_PROMPTS, 12, seed=1, stop_token_ids=stops, temperature=0.0)
    assert got.token_ids == want.token_ids and got.finish_reasons == want.finish_reasons
    for name in ("logp_q", "logp_policy", "alpha"):
        torch.testing.assert_close(
            torch.tensor(sum(getattr(got, name), [])), torch.tensor(sum(getattr(want, name), []))
        )
    assert got.support_size == want.support_size and {x for row in got.support_size for x in row} == {1}
    assert all(math.isnan(x) for row in got.logp_teacher for x in row)
    with pytest.raises(ValueError, match="mode must be one of"):
        engine.generate(POLICY_PROMPTS, None, 4, seed=0, config=policy_only_config(1, ()), mode="teacher")


@pytest.mark.parametrize("temperature", [-0.5, float("nan"), True, "0"])
def test_policy_only_sampling_refuses_a_bad_temperature(models, temperature):
    from recipe.optimal_sampling import DualSampler

    sampler = DualSampler(*models, SamplerConfig())
    with pytest.raises(ValueError, match="temperature must be a number >= 0"):
        sampler.generate_policy_only(POLICY_PROMPTS, 4, seed=0, temperature=temperature)
