"""Policy-only sampling in the `dual` backend, on CPU with real Ray, real verl classes, real TransferQueue and tiny
Qwen3 checkpoints: the teacher-free decode gives the dual sampler's own samples at alpha = 0, greedy validation of
the policy alone through the trainer's validation hooks, per-response forward-token counts, and the trainer's
per-step reduction of them read back from TransferQueue."""

import asyncio
import copy
import math
from types import SimpleNamespace

import numpy as np
import pytest
import ray
import torch
from omegaconf import open_dict
from transformers import AutoModelForCausalLM, AutoTokenizer
from verl.utils.tensordict_utils import list_of_dict_to_tensordict
from verl.workers.rollout.llm_server import LLMServerClient
from verl.workers.rollout.router import get_router_handle

from recipe.optimal_sampling.engine import DualSampler, stop_ids_for
from recipe.optimal_sampling.engine.policy_only import POLICY_ONLY, generate_policy_only, ignores_teacher
from recipe.optimal_sampling.main import CONFIG_DIR
from recipe.optimal_sampling.verl.config import OptimalSamplingConfig, check_trainer_config
from recipe.optimal_sampling.verl.server import FORWARD_TOKEN_KEYS
from recipe.optimal_sampling.verl.trainer import OptimalSamplingTrainer, forward_token_metrics
from tests.verl.fixtures import compose_config, make_agent_loop, tiny_overrides

KEY = "actor_rollout_ref.rollout.engine_kwargs.optimal_sampling"
ON_POLICY = [
    f"{KEY}.alpha_method=fixed",
    f"{KEY}.fixed_alpha=0.0",
    f"{KEY}.force_teacher_tokens=0",
    f"{KEY}.teacher_top_p=null",
]
TRAIN = {"temperature": 1.0, "top_p": 1.0, "top_k": -1, "repetition_penalty": 1.0, "logprobs": True}
GREEDY = {**TRAIN, "temperature": 0.0}  # what verl sends for validation with val_kwargs.temperature=0
QUESTIONS = ["347+285", "12+908", "5+5", "640+77"]
EOS = 1  # tests/verl/fixtures.tiny_config


def load(path):
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="sdpa").eval()


def config_with(checkpoints, extra: list[str]):
    config = compose_config([*tiny_overrides(checkpoints), *extra])
    with open_dict(config):
        config.actor_rollout_ref.rollout.agent.agent_loop_config_path = f"{CONFIG_DIR}/agent_loops.yaml"
    return config


def reference_sampler(checkpoints, sampler_config) -> DualSampler:
    tok, teacher_tok = (AutoTokenizer.from_pretrained(checkpoints[k]) for k in ("policy", "teacher"))
    config = sampler_config.replace(stop_token_ids=stop_ids_for(sampler_config, tok, teacher_tok))
    policy, teacher = load(checkpoints["policy"]), load(checkpoints["teacher"])
    return DualSampler(policy, teacher, config, tokenizer=tok, teacher_tokenizer=teacher_tok)


def naive_greedy(model, prompt: list[int], max_new_tokens: int) -> list[int]:
    """Full forward per token, argmax, stop after EOS."""
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(max_new_tokens):
            ids.append(int(model(input_ids=torch.tensor([ids])).logits[0, -1].argmax()))
            if ids[-1] == EOS:
                break
    return ids[len(prompt) :]


# ---- the teacher-free decode (no Ray) --------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_policy_only_decode_draws_the_dual_samplers_samples_at_alpha_0(checkpoints, seed):
    """Same seed, same prompts: the teacher-free loop returns the very tokens and log-probs of the DualSampler with
    POLICY_ONLY (reference backend), which runs the teacher; only the teacher's traces differ (NaN)."""
    ref = reference_sampler(checkpoints, POLICY_ONLY)
    assert getattr(ref, "backend", "reference") == "reference"  # the loop the teacher-free decode mirrors
    policy_ids = [[30, 31, 32], [33], [34, 35, 36, 37, 38], [39, 40]]
    teacher_ids = [[3, 40], [3, 41, 42, 43], [3], [3, 44, 45]]
    want = ref.generate(policy_ids, teacher_ids, max_new_tokens=8, seed=seed)
    got = generate_policy_only(ref.policy, ref.vocab_size, policy_ids, 8, seed, ref.config.stop_token_ids)
    assert got.token_ids == want.token_ids and got.finish_reasons == want.finish_reasons
    for name in ("logp_q", "logp_policy", "alpha", "forced", "support_size"):
        assert getattr(got, name) == getattr(want, name), name
    for name in ("kl_q_policy", "ess_policy", "entropy_q"):
        assert got.diagnostics[name] == want.diagnostics[name], name
    for name in ("kl_q_teacher", "ess_teacher"):
        assert all(math.isnan(x) for row in got.diagnostics[name] for x in row)
    assert all(math.isnan(x) for row in got.logp_teacher for x in row)
    assert not any(math.isnan(x) for row in want.logp_teacher for x in row)


