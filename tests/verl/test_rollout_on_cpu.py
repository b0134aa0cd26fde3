"""The `dual` backend below the trainer, on CPU with real Ray (local), real verl classes and tiny Qwen3 checkpoints:
replica + server actor, verl's router and LLM client, the agent loop, the weight sync, and verl's own importance
weights computed from our output."""

import asyncio
from types import SimpleNamespace

import pytest
import ray
import torch
from omegaconf import OmegaConf
from tensordict import TensorDict
from transformers import AutoModelForCausalLM, AutoTokenizer
from verl import DataProto
from verl.trainer.ppo.rollout_corr_helper import compute_rollout_correction_and_add_to_batch
from verl.utils.tensordict_utils import list_of_dict_to_tensordict
from verl.workers.rollout.llm_server import LLMServerClient
from verl.workers.rollout.router import get_router_handle

from recipe.optimal_sampling.core import mix_logprobs, teacher_top_p_support
from recipe.optimal_sampling.engine import DualSampler, SamplerConfig, stop_ids_for
from recipe.optimal_sampling.verl.agent_loop import TRACE_FIELDS
from recipe.optimal_sampling.verl.config import OptimalSamplingConfig
from recipe.optimal_sampling.verl.response_caps import CAP_FIELD
from tests.verl.fixtures import make_agent_loop

SAMPLING = {"temperature": 1.0, "top_p": 1.0, "top_k": -1, "repetition_penalty": 1.0, "logprobs": True}
QUESTIONS = ["347+285", "12+908", "5+5", "640+77"]


@ray.remote(num_cpus=0)
class FakeTrainerWorker:
    """Stands in for a trainer worker: DualReplica only asks it for its node and (here: no) GPU."""


@pytest.fixture(scope="module")
def rollout(ray_local, trainer_config):
    from recipe.optimal_sampling.verl.replica import DualReplica

    replica = DualReplica(
        replica_rank=0,
        config=trainer_config.actor_rollout_ref.rollout,
        model_config=trainer_config.actor_rollout_ref.model,
        gpus_per_node=1,
    )
    asyncio.run(replica.init_hybrid(SimpleNamespace(workers=[FakeTrainerWorker.remote()])))
    balancer = get_router_handle(servers={replica.server_address: replica.server_handle})
    client = LLMServerClient(config=trainer_config, load_balancer_handle=balancer)
    yield SimpleNamespace(replica=replica, server=replica.server_handle, client=client, config=trainer_config)
    ray.kill(replica.server_handle)


def batches_served(server) -> int:
    return ray.get(server.__ray_call__.remote(lambda self: self._batches))


def load(path):
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="sdpa").eval()


def reference_sampler(checkpoints, config, policy_key="policy") -> DualSampler:
    """The engine the server should be running, built in this process from the same checkpoints."""
    os_config = OptimalSamplingConfig.from_engine_kwargs(config.actor_rollout_ref.rollout.engine_kwargs)
    tok, teacher_tok = (AutoTokenizer.from_pretrained(checkpoints[k]) for k in ("policy", "teacher"))
    sampler_config = os_config.sampler_config(1.0, stop_ids_for(SamplerConfig(), tok, teacher_tok))
    policy, teacher = load(checkpoints[policy_key]), load(checkpoints["teacher"])
    return DualSampler(policy, teacher, sampler_config, tokenizer=tok, teacher_tokenizer=teacher_tok)


def server_seed(config, batch_index: int) -> int:
    return int(config.actor_rollout_ref.rollout.seed) * 1_000_003 + batch_index  # DualSamplerServer._run_batch


async def run_agent_loops(rollout, questions):
    loop = make_agent_loop(rollout)
    messages = [[{"role": "user", "content": q}] for q in questions]
    outputs = await asyncio.gather(*[loop.run(dict(SAMPLING), raw_prompt=m) for m in messages])
    return loop, messages, outputs


