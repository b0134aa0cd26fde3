"""`DualReplica`: one `dual` rollout replica = one `DualSamplerServer` Ray actor on the GPU of its trainer worker.

Differs from verl's `vLLMReplica` only in what it launches: a single in-process sampler actor (no HTTP server, no
tensor parallelism), named `dual_server_{replica_rank}_0` so that the trainer-side `DualServerAdapter` finds it.
Knows nothing about sampling or weights.
"""

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy
from verl.utils.device import get_resource_name
from verl.workers.rollout.replica import RolloutReplica

from . import ROLLOUT_NAME
from .server import DualSamplerServer


def server_actor_name(replica_rank: int, node_rank: int = 0) -> str:
    """The Ray actor name of a replica's server (the adapter looks it up by this name)."""
    return f"{ROLLOUT_NAME}_server_{replica_rank}_{node_rank}"


def _node_and_device(worker) -> tuple[str, str | None]:
    """(node id, accelerator id or None on a CPU-only worker) of a Ray actor."""
    context = ray.get_runtime_context()
    ids = context.get_accelerator_ids().get(get_resource_name()) or []
    return context.get_node_id(), (str(ids[0]) if ids else None)


class DualReplica(RolloutReplica):
    """One `DualSamplerServer` per replica (rollout TP = 1, so one per trainer GPU in hybrid mode)."""

    async def launch_servers(self):
        # Differs from vLLMReplica.launch_servers: one actor, created ready to serve (no HTTP server to start).
        assert len(self.workers) == self.world_size == 1, (
            f"the dual backend runs one server per GPU (rollout TP 1); got {len(self.workers)=} {self.world_size=}"
        )
        # 1) where the trainer worker of this replica lives
        node_id, device = await self.workers[0].__ray_call__.remote(_node_and_device)
        # 2) the server actor on that node, told which GPU to use (Ray must not reset CUDA_VISIBLE_DEVICES)
        name = server_actor_name(self.replica_rank) + self.name_suffix
        server = (
            ray.remote(DualSamplerServer)
            .options(
                scheduling_strategy=NodeAffinitySchedulingStrategy(node_id=node_id, soft=False),
                runtime_env={"env_vars": {"RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES": "1"}},
                name=name,
                max_concurrency=self.max_concurrency,
                num_cpus=0,
            )
            .remote(
                config=self.config,
                model_config=self.model_config,
                replica_rank=self.replica_rank,
                cuda_visible_devices=device,
            )
        )
        # 3) wait until the models are loaded, so errors (bad teacher_path, vocab mismatch) surface here
        await server.ping.remote()
        self.servers = [server]
        self._server_handle = server
        self._server_address = name  # the router uses it as an id only
