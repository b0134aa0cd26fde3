"""Two `dual` rollout replicas on CPU, driven the way verl's v1 sync trainer drives them on two GPUs: each step's
requests are spread over both replicas, every weight sync reaches both, and the trainer's per-replica metrics
(`optimal_sampling/replica<r>/*`, `replica_weight_lag_max`) equal a naive recomputation.

What runs for real (verl 0.9.1 classes, real Ray actors in a local cluster, tiny Qwen3 checkpoints):
- `OptimalSamplingTrainer` built from the composed config with `trainer.n_gpus_per_node=2`; its dataloader, the
  prompt submission (`prepare_step`), verl's replay buffer, the hooks `on_init_end` / `on_sample_begin` /
  `on_sample_end` / `on_step_end` and `_optimal_sampling_metrics`;
- `LLMServerManager.create`: one `DualReplica` per trainer rank (2), each launching a `DualSamplerServer` actor, and
  verl's least-in-flight load balancer with `LLMServerClient`;
- `CheckpointEngineManager` with the `naive` backend (what v1 forces) calling the actor worker group's
  `update_weights`, and one `DualServerAdapter` per trainer rank (replica = RANK) streaming into its server;
- `AgentLoopManagerTQ` with two `AgentLoopWorkerTQ` actors running `DualAgentLoop`, writing into TransferQueue.

What stands in: the trainer's actor worker group (`StandInRank`). verl 0.9.1 cannot build it on CPU:
`PPOTrainer._setup` -> `ResourcePoolManager.create_resource_pool` creates `RayResourcePool(use_gpu=True)`
(verl/single_controller/ray/base.py:210), whose placement groups ask for GPU bundles; and `ActorRolloutRefWorker`'s
FSDP engine joins a `cpu:gloo,cuda:nccl` process group (verl/utils/distributed.py:89, `get_device_name()` is "cuda" on
a CPU box) and places its modules on `get_device_id()` (verl/workers/engine/fsdp/transformer_impl.py:441). So each
stand-in rank does what `ActorRolloutRefWorker.update_weights` does in naive mode (verl/workers/engine_workers.py:728):
resume, stream the full HF-named tensors of the weights it holds into its adapter, resume the KV cache. Not exercised
here: FSDP's `DTensor.full_tensor()` gather of sharded parameters (every rank joins it and gets the same full tensors),
the actor's `compute_log_prob` (the trainer's old_log_probs are a full forward of the rank's weights, written into
TransferQueue as `_compute_old_log_prob` writes them) and the optimizer step (a rank "steps" by loading other weights).
"""

import os
import time
from types import SimpleNamespace

import pytest
import ray
import torch
from omegaconf import open_dict
from transformers import AutoModelForCausalLM

from recipe.optimal_sampling.main import CONFIG_DIR
from recipe.optimal_sampling.verl.data import write_datasets
from recipe.optimal_sampling.verl.replica import server_actor_name
from recipe.optimal_sampling.verl.server import REPLICA_KEY, WEIGHT_VERSION_KEY
from tests.verl.fixtures import compose_config, tiny_overrides

REPLICAS = 2
PREFIX = "optimal_sampling/"
STEPS = {1: "policy", 2: "policy_b", 3: "policy"}  # the trainer's weights at each step (what its ranks hold)


def load(path):
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="sdpa").eval()


@ray.remote(num_cpus=0)
class StandInRank:
    """One trainer rank of the actor worker group: its `DualServerAdapter` (replica = RANK, as in hybrid mode) and the
    full weights FSDP would gather."""

    def __init__(self, rank: int, rollout_config, model_config, path: str):
        os.environ["RANK"] = str(rank)
        from recipe.optimal_sampling.verl.adapter import DualServerAdapter

        self.adapter = DualServerAdapter(rollout_config, model_config, device_mesh=None)
        self.policy = load(path)

    def step_to(self, path: str) -> None:
        """Stands in for an optimizer step: the rank now holds these weights."""
        self.policy = load(path)

    async def update_weights(self, global_steps: int | None = None, mode: str = "naive") -> None:
        # ActorRolloutRefWorker.update_weights with mode="naive": resume, stream full tensors, resume the KV cache
        await self.adapter.resume(tags=["weights"])
        await self.adapter.update_weights(iter(self.policy.state_dict().items()), global_steps=global_steps)
        await self.adapter.resume(tags=["kv_cache"])