def test_greedy_policy_only_decode_is_the_argmax_continuation(checkpoints):
    policy = load(checkpoints["policy"])
    prompts = [[30, 31, 32], [33], [34, 35, 36, 37, 38]]
    vocab = policy.config.vocab_size
    out = generate_policy_only(policy, vocab, prompts, 8, seed=0, stop_token_ids=(EOS,), temperature=0.0)
    assert out.token_ids == [naive_greedy(policy, p, 8) for p in prompts]
    assert all(x == 0.0 for row in out.logp_q for x in row)  # greedy is a point mass


def test_only_a_teacher_free_sampler_config_lets_the_teacher_be_skipped():
    assert ignores_teacher(POLICY_ONLY)
    assert not ignores_teacher(POLICY_ONLY.replace(fixed_alpha=0.5))
    assert not ignores_teacher(POLICY_ONLY.replace(force_teacher_tokens=1))
    assert not ignores_teacher(POLICY_ONLY.replace(teacher_top_p=0.95))
    assert not ignores_teacher(POLICY_ONLY.replace(alpha_method="kl_symmetry", fixed_alpha=None))


# ---- config --------------------------------------------------------------------------------------------------------


def test_greedy_validation_is_allowed_only_with_validate_policy_only(checkpoints):
    greedy_val = [
        "actor_rollout_ref.rollout.val_kwargs.temperature=0",
        "actor_rollout_ref.rollout.val_kwargs.do_sample=false",
    ]
    with pytest.raises(ValueError, match="validate_policy_only=true"):
        check_trainer_config(compose_config(greedy_val))
    os_config = check_trainer_config(compose_config([*greedy_val, f"{KEY}.validate_policy_only=true"]))
    assert os_config.validate_policy_only and not os_config.skip_unused_teacher
    sampled = ["actor_rollout_ref.rollout.val_kwargs.temperature=1.0", f"{KEY}.validate_policy_only=true"]
    assert check_trainer_config(compose_config(sampled)).validate_policy_only  # policy-only, sampled at T = 1
    for bad in (["actor_rollout_ref.rollout.val_kwargs.temperature=0"], greedy_val[1:]):  # do_sample disagrees
        with pytest.raises(ValueError, match="temperature=0 with do_sample=false"):
            check_trainer_config(compose_config([*bad, f"{KEY}.validate_policy_only=true"]))
    with pytest.raises(ValueError, match="skip_unused_teacher must be true or false"):
        OptimalSamplingConfig(skip_unused_teacher="yes")


# ---- the servers on Ray ------------------------------------------------------------------------------------------


@ray.remote(num_cpus=0)
class FakeTrainerWorker:
    """Stands in for a trainer worker: DualReplica only asks it for its node and (here: no) GPU."""


def launch(config, name: str):
    from recipe.optimal_sampling.verl.replica import DualReplica

    rollout = config.actor_rollout_ref
    replica = DualReplica(
        replica_rank=0, config=rollout.rollout, model_config=rollout.model, gpus_per_node=1, name_suffix=name
    )
    asyncio.run(replica.init_hybrid(SimpleNamespace(workers=[FakeTrainerWorker.remote()])))
    balancer = get_router_handle(servers={replica.server_address: replica.server_handle})
    client = LLMServerClient(config=config, load_balancer_handle=balancer)
    return SimpleNamespace(server=replica.server_handle, client=client, config=config)


@pytest.fixture(scope="module")
def servers(ray_local, checkpoints):
    """on_policy: alpha fixed at 0 with skip_unused_teacher; balanced: the balanced preset with policy-only greedy
    validation. The name suffixes keep the server actors' names apart from other modules' servers."""
    skip = [*ON_POLICY, f"{KEY}.skip_unused_teacher=true"]
    greedy_val = [
        f"{KEY}.validate_policy_only=true",
        "actor_rollout_ref.rollout.val_kwargs.temperature=0",
        "actor_rollout_ref.rollout.val_kwargs.do_sample=false",
    ]
    out = SimpleNamespace(
        on_policy=launch(config_with(checkpoints, skip), "on_policy"),
        balanced=launch(config_with(checkpoints, greedy_val), "balanced"),
    )
    yield out
    for s in (out.on_policy, out.balanced):
        ray.kill(s.server)


