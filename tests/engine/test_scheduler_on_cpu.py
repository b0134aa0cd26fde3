"""Continuous batching (`engine.fast.scheduler`) on CPU (torch twins of the kernels, no graphs): rows that join
mid-decode against full HF forward passes, against the same request decoded alone, prefix sharing, the policy-only
modes, streaming arrivals and bad input."""

import math

import pytest
import torch

from recipe.optimal_sampling import SamplerConfig
from recipe.optimal_sampling.core import mix_logprobs, solve_alpha, teacher_top_p_support
from recipe.optimal_sampling.core.fused import fused_available
from recipe.optimal_sampling.engine.fast.engine import FastDualEngine
from recipe.optimal_sampling.engine.fast.scheduler import ContinuousBatcher, Request, request_seed
from recipe.optimal_sampling.engine.policy_only import generate_policy_only, policy_only_config
from tests.engine.test_fast_engine_on_cpu import check_policy_only, full_logp, tiny_fast_qwen3

V = 64
STOPS = (5, 17, 33)
PROMPTS = [([1, 2, 3], [13, 14]), ([4, 5, 6, 7, 8, 9, 10, 11], [15]), ([12], [16, 17, 18, 19, 20, 21, 22])]


@pytest.fixture(scope="module")
def models():
    return tiny_fast_qwen3(0, V), tiny_fast_qwen3(1, V)


def grpo_requests(n: int, lengths: list[int], seed: int = 0) -> list[Request]:
    """Groups of n responses per prompt of PROMPTS, each request with its own length cap and seed."""
    reqs = [Request(p, t, 0, 0) for p, t in PROMPTS for _ in range(n)]
    for i, r in enumerate(reqs):
        r.max_new_tokens, r.seed = lengths[i % len(lengths)], request_seed(seed, i)
    return reqs


def check_dual_traces(out, reqs, policy, teacher, cfg) -> None:
    """Every token's traces equal a full forward pass of both models over that request's own prompts; alpha is the
    solver's root on the support; the first token of every request (whenever it joined) is forced."""
    for i, r in enumerate(reqs):
        tokens = out.token_ids[i]
        assert 1 <= len(tokens) <= r.max_new_tokens
        idx = torch.tensor(tokens)[:, None]
        lp = full_logp(policy, r.policy_ids, tokens, cfg.temperature)
        lt = full_logp(teacher, r.teacher_ids, tokens, cfg.temperature)
        support = None if cfg.teacher_top_p is None else teacher_top_p_support(lt, cfg.teacher_top_p)
        alpha = torch.tensor(out.alpha[i])
        logq = mix_logprobs(lp, lt, alpha, support)
        for name, want in (("logp_policy", lp), ("logp_teacher", lt), ("logp_q", logq)):
            got = torch.tensor(getattr(out, name)[i])
            torch.testing.assert_close(got, want.gather(-1, idx)[:, 0], atol=1e-4, rtol=0, msg=f"{name} row {i}")
        forced = torch.tensor(out.forced[i])
        assert forced.tolist() == [t < cfg.force_teacher_tokens for t in range(len(tokens))]
        torch.testing.assert_close(alpha[~forced], solve_alpha(lp, lt, support)[~forced], atol=1e-4, rtol=0)
        if out.finish_reasons[i] == "stop":
            assert tokens[-1] in STOPS and not set(tokens[:-1]) & set(STOPS)
        else:
            assert len(tokens) == r.max_new_tokens and not set(tokens) & set(STOPS)


@pytest.mark.parametrize("preset", ["balanced", "exploratory"])
def test_rows_joining_mid_decode_equal_a_full_forward_pass(models, preset):
    cfg = SamplerConfig.preset(preset, temperature=0.8, stop_token_ids=STOPS)
    reqs = grpo_requests(2, [3, 11, 6, 1, 9, 4])  # 6 requests through 2 slots: 4 of them join mid-decode
    batcher = ContinuousBatcher(FastDualEngine(*models, V, use_graphs=False), slots=2, slot_len=24, check_every=2)
    out = batcher.run(reqs, cfg)
    check_dual_traces(out, reqs, *models, cfg)
    assert batcher.steps < sum(r.max_new_tokens for r in reqs)  # rows overlapped: fewer steps than one at a time


