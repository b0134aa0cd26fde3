"""Continuous batching on CUDA (fused kernels, CUDA graphs) against full HF forward passes, against each request
decoded alone, and sleep/wake of the engine's memory. Tiny Qwen3 models; float32 unless said otherwise."""

import math

import pytest
import torch

from recipe.optimal_sampling import SamplerConfig
from recipe.optimal_sampling.core.fused import fused_sample
from recipe.optimal_sampling.engine.fast.engine import FastDualEngine
from recipe.optimal_sampling.engine.fast.scheduler import ContinuousBatcher, Request, request_seed
from recipe.optimal_sampling.engine.policy_only import policy_only_config
from tests.engine.test_fast_engine_on_cpu import tiny_fast_qwen3
from tests.engine.test_fast_gpu import check_traces, full_logp

pytestmark = pytest.mark.gpu
V = 64
STOPS = (5, 17, 33)
PROMPTS = [([1, 2, 3], [13, 14]), ([4, 5, 6, 7, 8, 9, 10, 11], [15]), ([12], [16, 17, 18, 19, 20, 21, 22])]


@pytest.fixture(scope="module")
def models():
    return tiny_fast_qwen3(0, V, device="cuda"), tiny_fast_qwen3(1, V, device="cuda")


def grpo_requests(n: int, lengths: list[int], seed: int = 0) -> list[Request]:
    reqs = [Request(p, t, 0, 0) for p, t in PROMPTS for _ in range(n)]
    for i, r in enumerate(reqs):
        r.max_new_tokens, r.seed = lengths[i % len(lengths)], request_seed(seed, i)
    return reqs


def test_per_row_streams_equal_a_batch_of_one():
    """fused_sample with (B,) seeds and steps: row b draws what a batch of one with seed[b] and step[b] draws."""
    torch.manual_seed(0)
    lg_p, lg_t = (torch.randn(6, 4096, device="cuda") * 3 for _ in range(2))
    seeds = torch.tensor([request_seed(1, i) for i in range(6)], device="cuda")
    steps = torch.tensor([0, 3, 1, 7, 0, 2], device="cuda")
    token, rec = fused_sample(lg_p, lg_t, steps, seeds, top_p=0.9, force_teacher_tokens=1)
    for b in range(6):
        one, one_rec = fused_sample(
            lg_p[b : b + 1], lg_t[b : b + 1], steps[b], seeds[b], top_p=0.9, force_teacher_tokens=1
        )
        assert int(token[b]) == int(one[0]), b
        torch.testing.assert_close(rec[:, b], one_rec[:, 0], atol=1e-5, rtol=0)
    assert rec[4, 0] == 1.0 and rec[4, 1] == 0.0  # forcing follows each row's own step


@pytest.mark.parametrize("preset", ["balanced", "exploratory"])
def test_rows_joining_mid_decode_equal_a_full_forward_pass(models, preset):
    cfg = SamplerConfig.preset(preset, temperature=0.8, stop_token_ids=STOPS)
    reqs = grpo_requests(4, [3, 17, 6, 1, 12, 9, 4, 20])  # 12 requests through 4 slots (one graph)
    batcher = ContinuousBatcher(FastDualEngine(*models, V), slots=4, slot_len=40, check_every=2)
    out = batcher.run(reqs, cfg)
    check_traces(out, *models, cfg, 1e-4, [r.policy_ids for r in reqs], [r.teacher_ids for r in reqs])
    for i, r in enumerate(reqs):
        assert out.forced[i][:1] == [cfg.force_teacher_tokens > 0] and len(out.token_ids[i]) <= r.max_new_tokens
    assert batcher.prefilled == 3 and batcher.copied == 9
    assert len([k for k in batcher.engine.graphs if k[2].startswith("slots:")]) == 1


def test_a_request_samples_what_it_samples_alone(models):
    cfg = SamplerConfig.preset("balanced", stop_token_ids=STOPS)
    engine = FastDualEngine(*models, V)
    reqs = grpo_requests(2, [7, 2, 9, 5, 3, 8], seed=3)
    out = ContinuousBatcher(engine, slots=2, slot_len=32, check_every=3).run(reqs, cfg)
    for i, r in enumerate(reqs):
        alone = engine.generate([r.policy_ids], [r.teacher_ids], r.max_new_tokens, r.seed, cfg)
        assert out.token_ids[i] == alone.token_ids[0], i
        torch.testing.assert_close(torch.tensor(out.logp_q[i]), torch.tensor(alone.logp_q[0]), atol=1e-5, rtol=0)


