"""`DualSamplerServer` in-process on CPU (no Ray): which engine it runs and why (log line, `dual_fast_engine`),
`engine=fast` refused before any weights load, requests streamed through the continuous batcher (the fast
engine's eager twins on CPU) with exact traces, too-long requests refused, and sleep/wake of the engine's state."""

import asyncio
import logging

import pytest
import torch
from omegaconf import open_dict
from transformers import AutoModelForCausalLM

from recipe.optimal_sampling.verl import server as server_module
from recipe.optimal_sampling.verl.server import FAST_ENGINE_KEY, DualSamplerServer
from tests.verl.fixtures import compose_config, save_tiny, tiny_overrides

SAMPLING = {"temperature": 1.0, "top_p": 1.0, "top_k": -1, "logprobs": True}


@pytest.fixture(scope="module")
def fast_shaped(tmp_path_factory) -> dict[str, str]:
    """Checkpoints the fast path implements (hidden 64, 4 heads: head_dim 16)."""
    root = tmp_path_factory.mktemp("ckpt_hd16")
    return {
        "policy": save_tiny(str(root / "policy"), seed=0, hidden=64),
        "teacher": save_tiny(str(root / "teacher"), seed=1, hidden=64, layers=3),
    }


def make_server(checkpoints, *overrides) -> DualSamplerServer:
    config = compose_config([*tiny_overrides(checkpoints), *overrides])
    with open_dict(config):
        config.actor_rollout_ref.model.setdefault("local_path", config.actor_rollout_ref.model.path)
    return DualSamplerServer(config.actor_rollout_ref.rollout, config.actor_rollout_ref.model)


def full_logp(path: str, prompt: list[int], tokens: list[int]) -> torch.Tensor:
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        logits = model(torch.tensor([prompt + tokens])).logits[0, len(prompt) - 1 : -1]  # (T, V)
    return logits.log_softmax(-1).gather(-1, torch.tensor(tokens)[:, None])[:, 0]


def test_the_server_says_which_engine_runs_and_why(checkpoints, caplog):
    """On CPU (and with head_dim 8 models) auto falls back to the reference path: logged with the reasons at
    start-up, and every response says dual_fast_engine = 0 (the trainer's optimal_sampling/fast_engine)."""
    with caplog.at_level(logging.WARNING, logger=server_module.__name__):
        server = make_server(checkpoints)
    line = next(r.getMessage() for r in caplog.records if "engine" in r.getMessage())
    assert line.startswith("dual server 0: reference engine (the fast engine cannot run here: policy: head_dim=8")
    assert "the models are on cpu" in line and server.batcher is None
    out = asyncio.run(server.generate([5, 6, 7], dict(SAMPLING, max_tokens=4), "r0", teacher_prompt_ids=[5, 6]))
    assert out.extra_fields[FAST_ENGINE_KEY] == 0 and 1 <= len(out.token_ids) <= 4


def test_engine_fast_fails_before_loading_weights(checkpoints, monkeypatch):
    def no_load(*_):
        raise AssertionError("weights were loaded before the engine check")

    monkeypatch.setattr(server_module, "_load_model", no_load)
    key = "actor_rollout_ref.rollout.engine_kwargs.optimal_sampling.engine"
    with pytest.raises(ValueError, match=r"optimal_sampling.engine=fast but the fast engine cannot run here: policy: "):
        make_server(checkpoints, f"{key}=fast")
    with pytest.raises(ValueError, match="optimal_sampling.engine must be one of"):
        make_server(checkpoints, f"{key}=vllm")


def test_requests_stream_through_the_slots_with_exact_traces(fast_shaped):
    """The server's continuous path (here: the batcher over the fast engine's torch twins, as on CPU no graphs
    run): 7 concurrent requests of different lengths through 2 slots, each traced exactly (log pi_theta and
    log pi_t of a full forward pass); a request longer than a slot fails alone, naming the sizes."""
    server = make_server(fast_shaped)
    server.batcher = server.sampler.continuous(2, server.slot_len)
    prompts = [[5, 6, 7, 8], [9, 10], [11, 12, 13]]

    async def send(i: int):
        params = dict(SAMPLING, max_tokens=2 + i % 5)
        return await server.generate(prompts[i % 3], params, f"r{i}", teacher_prompt_ids=prompts[(i + 1) % 3])

    async def main():
        return await asyncio.gather(*[send(i) for i in range(7)])

    outs = asyncio.run(main())
    assert server._batches == 1 and server.batcher.steps < sum(2 + i % 5 for i in range(7))
    for i, out in enumerate(outs):
        assert 1 <= len(out.token_ids) <= 2 + i % 5
        for name, key, prompt in (
            ("policy", "dual_logp_policy", prompts[i % 3]),
            ("teacher", "dual_logp_teacher", prompts[(i + 1) % 3]),
        ):
            want = full_logp(fast_shaped[name], prompt, out.token_ids)
            torch.testing.assert_close(torch.tensor(out.extra_fields[key]), want, atol=1e-4, rtol=0)
    long_prompt = list(range(3, 3 + server.slot_len))
    with pytest.raises(ValueError, match=rf"needs {server.slot_len} prompt \+ 4 new tokens .*rollout.max_model_len"):
        asyncio.run(server.generate(long_prompt, dict(SAMPLING, max_tokens=4), "long", teacher_prompt_ids=[5]))


def test_sleep_frees_the_engine_state_and_wake_takes_it_back(fast_shaped):
    server = make_server(fast_shaped)
    server.batcher = server.sampler.continuous(2, server.slot_len)
    server.batcher.reserve()
    engine = server.batcher.engine
    capacity = (engine.state.batch, engine.state.seq, engine.state.steps)
    asyncio.run(server.sleep())
    assert engine.state is None and all(m.k_cache is None for m in engine.models)
    asyncio.run(server.wake_up())
    assert (engine.state.batch, engine.state.seq, engine.state.steps) == capacity
    out = asyncio.run(server.generate([5, 6], dict(SAMPLING, max_tokens=3), "r", teacher_prompt_ids=[7, 8]))
    want = full_logp(fast_shaped["policy"], [5, 6], out.token_ids)
    torch.testing.assert_close(torch.tensor(out.extra_fields["dual_logp_policy"]), want, atol=1e-4, rtol=0)


def test_an_engine_failure_reaches_every_request_in_flight(fast_shaped):
    """Nothing hangs: when the engine fails mid-serve, every request it had taken gets the error, and the server
    serves the next requests normally."""
    server = make_server(fast_shaped)
    server.batcher = server.sampler.continuous(2, server.slot_len)
    real = server.batcher._harvest
    server.batcher._harvest = lambda *a: (_ for _ in ()).throw(RuntimeError("engine failed"))

    async def main():
        calls = [
            server.generate([5, 6, 7], dict(SAMPLING, max_tokens=3), f"r{i}", teacher_prompt_ids=[8]) for i in range(3)
        ]
        return await asyncio.wait_for(asyncio.gather(*calls, return_exceptions=True), timeout=120)

    outs = asyncio.run(main())
    assert [str(e) for e in outs] == ["engine failed"] * 3
    server.batcher._harvest = real
    out = asyncio.run(server.generate([5, 6, 7], dict(SAMPLING, max_tokens=3), "ok", teacher_prompt_ids=[8]))
    assert 1 <= len(out.token_ids) <= 3
