"""The rollout side of the guided loss on CPU with real Ray, real verl classes, real TransferQueue and tiny Qwen3
checkpoints: the server's teacher scoring of policy-only responses (score_policy_samples), the per-response guided
flag, the trainer's faded guided limit, and the trainer handing TransferQueue fields to the registered estimator."""

import asyncio
import copy
import math
from types import SimpleNamespace

import numpy as np
import pytest
import ray
import torch
from omegaconf import open_dict
from transfer_queue import KVBatchMeta
from transformers import AutoModelForCausalLM
from verl.utils.tensordict_utils import list_of_dict_to_tensordict
from verl.workers.rollout.llm_server import LLMServerClient
from verl.workers.rollout.router import get_router_handle

from recipe.optimal_sampling.loss import guided_advantages
from recipe.optimal_sampling.main import CONFIG_DIR
from recipe.optimal_sampling.verl.guided import GUIDED_ESTIMATOR
from recipe.optimal_sampling.verl.server import FORWARD_TOKEN_KEYS, GUIDED_KEY
from recipe.optimal_sampling.verl.trainer import OptimalSamplingTrainer
from tests.verl.fixtures import compose_config, make_agent_loop, tiny_overrides

KEY = "actor_rollout_ref.rollout.engine_kwargs.optimal_sampling"
TRAIN = {"temperature": 1.0, "top_p": 1.0, "top_k": -1, "repetition_penalty": 1.0, "logprobs": True}
OPD = [  # policy-only sampling, every response scored by the teacher, the critic on every response
    f"algorithm.adv_estimator={GUIDED_ESTIMATOR}",
    f"{KEY}.alpha_method=fixed",
    f"{KEY}.fixed_alpha=0.0",
    f"{KEY}.force_teacher_tokens=0",
    f"{KEY}.teacher_top_p=null",
    f"{KEY}.skip_unused_teacher=true",
    f"{KEY}.score_policy_samples=true",
    "guided_loss.critic_coef=1.0",
]
MIXED = [  # balanced preset, 2 of 4 guided, policy members scored; the fade can take guided members away
    f"algorithm.adv_estimator={GUIDED_ESTIMATOR}",
    f"{KEY}.guided_per_prompt=2",
    f"{KEY}.score_policy_samples=true",
    "guided_loss.critic_coef=0.5",
    "guided_loss.baseline=policy",
    "guided_loss.fade_reward_threshold=0.5",
]


@ray.remote(num_cpus=0)
class FakeTrainerWorker:
    """Stands in for a trainer worker: DualReplica only asks it for its node and (here: no) GPU."""


def launch(checkpoints, extra: list[str], name: str):
    from recipe.optimal_sampling.verl.replica import DualReplica

    config = compose_config([*tiny_overrides(checkpoints), *extra])
    with open_dict(config):
        config.actor_rollout_ref.rollout.agent.agent_loop_config_path = f"{CONFIG_DIR}/agent_loops.yaml"
    ref = config.actor_rollout_ref
    replica = DualReplica(replica_rank=0, config=ref.rollout, model_config=ref.model, gpus_per_node=1, name_suffix=name)
    asyncio.run(replica.init_hybrid(SimpleNamespace(workers=[FakeTrainerWorker.remote()])))
    balancer = get_router_handle(servers={replica.server_address: replica.server_handle})
    client = LLMServerClient(config=config, load_balancer_handle=balancer)
    return SimpleNamespace(server=replica.server_handle, client=client, config=config)


@pytest.fixture(scope="module")
def servers(ray_local, checkpoints):
    out = SimpleNamespace(opd=launch(checkpoints, OPD, "guided_opd"), mixed=launch(checkpoints, MIXED, "guided_mixed"))
    yield out
    for s in (out.opd, out.mixed):
        ray.kill(s.server)


def full_forward_scores(model, prompt: list[int], response: list[int]) -> list[float]:
    """log pi_t(y_t): a float64 full forward of teacher prompt + response, log_softmax at every position."""
    with torch.no_grad():
        logp = model(input_ids=torch.tensor([prompt + response])).logits[0].log_softmax(-1)  # (L, V)
    return [float(logp[len(prompt) - 1 + t, y]) for t, y in enumerate(response)]


def run_group(rollout, question: str, n: int):
    loop = make_agent_loop(rollout)

    async def run():
        prompt = [{"role": "user", "content": question}]
        return await asyncio.gather(*[loop.run(dict(TRAIN), raw_prompt=prompt, session_id=i) for i in range(n)])

    return asyncio.run(run())


def test_policy_only_responses_carry_the_teachers_prefill_scores(servers, checkpoints):
    """OPD through the dual backend: the policy samples alone, then one teacher prefill over the teacher's own prompt +
    the response gives log pi_t(y_t), equal to a float64 full forward; the prefill's tokens are counted."""
    teacher = AutoModelForCausalLM.from_pretrained(checkpoints["teacher"], dtype=torch.float64).eval()
    outputs = run_group(servers.opd, "347+285", 3)
    loop = make_agent_loop(servers.opd)
    teacher_prompt = loop.teacher_prompt_ids([{"role": "user", "content": "347+285"}])
    for out in outputs:
        n = len(out.response_ids)
        want = full_forward_scores(teacher, teacher_prompt, out.response_ids)
        assert out.traces["dual_logp_teacher"] == pytest.approx(want, abs=1e-4)
        assert out.extra_fields[FORWARD_TOKEN_KEYS["teacher"]] == len(teacher_prompt) + n - 1
        assert out.extra_fields[GUIDED_KEY] is False
        assert set(out.traces["dual_alpha"]) == {0.0}  # sampled from the policy alone
        assert all(math.isnan(x) for x in out.traces["dual_kl_q_teacher"])  # no decode-time teacher statistics