def test_server_returns_the_dual_samplers_draw_with_log_q_and_traces(rollout, checkpoints):
    policy_ids, teacher_ids = [30, 31, 32], [3, 40, 41, 42]
    before = batches_served(rollout.server)
    out = asyncio.run(
        rollout.client.generate("r0", prompt_ids=policy_ids, sampling_params=SAMPLING, teacher_prompt_ids=teacher_ids)
    )
    assert batches_served(rollout.server) == before + 1
    ref = reference_sampler(checkpoints, rollout.config).generate(
        [policy_ids], [teacher_ids], max_new_tokens=8, seed=server_seed(rollout.config, before + 1)
    )
    assert out.token_ids == ref.token_ids[0]
    torch.testing.assert_close(torch.tensor(out.log_probs), torch.tensor(ref.logp_q[0]), atol=1e-5, rtol=0)
    torch.testing.assert_close(torch.tensor(out.extra_fields["dual_alpha"]), torch.tensor(ref.alpha[0]))
    assert out.extra_fields["global_steps"] == out.extra_fields["min_global_steps"] == 0
    assert all(len(out.extra_fields[name]) == len(out.token_ids) for name in TRACE_FIELDS)
    assert out.extra_fields["dual_forced"][0] == 1.0  # balanced preset: the first token comes from the teacher


def test_concurrent_requests_are_served_in_shared_batches(rollout):
    async def many():
        return await asyncio.gather(
            *[
                rollout.client.generate(f"c{i}", prompt_ids=[30 + i], sampling_params=SAMPLING, teacher_prompt_ids=[3])
                for i in range(12)
            ]
        )

    before = batches_served(rollout.server)
    outputs = asyncio.run(many())
    assert len(outputs) == 12 and all(1 <= len(o.token_ids) <= 8 for o in outputs)
    assert batches_served(rollout.server) - before < 12  # batched, not one decode per request


def test_a_rows_response_caps_reach_the_server_per_response(rollout):
    """extra_info.max_response_tokens becomes each request's max_tokens at the server (the agent loop itself cuts only
    at response_length = 8): a list gives response k (verl's session_id k) its own cap; a bad value fails the request
    before anything is sent, naming the field."""
    loop = make_agent_loop(rollout)
    messages = [{"role": "user", "content": QUESTIONS[0]}]
    caps = [1, 2, 3, 1]

    async def group():
        extra_info = {"index": 0, CAP_FIELD: caps}
        calls = [loop.run(dict(SAMPLING), raw_prompt=messages, session_id=k, extra_info=extra_info) for k in range(4)]
        return await asyncio.gather(*calls)

    outputs = asyncio.run(group())
    assert [len(o.response_ids) for o in outputs][::3] == [1, 1]  # never empty, so exactly the cap
    assert all(1 <= len(o.response_ids) <= cap for o, cap in zip(outputs, caps, strict=True))
    before = batches_served(rollout.server)
    with pytest.raises(ValueError, match=r"extra_info.max_response_tokens=9: .*data.max_response_length=8\]"):
        asyncio.run(loop.run(dict(SAMPLING), raw_prompt=messages, extra_info={CAP_FIELD: 9}))
    assert batches_served(rollout.server) == before


def test_requests_the_server_cannot_honour_are_errors(rollout):
    with pytest.raises(ray.exceptions.RayTaskError, match="no teacher_prompt_ids"):
        asyncio.run(rollout.client.generate("e0", prompt_ids=[30], sampling_params=SAMPLING))
    with pytest.raises(ray.exceptions.RayTaskError, match="temperature=0"):
        greedy = {**SAMPLING, "temperature": 0}
        asyncio.run(rollout.client.generate("e1", prompt_ids=[30], sampling_params=greedy, teacher_prompt_ids=[3]))