def batches_served(server) -> int:
    return ray.get(server.__ray_call__.remote(lambda self: self._batches))


def server_seed(rollout, batch_index: int) -> int:
    return int(rollout.config.actor_rollout_ref.rollout.seed) * 1_000_003 + batch_index  # replica rank 0


def generate(rollout, request_id, policy_ids, teacher_ids, params=TRAIN):
    return asyncio.run(
        rollout.client.generate(
            request_id, prompt_ids=policy_ids, sampling_params=params, teacher_prompt_ids=teacher_ids
        )
    )


def test_skipped_teacher_gives_the_same_samples_and_counts_no_teacher_tokens(servers, checkpoints):
    rollout, policy_ids, teacher_ids = servers.on_policy, [30, 31, 32], [3, 40, 41, 42]
    before = batches_served(rollout.server)
    out = generate(rollout, "s0", policy_ids, teacher_ids)
    ref = reference_sampler(checkpoints, POLICY_ONLY).generate(
        [policy_ids], [teacher_ids], max_new_tokens=8, seed=server_seed(rollout, before + 1)
    )
    assert out.token_ids == ref.token_ids[0]
    assert out.log_probs == ref.logp_q[0]
    n = len(out.token_ids)
    assert out.extra_fields[FORWARD_TOKEN_KEYS["policy"]] == len(policy_ids) + n - 1
    assert out.extra_fields[FORWARD_TOKEN_KEYS["teacher"]] == 0
    assert all(math.isnan(x) for x in out.extra_fields["dual_logp_teacher"])


def test_dual_requests_count_both_models_forward_tokens(servers):
    policy_ids, teacher_ids = [30, 31], [3, 40, 41, 42, 43]
    out = generate(servers.balanced, "d0", policy_ids, teacher_ids)
    n = len(out.token_ids)
    assert out.extra_fields[FORWARD_TOKEN_KEYS["policy"]] == len(policy_ids) + n - 1
    assert out.extra_fields[FORWARD_TOKEN_KEYS["teacher"]] == len(teacher_ids) + n - 1
    assert not any(math.isnan(x) for x in out.extra_fields["dual_logp_teacher"])


def run_agent_loops(rollout, params, questions=QUESTIONS):
    loop = make_agent_loop(rollout)

    async def run():
        return await asyncio.gather(
            *[loop.run(dict(params), raw_prompt=[{"role": "user", "content": q}]) for q in questions]
        )

    return asyncio.run(run())


def trainer_for(rollout, servers_handles=None) -> OptimalSamplingTrainer:
    """The trainer's own methods on a bare instance: only `config` and the server handles are needed."""
    trainer = object.__new__(OptimalSamplingTrainer)
    trainer.config = rollout.config
    if servers_handles is not None:
        trainer.llm_server_manager = SimpleNamespace(server_handles=servers_handles)
    return trainer


def test_validation_hooks_make_the_servers_decode_the_policy_alone_greedily(servers, checkpoints):
    """verl's validation (val_kwargs.temperature=0) between on_validate_begin and on_validate_end: each response is
    the policy's greedy continuation of its plain prompt, with no teacher forwards; afterwards the same server
    samples from q* again and refuses greedy requests."""
    rollout = servers.balanced
    trainer = trainer_for(rollout, [rollout.server])
    policy = load(checkpoints["policy"])
    trainer.on_validate_begin()
    try:
        outputs = run_agent_loops(rollout, GREEDY)
    finally:
        trainer.on_validate_end()
    for out in outputs:
        assert out.response_ids == naive_greedy(policy, out.prompt_ids, 8)
        assert out.extra_fields[FORWARD_TOKEN_KEYS["teacher"]] == 0
    with pytest.raises(ray.exceptions.RayTaskError, match="policy-only validation"):
        generate(rollout, "g1", [30], [3], GREEDY)
    after = generate(rollout, "g2", [30], [3])
    assert after.extra_fields[FORWARD_TOKEN_KEYS["teacher"]] > 0
    assert after.extra_fields["dual_forced"][0] == 1.0  # balanced preset: the first token comes from the teacher


def test_validation_hooks_leave_the_servers_alone_without_validate_policy_only(servers):
    trainer = trainer_for(servers.on_policy)  # no server handles: touching them would raise AttributeError
    trainer.on_validate_begin()
    trainer.on_validate_end()