class StandInWorkerGroup:
    """The parts of verl's RayWorkerGroup that LLMServerManager and CheckpointEngineManager use."""

    def __init__(self, workers: list):
        self.workers, self.world_size = workers, len(workers)

    def update_weights(self, global_steps: int | None = None, mode: str = "naive") -> list:
        return [w.update_weights.remote(global_steps, mode) for w in self.workers]  # ONE_TO_ALL, non-blocking


def two_gpu_config(checkpoints, data_dir: str):
    paths = write_datasets(data_dir, n_train=16, n_test=4)
    config = compose_config(
        [
            *tiny_overrides(checkpoints),
            f"trainer.n_gpus_per_node={REPLICAS}",
            f"data.train_files={paths['train']}",
            f"data.val_files={paths['test']}",
            "data.dataloader_num_workers=0",
            "actor_rollout_ref.rollout.agent.num_workers=2",
            "trainer.resume_mode=disable",
        ]
    )
    with open_dict(config):
        config.actor_rollout_ref.rollout.agent.agent_loop_config_path = os.path.join(CONFIG_DIR, "agent_loops.yaml")
    return config


def set_up(run, checkpoints) -> None:
    """PPOTrainer.init() (`_setup` + `on_init_end`) with the stand-in worker group, then TaskRunnerV1's agent loop
    manager. Fills run.ranks and run.trainer as it goes (the fixture's teardown kills what was started)."""
    from verl.checkpoint_engine import CheckpointEngineManager
    from verl.trainer.ppo.v1 import AgentLoopManagerTQ
    from verl.utils.config import omega_conf_to_dataclass
    from verl.workers.rollout.llm_server import LLMServerManager

    from recipe.optimal_sampling.verl.trainer import OptimalSamplingTrainer

    config, ref = run.config, run.config.actor_rollout_ref
    run.ranks = [StandInRank.remote(r, ref.rollout, ref.model, checkpoints[STEPS[1]]) for r in range(REPLICAS)]
    group = StandInWorkerGroup(run.ranks)
    run.trainer = trainer = OptimalSamplingTrainer(config)
    trainer._init_tokenizer()
    trainer._init_dataloader()
    trainer.actor_rollout_wg = group
    trainer.llm_server_manager = LLMServerManager.create(config=config, worker_group=group)
    engine_config = omega_conf_to_dataclass(ref.rollout.checkpoint_engine)
    engine_config.backend = "naive"
    trainer.checkpoint_manager = CheckpointEngineManager(
        config=engine_config, actor_wg=group, replicas=trainer.llm_server_manager.get_replicas()
    )
    trainer.checkpoint_manager.sleep_replicas()
    trainer._load_checkpoint()  # global_steps = 0
    trainer.on_init_end()  # the first weight sync
    trainer.agent_loop_manager = AgentLoopManagerTQ.create(
        config=config, llm_client=trainer.get_llm_client(), teacher_client=None, reward_loop_worker_handles=None
    )
    trainer.curr_step_profile = False  # set by fit


def batches_served(server) -> int:
    return ray.get(server.__ray_call__.remote(lambda self: self._batches))