def test_agent_loop_output_carries_log_q_and_traces_as_tensor_fields(rollout, checkpoints):
    loop, messages, outputs = asyncio.run(run_agent_loops(rollout, QUESTIONS[:2]))
    tok = loop.tokenizer
    for m, out in zip(messages, outputs, strict=True):
        # 1) the two prompts: the policy's plain template, the teacher's chat template
        assert tok.decode(out.prompt_ids) == f"Q: {m[0]['content']}\nA: "
        assert tok.decode(loop.teacher_prompt_ids(m)).startswith("<|im_start|>user\n" + m[0]["content"])
        # 2) the fields verl reads
        n = len(out.response_ids)
        assert 1 <= n <= 8 and out.response_mask == [1] * n and len(out.response_logprobs) == n
        fields = out.as_dict()
        assert torch.equal(fields["rollout_log_probs"], torch.tensor(out.response_logprobs, dtype=torch.float32))
        for name in TRACE_FIELDS:
            assert fields[name].dtype == torch.float32 and fields[name].shape == (n,)
            assert name not in fields["extra_fields"]
        assert fields["extra_fields"]["global_steps"] == 0
    # 3) the whole batch goes through verl's own collation (nested tensors when lengths differ)
    batch = list_of_dict_to_tensordict([o.as_dict() for o in outputs])
    for name in TRACE_FIELDS:
        assert batch[name].is_nested == batch["rollout_log_probs"].is_nested
        assert [len(x) for x in batch[name].unbind(0)] == [len(o.response_ids) for o in outputs]


def test_rollout_log_probs_are_log_q_recomputed_from_the_two_models(rollout, checkpoints):
    """rollout_log_probs must be log q*(y_t), rebuilt here from full forwards of both models, the recorded alpha and
    the teacher top-p set: it is what verl's importance weights divide by."""
    loop, messages, outputs = asyncio.run(run_agent_loops(rollout, QUESTIONS[2:]))
    policy, teacher = load(checkpoints["policy"]), load(checkpoints["teacher"])
    top_p = OptimalSamplingConfig.from_engine_kwargs(
        rollout.config.actor_rollout_ref.rollout.engine_kwargs
    ).teacher_top_p
    for m, out in zip(messages, outputs, strict=True):
        fields, n = out.as_dict(), len(out.response_ids)
        lp = full_logprobs(policy, out.prompt_ids, out.response_ids)  # (n, V)
        lt = full_logprobs(teacher, loop.teacher_prompt_ids(m), out.response_ids)  # (n, V)
        logq = mix_logprobs(lp, lt, fields["dual_alpha"], teacher_top_p_support(lt, top_p))  # (n, V)
        y = torch.tensor(out.response_ids).unsqueeze(-1)  # (n, 1)
        torch.testing.assert_close(fields["rollout_log_probs"], logq.gather(-1, y).squeeze(-1), atol=1e-4, rtol=0)
        torch.testing.assert_close(fields["dual_logp_policy"], lp.gather(-1, y).squeeze(-1), atol=1e-4, rtol=0)
        assert n == fields["dual_alpha"].numel()


def full_logprobs(model, prompt_ids: list[int], response_ids: list[int]) -> torch.Tensor:
    ids = torch.tensor([prompt_ids + response_ids])  # (1, P + n)
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0, len(prompt_ids) - 1 : -1].float()  # (n, V)
    return logits.log_softmax(-1)


def test_verl_importance_weights_from_our_output_are_truncated_pi_old_over_q(rollout, checkpoints):
    """verl's compute_rollout_correction_and_add_to_batch, with the recipe's rollout_correction config, turns our
    rollout_log_probs into w_t = min(pi_old(y_t) / q*(y_t), 2) on response tokens."""
    _, _, outputs = asyncio.run(run_agent_loops(rollout, QUESTIONS))
    policy = load(checkpoints["policy"])
    width = max(len(o.response_ids) for o in outputs)
    mask, rollout_lp, old_lp = (torch.zeros(len(outputs), width) for _ in range(3))  # (B, T) each
    for i, o in enumerate(outputs):
        n = len(o.response_ids)
        y = torch.tensor(o.response_ids).unsqueeze(-1)  # (n, 1)
        mask[i, :n] = 1
        rollout_lp[i, :n] = torch.tensor(o.response_logprobs)
        old_lp[i, :n] = full_logprobs(policy, o.prompt_ids, o.response_ids).gather(-1, y).squeeze(-1)  # pi_old
    data = DataProto(
        batch=TensorDict(
            {"response_mask": mask, "rollout_log_probs": rollout_lp, "old_log_probs": old_lp}, batch_size=[len(outputs)]
        )
    )
    correction = OmegaConf.to_container(rollout.config.algorithm.rollout_correction)
    data, metrics = compute_rollout_correction_and_add_to_batch(data, correction)
    expected = (old_lp - rollout_lp).exp().clamp(max=correction["rollout_is_threshold"]) * mask
    torch.testing.assert_close(data.batch["rollout_is_weights"], expected, atol=1e-5, rtol=1e-5)
    assert (expected[mask.bool()] != 1).any()  # q* differs from pi_theta: the weights are not trivial
    assert "rollout_corr/kl" in metrics and "rollout_corr/rollout_is_mean" in metrics


