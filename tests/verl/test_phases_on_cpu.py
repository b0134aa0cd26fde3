"""What the dual server measures per phase of a sync step (`phases.PhaseLog`): phases follow verl's calls on the
server (wake -> sync, finish_weight_update -> rollout, sleep -> train), each records its wall time, the rollout its
engine time, requests and tokens, and (on CUDA) the memory numbers; the trainer turns them into
`optimal_sampling/server/*`. The in-process server on CPU goes through one whole step."""

import asyncio
import logging
from types import SimpleNamespace

import ray

from recipe.optimal_sampling.verl import server as server_module
from recipe.optimal_sampling.verl.phases import PhaseLog
from recipe.optimal_sampling.verl.server import PHASE_PREFIX
from recipe.optimal_sampling.verl.trainer import OptimalSamplingTrainer
from tests.verl.test_server_engine_on_cpu import SAMPLING, make_server


def fake_memory():
    fake_memory.calls += 1
    return {"server_allocated_gib": 35.0, "server_reserved_gib": 36.0, "server_peak_gib": 30.0 + fake_memory.calls,
            "device_used_gib": 60.0, "device_total_gib": 139.8}  # fmt: skip


fake_memory.calls = 0


def test_phases_record_their_numbers_when_they_end():
    log = PhaseLog(fake_memory)
    assert log.enter("sync").startswith("start -> sync after ")  # model loading: logged, not a step phase
    assert log.enter("sync") is None and log.metrics("p/") == {"p/device_total_gib": 139.8}
    log.enter("rollout")
    log.count(1.5, 3, 40)
    log.count(0.5, 1, 2)
    line = log.enter("train")
    assert "engine 2.00 s for 4 requests, 42 tokens; server peak 33.00 GiB" in line and "of 139.80 GiB" in line
    m = log.metrics("p/")
    assert (m["p/rollout_engine_s"], m["p/rollout_requests"], m["p/rollout_tokens"]) == (2.0, 4, 42)
    assert m["p/rollout_server_peak_gib"] == 33.0 and m["p/sync_server_peak_gib"] == 32.0
    assert m["p/rollout_s"] >= 0 and m["p/rollout_start_unix"] >= m["p/sync_start_unix"]
    assert "p/train_s" not in m and "p/sync_engine_s" not in m  # train has not ended; only the rollout has engine time


def test_the_server_logs_and_returns_each_phase_of_a_step(checkpoints, caplog):
    server = make_server(checkpoints)  # CPU: times and engine counts, no memory numbers
    with caplog.at_level(logging.WARNING, logger=server_module.__name__):
        asyncio.run(server.wake_up(tags=["weights"]))  # the weight sync of verl's on_init_end / on_step_end
        asyncio.run(server.update_weights_bucket(list(server.policy.state_dict().items())))
        asyncio.run(server.finish_weight_update(global_steps=1))
        asyncio.run(server.wake_up(tags=["kv_cache"]))  # verl's second wake: no new phase
        outs = [asyncio.run(server.generate([5, 6], dict(SAMPLING, max_tokens=3), f"r{i}", teacher_prompt_ids=[7]))
                for i in range(2)]  # fmt: skip
        asyncio.run(server.sleep())
        asyncio.run(server.wake_up(tags=["weights"]))
    lines = [r.getMessage() for r in caplog.records if "->" in r.getMessage()]
    assert [line.split(": ", 1)[1].split(" after")[0] for line in lines] == [
        "start -> sync", "sync -> rollout", "rollout -> train", "train -> sync"]  # fmt: skip
    assert lines[2].startswith("dual server 0 step 1: rollout -> train") and "2 requests" in lines[2]
    m = asyncio.run(server.phase_metrics())
    assert m[PHASE_PREFIX + "rollout_requests"] == 2
    assert m[PHASE_PREFIX + "rollout_tokens"] == sum(len(o.token_ids) for o in outs)
    assert 0 < m[PHASE_PREFIX + "rollout_engine_s"] <= m[PHASE_PREFIX + "rollout_s"]
    assert {f"{PHASE_PREFIX}{phase}_s" for phase in ("sync", "rollout", "train")} <= set(m)
    assert not any("gib" in k for k in m)


@ray.remote(num_cpus=0)
class FakeServer:
    def __init__(self, metrics):
        self.metrics = metrics

    def phase_metrics(self):
        return self.metrics


def test_the_trainer_takes_each_number_from_the_slowest_fullest_server(ray_local):
    handles = [FakeServer.remote({"a": 1.0, "b": 5.0}), FakeServer.remote({"a": 3.0})]
    trainer = SimpleNamespace(llm_server_manager=SimpleNamespace(server_handles=handles))
    assert OptimalSamplingTrainer._server_phase_metrics(trainer) == {"a": 3.0, "b": 5.0}
    assert OptimalSamplingTrainer._server_phase_metrics(SimpleNamespace()) == {}