def run_step(run, step: int) -> SimpleNamespace:
    """One step of PPOTrainer.fit up to the metrics: sample (1), the trainer's old_log_probs (4, stand-in), zero
    advantages (7), `_optimal_sampling_metrics`. The weight sync after it is the caller's (on_step_end)."""
    import transfer_queue as tq
    from verl.utils.tensordict_utils import list_of_dict_to_tensordict

    trainer = run.trainer
    trainer.global_steps, trainer.timing_raw = step, {}  # as fit sets them
    servers = trainer.llm_server_manager.server_handles
    before = [batches_served(s) for s in servers]
    # 1) rollout: prompts to the agent loop workers, trajectories back through the replay buffer
    trainer.prepare_step()
    trainer.on_sample_begin()
    batch, _ = trainer.replay_buffer.sample(
        global_steps=step, partition_id="train", batch_size=int(run.config.data.train_batch_size)
    )
    trainer.on_sample_end()
    batches = [batches_served(s) - b for s, b in zip(servers, before, strict=True)]
    # 2) the trainer's log pi_theta(y_t) under the weights its ranks hold (the FSDP recompute)
    data = tq.kv_batch_get(
        keys=batch.keys, partition_id=batch.partition_id, select_fields=["prompts", "responses", "dual_logp_policy"]
    )
    extra = tq.kv_batch_get(keys=batch.keys, partition_id=batch.partition_id, select_fields=["extra_fields"])
    extra_fields = extra.pop("extra_fields").tolist()
    trainer_model = run.models[STEPS[step]]
    prompts, responses = data["prompts"].unbind(0), data["responses"].unbind(0)
    old = [response_logprobs(trainer_model, p, r) for p, r in zip(prompts, responses, strict=True)]
    rows = [{"old_log_probs": o, "advantages": torch.zeros_like(o)} for o in old]
    tq.kv_batch_put(keys=batch.keys, partition_id=batch.partition_id, fields=list_of_dict_to_tensordict(rows))
    metrics = trainer._optimal_sampling_metrics(batch, step)
    tq.kv_clear(keys=batch.keys, partition_id=batch.partition_id)
    responses_out = [
        SimpleNamespace(
            rank=e[REPLICA_KEY],
            version=e[WEIGHT_VERSION_KEY],
            server=s.clone(),
            trainer=o,
            prompt=p.tolist(),
            response=r.tolist(),
        )
        for e, s, o, p, r in zip(extra_fields, data["dual_logp_policy"].unbind(0), old, prompts, responses, strict=True)
    ]
    return SimpleNamespace(metrics=metrics, responses=responses_out, batches=batches, tags=batch.tags)


def response_logprobs(model, prompt_ids: torch.Tensor, response_ids: torch.Tensor) -> torch.Tensor:
    """log pi(y_t | prompt, y_<t) of the response tokens, from one full forward. Returns (n,) float32."""
    ids = torch.cat([prompt_ids, response_ids]).unsqueeze(0)  # (1, P + n)
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0, len(prompt_ids) - 1 : -1].float()  # (n, V)
    return logits.log_softmax(-1).gather(-1, response_ids.unsqueeze(-1)).squeeze(-1)  # (n,)


@pytest.fixture(scope="module")
def steps(ray_local, checkpoints, tmp_path_factory):
    """Three steps on two replicas. Step 1 samples with the first sync's weights (policy, version 0); after it the
    trainer steps to policy_b and on_step_end syncs it (version 1) for step 2; after step 2 the trainer steps back to
    policy but only rank 1's sync happens (a replica that misses a sync), so in step 3 replica 0 still serves
    version 1 (policy_b) and replica 1 serves version 2."""
    import transfer_queue as tq

    tq.init()
    config = two_gpu_config(checkpoints, str(tmp_path_factory.mktemp("data")))
    run = SimpleNamespace(config=config, trainer=None, ranks=[], models={})
    try:
        set_up(run, checkpoints)
        run.models = {k: load(checkpoints[k]) for k in ("policy", "policy_b")}
        out = {1: run_step(run, 1)}
        ray.get([rank.step_to.remote(checkpoints[STEPS[2]]) for rank in run.ranks])
        run.trainer.on_step_end()  # every rank syncs version 1
        out[2] = run_step(run, 2)
        ray.get([rank.step_to.remote(checkpoints[STEPS[3]]) for rank in run.ranks])
        ray.get(run.ranks[1].update_weights.remote(2))  # only replica 1 receives version 2
        out[3] = run_step(run, 3)
        yield SimpleNamespace(**vars(run), out=out)
    finally:
        tear_down(run)
        tq.close()


def tear_down(run) -> None:
    """Kill this module's actors and wait until the servers' names are free (other modules reuse them)."""
    manager = getattr(run.trainer, "agent_loop_manager", None)
    for actor in [*run.ranks, *(manager.agent_loop_workers if manager else [])]:
        ray.kill(actor)
    deadline = time.time() + 30
    for r in range(REPLICAS):
        while time.time() < deadline:
            try:
                ray.kill(ray.get_actor(server_actor_name(r)))
            except ValueError:  # no such actor: the name is free
                break
            time.sleep(0.2)