def test_a_request_samples_what_it_samples_alone(models):
    """A request's tokens and traces do not depend on its slot, its neighbours or when it ran: they equal a batch of
    one with its seed (`FastDualEngine.generate`), for any number of slots and any queue order."""
    cfg = SamplerConfig.preset("balanced", stop_token_ids=STOPS)
    engine = FastDualEngine(*models, V, use_graphs=False)
    reqs = grpo_requests(2, [7, 2, 9, 5, 3, 8], seed=3)
    alone = [engine.generate([r.policy_ids], [r.teacher_ids], r.max_new_tokens, r.seed, cfg) for r in reqs]
    for slots, order in ((1, range(6)), (2, range(6)), (4, [5, 2, 0, 4, 1, 3])):
        order = list(order)
        out = ContinuousBatcher(engine, slots=slots, slot_len=20, check_every=3).run([reqs[j] for j in order], cfg)
        for k, j in enumerate(order):
            assert out.token_ids[k] == alone[j].token_ids[0], (slots, j)
            assert out.finish_reasons[k] == alone[j].finish_reasons[0]
            for name in ("logp_q", "logp_policy", "logp_teacher", "alpha"):
                got, want = getattr(out, name)[k], getattr(alone[j], name)[0]
                torch.testing.assert_close(torch.tensor(got), torch.tensor(want), atol=1e-5, rtol=0)


def test_a_group_shares_its_prompts_prefill(models):
    """n responses of one prompt prefill it once (the others copy the KV rows and logits of a slot that holds it),
    including members that join later; the copies decode exactly (traces equal a full forward pass)."""
    cfg = SamplerConfig.preset("exploratory", stop_token_ids=STOPS)
    engine = FastDualEngine(*models, V, use_graphs=False)
    calls = []
    for model in engine.models:
        real = model.prefill
        model.prefill = lambda prompts, *a, _real=real, **k: calls.append(len(prompts)) or _real(prompts, *a, **k)
    reqs = grpo_requests(4, [2, 6, 3, 5])  # 3 prompts x 4 responses through 4 slots
    batcher = ContinuousBatcher(engine, slots=4, slot_len=24, check_every=2)
    out = batcher.run(reqs, cfg)
    assert batcher.prefilled == 3 and batcher.copied == 9 and sum(calls) == 2 * 3
    check_dual_traces(out, reqs, *models, cfg)


def test_policy_only_modes_stream_through_slots(models):
    """mode "policy": log q* = log pi_theta of a full forward pass, the teacher never runs; mode "greedy": the
    reference loop's argmax continuation of each prompt alone, whatever slot it ran in."""
    policy, teacher = models
    engine = FastDualEngine(policy, teacher, V, use_graphs=False)
    calls = []
    engine.models[1].prefill = lambda *a, **k: calls.append("prefill")
    engine.models[1].decode = lambda *a, **k: calls.append("decode")
    prompts = [p for p, _ in PROMPTS] * 2
    lengths = [9, 2, 6, 4, 7, 3]
    reqs = [Request(p, None, n, request_seed(0, i)) for i, (p, n) in enumerate(zip(prompts, lengths, strict=True))]
    batcher = ContinuousBatcher(engine, slots=2, slot_len=20, check_every=2)
    out = batcher.run(reqs, policy_only_config(0.8, STOPS), mode="policy")
    assert calls == [] and all(len(t) <= n for t, n in zip(out.token_ids, lengths, strict=True))
    check_policy_only(out, policy, prompts, 0.8, atol=1e-4)
    greedy = batcher.run(reqs, policy_only_config(0, STOPS), mode="greedy")
    for r, tokens, logp_q in zip(reqs, greedy.token_ids, greedy.logp_q, strict=True):
        want = generate_policy_only(policy, V, [r.policy_ids], r.max_new_tokens, 0, STOPS, temperature=0.0)
        assert tokens == want.token_ids[0] and set(logp_q) == {0.0}
    assert all(math.isnan(x) for row in greedy.logp_teacher for x in row)