def test_val_metrics_name_the_policy_only_accuracy(servers):
    args = (["optimal_sampling/addition"] * 4, ["u0", "u1", "u2", "u3"], {"reward": [1.0, 0.0, 0.0, 1.0]}, [2] * 4)
    metrics = trainer_for(servers.balanced)._val_metrics_update(*args)
    assert metrics["optimal_sampling/val_policy_only_accuracy"] == 0.5
    assert metrics["val-core/optimal_sampling/addition/reward/mean@1"] == 0.5  # verl's name for the same number
    assert "optimal_sampling/val_policy_only_accuracy" not in trainer_for(servers.on_policy)._val_metrics_update(*args)


# ---- the trainer's per-step metrics, read back from TransferQueue ---------------------------------------------------


def test_forward_token_metrics_sum_over_responses():
    extras = [{FORWARD_TOKEN_KEYS["policy"]: 10, FORWARD_TOKEN_KEYS["teacher"]: 12}] * 3
    assert forward_token_metrics(extras) == {
        "optimal_sampling/policy_forward_tokens": 30.0,
        "optimal_sampling/teacher_forward_tokens": 36.0,
    }
    with pytest.raises(AssertionError, match="dual_policy_forward_tokens"):
        forward_token_metrics([{}])


@pytest.fixture(scope="module")
def transfer_queue(ray_local):
    import transfer_queue as tq

    tq.init()
    yield tq
    tq.close()


def put_step(tq, outputs, partition: str, padding_rows: int = 0):
    """Agent-loop outputs into TransferQueue as verl's AgentLoopWorkerTQ puts them, plus the trainer's old_log_probs
    (here log q*); `padding_rows` duplicates of the first row tagged is_padding, as verl pads a batch."""
    rows = []
    for i, out in enumerate(outputs):
        field = out.as_dict()
        field["old_log_probs"] = field["rollout_log_probs"]
        field["advantages"] = field["rollout_log_probs"] * 0 + (i % 3 == 0)  # every third response has a signal
        rows.append(field)
    rows += [rows[0]] * padding_rows
    keys = [f"{partition}_{i}_0_0" for i in range(len(rows))]
    tags = [{"status": "success"}] * len(outputs) + [{"status": "success", "is_padding": True}] * padding_rows
    tq.kv_batch_put(keys=keys, fields=list_of_dict_to_tensordict(rows), tags=tags, partition_id="train")
    return SimpleNamespace(keys=keys, partition_id="train", tags=tags)


@pytest.mark.parametrize("arm", ["on_policy", "balanced"])
def test_trainer_step_metrics_read_forward_tokens_from_transfer_queue(servers, transfer_queue, arm):
    rollout = getattr(servers, arm)
    outputs = run_agent_loops(rollout, TRAIN)
    batch = put_step(transfer_queue, outputs, arm, padding_rows=2)
    metrics = trainer_for(rollout)._optimal_sampling_metrics(batch, global_steps=1)
    transfer_queue.kv_clear(keys=batch.keys, partition_id="train")
    n = [len(o.response_ids) for o in outputs]
    policy_tokens = sum(len(o.prompt_ids) + k - 1 for o, k in zip(outputs, n, strict=True))
    assert metrics["optimal_sampling/policy_forward_tokens"] == policy_tokens
    assert metrics["optimal_sampling/num_tokens"] == sum(n)  # padding rows left out
    with_signal = len(range(0, len(outputs), 3))
    assert metrics["optimal_sampling/zero_advantage_frac"] == pytest.approx(1 - with_signal / len(outputs))
    assert all(np.isfinite(v) for v in metrics.values())
    if arm == "on_policy":  # teacher not run: no teacher tokens, no teacher statistics, alpha 0 everywhere
        assert metrics["optimal_sampling/teacher_forward_tokens"] == 0
        assert "optimal_sampling/kl_q_teacher" not in metrics and "optimal_sampling/ess_ratio" not in metrics
        assert metrics["optimal_sampling/alpha_mean"] == 0.0
        assert metrics["optimal_sampling/is_weight_mean"] == pytest.approx(1.0)
        assert metrics["optimal_sampling/guided_frac"] == 0.0
    else:
        assert metrics["optimal_sampling/teacher_forward_tokens"] > 0
        assert "optimal_sampling/kl_q_teacher" in metrics
        assert metrics["optimal_sampling/guided_frac"] == 1.0


# ---- mixed groups (guided_per_prompt) ---------------------------------------------------------------------------