def test_weight_sync_replaces_the_servers_policy(rollout, checkpoints):
    """DualServerAdapter streams full HF-named tensors (tied lm_head included or not) into the server's policy copy;
    afterwards the server samples exactly as a sampler built on the new weights, and reports the new version."""
    import os

    from recipe.optimal_sampling.verl.adapter import DualServerAdapter

    os.environ.setdefault("RANK", "0")
    config = rollout.config.actor_rollout_ref
    adapter = DualServerAdapter(config.rollout, config.model, device_mesh=None)
    adapter.bucket_bytes = 64 << 10  # several buckets for these tiny models
    new_state = load(checkpoints["policy_b"]).state_dict()
    assert "lm_head.weight" in new_state  # tied: the same tensor as the embeddings

    def generate(request_id):
        before = batches_served(rollout.server)
        out = asyncio.run(
            rollout.client.generate(request_id, prompt_ids=[30, 31], sampling_params=SAMPLING, teacher_prompt_ids=[3])
        )
        return out, before + 1

    try:
        asyncio.run(adapter.update_weights(iter(new_state.items()), global_steps=3))
        out, batch_index = generate("w0")
        assert out.extra_fields["global_steps"] == 3
        seed = server_seed(rollout.config, batch_index)
        for key, should_match in (("policy_b", True), ("policy", False)):
            ref = reference_sampler(checkpoints, rollout.config, key).generate([[30, 31]], [[3]], 8, seed=seed)
            got, want = torch.tensor(out.extra_fields["dual_logp_policy"]), torch.tensor(ref.logp_policy[0])
            same = got.shape == want.shape and torch.allclose(got, want)  # the other policy may stop elsewhere
            assert same == should_match and (out.token_ids == ref.token_ids[0] or not should_match)
        # an incomplete sync is an error, not a silently stale policy
        partial = list(new_state.items())[:3]
        with pytest.raises(ray.exceptions.RayTaskError, match="did not send"):
            asyncio.run(adapter.update_weights(iter(partial), global_steps=4))
        with pytest.raises(ray.exceptions.RayTaskError, match="does not have"):
            asyncio.run(adapter.update_weights(iter([("not.a.weight", torch.zeros(1))]), global_steps=4))
    finally:  # back to the original policy, without lm_head (as an engine that drops tied weights would send)
        original = {k: v for k, v in load(checkpoints["policy"]).state_dict().items() if k != "lm_head.weight"}
        asyncio.run(adapter.update_weights(iter(original.items()), global_steps=0))


def test_weights_cross_to_the_server_in_the_rollout_dtype_only_from_a_gpu():
    """`to_wire`: GPU tensors are cast to the servers' dtype before the host copy (half the bytes of fp32 master
    weights); CPU tensors (these tests' CPU servers compute in float32) and integer tensors keep theirs."""
    from recipe.optimal_sampling.verl.adapter import to_wire

    weight = torch.randn(3, 4)[:, :2]  # a non-contiguous fp32 view
    sent = to_wire(weight, torch.bfloat16)
    assert sent.dtype == torch.float32 and sent.is_contiguous() and torch.equal(sent, weight)
    assert to_wire(torch.arange(3), torch.bfloat16).dtype == torch.int64
    if torch.cuda.is_available():
        assert to_wire(weight.cuda(), torch.bfloat16).dtype == torch.bfloat16