def test_requests_stream_in_while_others_decode(models):
    """serve() asks the source for requests at every check: requests that arrive while the first rows decode take
    the free slots, and each is delivered exactly once with what it samples alone."""
    cfg = SamplerConfig.preset("balanced", stop_token_ids=STOPS)
    engine = FastDualEngine(*models, V, use_graphs=False)
    reqs = grpo_requests(1, [6, 3, 8], seed=9)
    arrivals = [[reqs[0]], [], [reqs[1]], [reqs[2]]]  # one batch of arrivals per check
    delivered = {}

    def pull(n):
        return arrivals.pop(0)[:n] if arrivals else []

    batcher = ContinuousBatcher(engine, slots=4, slot_len=20, check_every=1)
    batcher.serve(pull, lambda r, row: delivered.setdefault(r.seed, []).append(row), cfg)
    assert sorted(delivered) == sorted(r.seed for r in reqs) and all(len(v) == 1 for v in delivered.values())
    for r in reqs:
        alone = engine.generate([r.policy_ids], [r.teacher_ids], r.max_new_tokens, r.seed, cfg)
        assert delivered[r.seed][0]["token_ids"] == alone.token_ids[0]


def test_bad_requests_fail_before_decoding(models):
    engine = FastDualEngine(*models, V, use_graphs=False)
    batcher = ContinuousBatcher(engine, slots=2, slot_len=12)
    too_long = [Request([1, 2, 3], [4], 4, 0), Request(list(range(1, 9)), [4], 6, 1)]
    with pytest.raises(ValueError, match=r"request 1 needs 8 prompt \+ 6 new tokens = 14 cache slots but a slot holds"):
        batcher.run(too_long, SamplerConfig())
    assert engine.state is None  # nothing was allocated
    with pytest.raises(ValueError, match="teacher_ids must be given in mode 'dual' only"):
        batcher.run([Request([1], None, 2, 0)], SamplerConfig())
    with pytest.raises(ValueError, match="slots=0"):
        ContinuousBatcher(engine, slots=0, slot_len=12)


def test_sleep_drops_the_engine_state_and_wake_restores_it(models):
    """Off CUDA there are no graphs to keep: keep_graphs_on_sleep falls back to dropping the state (and says why);
    sleep() frees the caches, wake() re-allocates the same capacity, and the same requests sample the same tokens."""
    engine = FastDualEngine(*models, V, use_graphs=False, keep_graphs_on_sleep=True)
    assert engine.sleep_mode == "drop" and engine.sleep_mode_reason == "no CUDA graphs to keep"
    batcher = ContinuousBatcher(engine, slots=2, slot_len=20)
    reqs, cfg = grpo_requests(1, [4, 2, 5]), SamplerConfig.preset("balanced")
    first = batcher.run(reqs, cfg)
    st = engine.state
    capacity, caches = (st.batch, st.seq, st.steps), sum(m.cache_bytes(st.batch, st.seq) for m in engine.models)
    assert engine.sleep() > caches and engine.state is None and all(m.k_cache is None for m in engine.models)
    assert engine.sleep() == 0  # already asleep
    engine.wake()
    assert (engine.state.batch, engine.state.seq, engine.state.steps) == capacity
    assert batcher.run(reqs, cfg).token_ids == first.token_ids


@pytest.mark.skipif(not fused_available("cpu"), reason="needs Triton with TRITON_INTERPRET=1")
def test_fused_slots_under_the_triton_interpreter(models):
    """The GPU path's sampling (fused_sample with per-row streams) in the slots, through Triton's interpreter (the
    model's ops stay torch twins: the interpreter cannot run the scalar-masked cache store): each request samples
    what it samples alone in the fused batch-of-one path, traced exactly, first token forced."""
    policy, teacher = models
    engine = FastDualEngine(policy, teacher, V, use_graphs=False)
    assert engine.fused
    for m in engine.models:
        m.use_triton = False
    cfg = SamplerConfig.preset("balanced", stop_token_ids=STOPS)
    reqs = grpo_requests(1, [3, 5, 2], seed=1)
    out = ContinuousBatcher(engine, slots=2, slot_len=16, check_every=2).run(reqs, cfg)
    for i, r in enumerate(reqs):
        alone = engine.generate([r.policy_ids], [r.teacher_ids], r.max_new_tokens, r.seed, cfg)
        assert out.token_ids[i] == alone.token_ids[0] and out.forced[i][0]
        lp = full_logp(policy, r.policy_ids, out.token_ids[i]).gather(-1, torch.tensor(out.token_ids[i])[:, None])
        torch.testing.assert_close(torch.tensor(out.logp_policy[i]), lp[:, 0], atol=1e-4, rtol=0)