def with_guided_per_prompt(rollout, k):
    """The same servers, with an agent-loop config whose guided_per_prompt is k (the servers need not know k)."""
    config = copy.deepcopy(rollout.config)
    with open_dict(config):
        config.actor_rollout_ref.rollout.engine_kwargs.optimal_sampling.guided_per_prompt = k
    return SimpleNamespace(server=rollout.server, client=rollout.client, config=config)


def run_group(rollout, question: str, n: int, with_session_ids: bool = True):
    """One prompt's n responses, numbered as verl's TransferQueue agent-loop worker numbers them (session_id)."""
    loop = make_agent_loop(rollout)
    session = (lambda i: {"session_id": i}) if with_session_ids else (lambda i: {})  # noqa: E731

    async def run():
        prompt = [{"role": "user", "content": question}]
        return await asyncio.gather(*[loop.run(dict(TRAIN), raw_prompt=prompt, **session(i)) for i in range(n)])

    return asyncio.run(run())


def test_guided_per_prompt_is_checked():
    for bad in (-1, True, 1.5):
        with pytest.raises(ValueError, match="guided_per_prompt must be null"):
            OptimalSamplingConfig(guided_per_prompt=bad)
    n = int(compose_config([]).actor_rollout_ref.rollout.n)
    assert check_trainer_config(compose_config([f"{KEY}.guided_per_prompt={n}"])).guided_per_prompt == n
    assert check_trainer_config(compose_config([])).guided_per_prompt is None  # default: every response from q*
    with pytest.raises(ValueError, match=f"guided_per_prompt={n + 1} is more than actor_rollout_ref.rollout.n={n}"):
        check_trainer_config(compose_config([f"{KEY}.guided_per_prompt={n + 1}"]))


@pytest.mark.parametrize("k", [0, 2, 4])
def test_a_mixed_group_samples_its_first_k_responses_from_q_star_and_the_rest_from_the_policy(servers, k):
    """Balanced preset: a response from q* runs the teacher and starts with a forced teacher token; one from the policy
    runs no teacher, has alpha 0 everywhere and log q* = log pi_theta (its importance weight is 1)."""
    outputs = run_group(with_guided_per_prompt(servers.balanced, k), "347+285", 4)
    for i, out in enumerate(outputs):
        teacher_tokens = out.extra_fields[FORWARD_TOKEN_KEYS["teacher"]]
        if i < k:
            assert teacher_tokens > 0 and out.traces["dual_forced"][0] == 1.0, i
            assert not any(math.isnan(x) for x in out.traces["dual_logp_teacher"])
        else:
            assert teacher_tokens == 0, i
            assert out.response_logprobs == pytest.approx(out.traces["dual_logp_policy"], abs=1e-5)  # q* = pi_theta
            assert set(out.traces["dual_alpha"]) == {0.0} and set(out.traces["dual_forced"]) == {0.0}
            assert all(math.isnan(x) for x in out.traces["dual_logp_teacher"])


def test_a_mixed_group_without_session_ids_is_an_error(servers):
    with pytest.raises(ValueError, match="guided_per_prompt=2 needs the response's index"):
        run_group(with_guided_per_prompt(servers.balanced, 2), "12+908", 2, with_session_ids=False)


def test_trainer_metrics_of_a_mixed_group_describe_the_guided_responses(servers, transfer_queue):
    rollout = with_guided_per_prompt(servers.balanced, 2)
    outputs = [out for q in QUESTIONS[:2] for out in run_group(rollout, q, 4)]  # 2 prompts x (2 guided + 2 not)
    batch = put_step(transfer_queue, outputs, "mixed")
    metrics = trainer_for(rollout)._optimal_sampling_metrics(batch, global_steps=1)
    transfer_queue.kv_clear(keys=batch.keys, partition_id="train")
    guided = [out for out in outputs if out.extra_fields[FORWARD_TOKEN_KEYS["teacher"]] > 0]
    assert len(guided) == 4 and metrics["optimal_sampling/guided_frac"] == 0.5
    assert metrics["optimal_sampling/num_tokens"] == sum(len(o.response_ids) for o in guided)  # traces: guided only
    forced = sum(sum(o.traces["dual_forced"]) for o in guided)
    assert metrics["optimal_sampling/forced_frac"] == pytest.approx(forced / metrics["optimal_sampling/num_tokens"])
    assert metrics["optimal_sampling/policy_forward_tokens"] == sum(
        len(o.prompt_ids) + len(o.response_ids) - 1 for o in outputs
    )  # forward tokens: every response
    assert all(np.isfinite(v) for v in metrics.values())