def by_replica(responses) -> dict[int, list]:
    out = {r: [] for r in range(REPLICAS)}
    for x in responses:
        out[x.rank].append(x)
    return out


def test_each_steps_requests_are_spread_over_both_replicas(steps):
    train_responses = int(steps.config.data.train_batch_size) * int(steps.config.actor_rollout_ref.rollout.n)
    for step, result in steps.out.items():
        counts = {r: len(xs) for r, xs in by_replica(result.responses).items()}
        assert sum(counts.values()) == train_responses and all(c >= 1 for c in counts.values()), (step, counts)
        assert all(b >= 1 for b in result.batches), (step, result.batches)  # both servers decoded (their own count)
        for r in range(REPLICAS):
            assert result.metrics[f"{PREFIX}replica{r}/responses"] == counts[r]
        assert result.metrics[f"{PREFIX}replica_responses_min"] == min(counts.values())


def test_every_weight_sync_reaches_every_replica(steps, checkpoints):
    """Steps 1 and 2: on each replica the server's log pi_theta(y_t) is the full forward of the weights the trainer
    synced (policy, then policy_b), its weight version is the sync's step, and verl's tags agree."""
    models = steps.models
    for step, version in ((1, 0), (2, 1)):
        result = steps.out[step]
        for r, xs in by_replica(result.responses).items():
            for x in xs:
                assert x.version == version, (step, r)
                want = response_logprobs(models[STEPS[step]], torch.tensor(x.prompt), torch.tensor(x.response))
                torch.testing.assert_close(x.server, want, atol=1e-4, rtol=0)
            # the weights did change between the steps: the other checkpoint's log-probs are far off
            other = models[STEPS[3 - step]]
            gaps = [
                (x.server - response_logprobs(other, torch.tensor(x.prompt), torch.tensor(x.response))).abs().max()
                for x in xs
            ]
            assert max(gaps) > 0.1, (step, r)
        assert {(t["min_global_steps"], t["max_global_steps"]) for t in result.tags} == {(version, version)}
        assert result.metrics[f"{PREFIX}replica_weight_lag_max"] == 0
        for r in range(REPLICAS):
            assert result.metrics[f"{PREFIX}replica{r}/logp_policy_server_vs_trainer"] < 1e-4


def naive_replica_metrics(responses, step: int) -> dict[str, float]:
    out = {}
    for r, xs in by_replica(responses).items():
        out[f"{PREFIX}replica{r}/responses"] = float(len(xs))
        if xs:
            diffs = [abs(float(s) - float(t)) for x in xs for s, t in zip(x.server, x.trainer, strict=True)]
            out[f"{PREFIX}replica{r}/logp_policy_server_vs_trainer"] = sum(diffs) / len(diffs)
    out[f"{PREFIX}replica_responses_min"] = min(out[f"{PREFIX}replica{r}/responses"] for r in range(REPLICAS))
    out[f"{PREFIX}replica_weight_lag_max"] = float(max((step - 1) - x.version for x in responses))
    return out


def test_replica_metrics_equal_a_naive_recomputation(steps):
    for step, result in steps.out.items():
        want = naive_replica_metrics(result.responses, step)
        got = {k: v for k, v in result.metrics.items() if k.startswith(PREFIX + "replica")}
        assert got.keys() == want.keys(), step
        for key, value in want.items():
            assert got[key] == pytest.approx(value, rel=1e-6, abs=1e-9), (step, key)


def test_a_replica_that_missed_a_sync_shows_in_the_metrics(steps):
    """Step 3: replica 0 did not receive the sync of version 2, so it sampled with policy_b while the trainer holds
    policy: its lag is 1 and its log-prob gap is large; replica 1 is in sync."""
    result = steps.out[3]
    replicas = by_replica(result.responses)
    assert {x.version for x in replicas[0]} == {1} and {x.version for x in replicas[1]} == {2}
    assert result.metrics[f"{PREFIX}replica_weight_lag_max"] == 1
    assert result.metrics[f"{PREFIX}replica0/logp_policy_server_vs_trainer"] > 0.1
    assert result.metrics[f"{PREFIX}replica1/logp_policy_server_vs_trainer"] < 1e-4