def test_policy_only_modes_in_slots(models):
    policy, teacher = models
    engine = FastDualEngine(policy, teacher, V)
    prompts = [p for p, _ in PROMPTS] * 3
    reqs = [Request(p, None, 3 + 2 * i, request_seed(0, i)) for i, p in enumerate(prompts)]
    batcher = ContinuousBatcher(engine, slots=4, slot_len=40)
    out = batcher.run(reqs, policy_only_config(0.8, STOPS), mode="policy")
    for i, tokens in enumerate(out.token_ids):
        lp = full_logp(policy, prompts[i], tokens, 0.8).gather(-1, torch.tensor(tokens)[:, None])[:, 0]
        torch.testing.assert_close(torch.tensor(out.logp_q[i]), lp, atol=1e-4, rtol=0)
        assert all(math.isnan(x) for x in out.logp_teacher[i])
    greedy = batcher.run(reqs, policy_only_config(0, STOPS), mode="greedy")
    for i, tokens in enumerate(greedy.token_ids):
        ids = list(prompts[i])
        for t in tokens:
            with torch.no_grad():
                assert t == int(policy(torch.tensor([ids], device="cuda")).logits[0, -1].argmax())
            ids.append(t)


def test_bf16_slots_decode_close_to_hf():
    policy, teacher = (tiny_fast_qwen3(s, V, dtype=torch.bfloat16, device="cuda") for s in (0, 1))
    reqs = grpo_requests(2, [10, 4, 7])
    out = ContinuousBatcher(FastDualEngine(policy, teacher, V), slots=2, slot_len=40).run(reqs, SamplerConfig())
    for i, r in enumerate(reqs):
        idx = torch.tensor(out.token_ids[i])[:, None]
        lp = full_logp(policy, r.policy_ids, out.token_ids[i]).gather(-1, idx)[:, 0]
        torch.testing.assert_close(torch.tensor(out.logp_policy[i]), lp, atol=0.05, rtol=0)


def test_sleep_frees_the_engine_memory_and_wake_serves_the_same_samples(models):
    """sleep() gives back at least the KV caches (measured with torch.cuda.memory_allocated); after wake() the same
    requests sample the same tokens (graphs re-captured on first use)."""
    engine = FastDualEngine(*models, V)
    batcher = ContinuousBatcher(engine, slots=64, slot_len=1024)
    reqs = grpo_requests(8, [30, 5, 80, 12])
    cfg = SamplerConfig.preset("balanced")
    first = batcher.run(reqs, cfg)
    torch.cuda.synchronize()
    caches = sum(m.cache_bytes(engine.state.batch, engine.state.seq) for m in engine.models)
    awake = torch.cuda.memory_allocated()
    freed = engine.sleep()
    asleep = torch.cuda.memory_allocated()
    assert freed >= caches and awake - asleep >= caches, (awake, asleep, caches)
    engine.wake()
    assert torch.cuda.memory_allocated() - asleep >= caches
    again = batcher.run(reqs, cfg)
    assert again.token_ids == first.token_ids
    print(f"awake {awake / 2**20:.1f} MiB, asleep {asleep / 2**20:.1f} MiB, recapture {engine.warmup_seconds}")


def test_sleep_keeping_graphs_releases_the_cache_pages_without_recapture(models):
    """keep_graphs_on_sleep: the KV caches live in CUDA virtual memory; sleep() hands their pages back (device free
    memory rises by at least the caches), wake() maps new pages at the same addresses, and the graphs captured
    before replay unchanged (no new capture) with the same samples; a decode while asleep wakes the engine first."""
    engine = FastDualEngine(*models, V, keep_graphs_on_sleep=True)
    assert engine.sleep_mode == "keep_graphs", engine.sleep_mode_reason
    batcher = ContinuousBatcher(engine, slots=64, slot_len=1024)
    reqs, cfg = grpo_requests(8, [30, 5, 80, 12]), SamplerConfig.preset("balanced")
    first = batcher.run(reqs, cfg)
    captured = dict(engine.warmup_seconds)
    caches = sum(m.cache_bytes(engine.state.batch, engine.state.seq) for m in engine.models)
    ptrs = [m.k_cache.data_ptr() for m in engine.models]
    torch.cuda.synchronize()
    free_awake = torch.cuda.mem_get_info()[0]
    assert engine.sleep() == caches
    free_asleep = torch.cuda.mem_get_info()[0]
    assert free_asleep - free_awake >= caches, (free_awake, free_asleep, caches)
    engine.wake()
    assert [m.k_cache.data_ptr() for m in engine.models] == ptrs
    again = batcher.run(reqs, cfg)
    assert engine.warmup_seconds == captured and again.token_ids == first.token_ids
    engine.sleep()
    assert batcher.run(reqs, cfg).token_ids == first.token_ids  # reserve() woke it