def test_a_mixed_group_flags_its_guided_members_and_the_fade_limit_takes_them_away(servers):
    outputs = run_group(servers.mixed, "12+908", 4)
    assert [o.extra_fields[GUIDED_KEY] for o in outputs] == [True, True, False, False]
    for out in outputs:  # guided: recorded while decoding; policy-only: scored by the prefill
        assert not any(math.isnan(x) for x in out.traces["dual_logp_teacher"])
    ray.get(servers.mixed.server.set_guided_limit.remote(1))
    try:
        faded = run_group(servers.mixed, "12+908", 4)
    finally:
        ray.get(servers.mixed.server.set_guided_limit.remote(None))
    assert [o.extra_fields[GUIDED_KEY] for o in faded] == [True, False, False, False]
    assert faded[1].traces["dual_alpha"] and set(faded[1].traces["dual_alpha"]) == {0.0}


def bare_trainer(rollout, global_steps: int = 1) -> OptimalSamplingTrainer:
    trainer = object.__new__(OptimalSamplingTrainer)
    trainer.config, trainer.global_steps = copy.deepcopy(rollout.config), global_steps
    trainer.llm_server_manager = SimpleNamespace(server_handles=[rollout.server])
    with open_dict(trainer.config):
        trainer.config.algorithm.rollout_correction = None  # no old log-probs to correct against here
    return trainer


@pytest.fixture(scope="module")
def transfer_queue(ray_local):
    import transfer_queue as tq

    tq.init()
    yield tq
    tq.close()


def put_step(tq, groups: list[list], name: str):
    """Agent-loop outputs into TransferQueue as verl's workers put them, with a uid per prompt, a 0/1 reward on the
    last token and the trainer's old log-probs (here the server's log pi_theta)."""
    rows, rewards = [], []
    for g, outputs in enumerate(groups):
        for i, out in enumerate(outputs):
            field = out.as_dict()
            reward = float((g + i) % 2)
            field["rm_scores"] = torch.zeros(len(out.response_ids)).index_fill(
                0, torch.tensor([-1 % len(out.response_ids)]), reward
            )
            field["old_log_probs"] = field["dual_logp_policy"]
            field["uid"] = f"{name}-{g}"
            rows.append(field)
            rewards.append(reward)
    keys = [f"{name}_{i}_0_0" for i in range(len(rows))]
    tags = [{"status": "success"}] * len(rows)
    tq.kv_batch_put(keys=keys, fields=list_of_dict_to_tensordict(rows), tags=tags, partition_id="train")
    return KVBatchMeta(keys=keys, partition_id="train", tags=tags), torch.tensor(rewards)


def test_the_trainer_hands_transfer_queue_fields_to_the_registered_estimator(servers, transfer_queue):
    """verl's own _compute_advantage, under the recipe's trainer, writes the guided estimator's advantages back to
    TransferQueue: policy baseline per group plus the critic on every response token; the policy's own reward is kept
    for the fade, and the next step's limit reaches the server."""
    rollout = servers.mixed
    groups = [run_group(rollout, q, 4) for q in ("12+908", "5+5")]
    batch, rewards = put_step(transfer_queue, groups, "guided")
    trainer = bare_trainer(rollout)
    metrics = {}
    trainer._compute_advantage(batch, metrics)
    got = transfer_queue.kv_batch_get(keys=batch.keys, partition_id="train", select_fields=["advantages"])
    transfer_queue.kv_clear(keys=batch.keys, partition_id="train")
    flat = [o for g in groups for o in g]
    guided = torch.tensor([o.extra_fields[GUIDED_KEY] for o in flat])
    group = torch.tensor([0] * 4 + [1] * 4)
    adv = guided_advantages(rewards, group, guided, baseline="policy")  # (B,)
    for i, out in enumerate(flat):
        critic = np.array(out.traces["dual_logp_teacher"]) - np.array(out.traces["dual_logp_policy"])
        want = adv[i].item() + 0.5 * critic
        assert got["advantages"][i].numpy() == pytest.approx(want, abs=1e-5), i
    own = rewards[~guided].double().mean().item()
    assert trainer._policy_reward == pytest.approx(own)
    assert metrics["optimal_sampling/guidance"] == 1.0 and metrics["optimal_sampling/critic_coef"] == 0.5
    # what the critic saw: every token of these responses has a teacher score (guided ones from lockstep decoding,
    # policy ones from the prefill); the log-ratio's mean over all tokens, in float64
    ratios = [
        t - p for o in flat for t, p in zip(o.traces["dual_logp_teacher"], o.traces["dual_logp_policy"], strict=True)
    ]
    assert metrics["optimal_sampling/critic_scored_frac"] == 1.0
    assert metrics["optimal_sampling/critic_logratio_mean"] == pytest.approx(np.mean(ratios), abs=1e-6)
    trainer.global_steps = 2
    trainer.on_sample_begin()  # own reward 0.5 reaches the threshold 0.5: guidance 0, no guided member left
    try:
        assert ray.get(rollout.server.__ray_call__.remote(lambda self: self._guided_limit)) == 0
    finally:
        ray.get(rollout.server.set_guided_limit.remote(None))
