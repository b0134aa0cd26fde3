"""`DualServerAdapter`: the trainer-side end of the `dual` backend, living in each actor worker process. verl calls
`resume`/`update_weights`/`release` on it around every rollout; it forwards the policy's full HF-named tensors to
the replica's `DualSamplerServer` in CPU buckets through Ray.

Differs from verl's vLLM `ServerAdapter` in the transport (Ray object refs instead of CUDA IPC over ZMQ: simple and
device-agnostic; the policy copy is updated in place) and in what sleep means (the server keeps both models
resident). Knows nothing about sampling.
"""

import os
from collections.abc import Iterable

import ray
import torch
from verl.workers.rollout.base import BaseRollout

from .replica import server_actor_name


class DualServerAdapter(BaseRollout):
    """Weight-sync endpoint of one trainer rank; only the rank that owns a server (rollout TP 1: every rank) sends."""

    def __init__(self, config, model_config, device_mesh, replica_rank: int = -1):
        super().__init__(config, model_config, device_mesh)
        rank = int(os.environ.get("RANK", "0"))
        # rollout TP = 1 (checked at start-up): each trainer rank owns the server of replica `rank`
        self.replica_rank = rank if replica_rank == -1 else replica_rank
        self.is_leader_rank = True
        self.bucket_bytes = int(self.config.checkpoint_engine.update_weights_bucket_megabytes) << 20
        self.wire_dtype = getattr(torch, self.config.dtype)  # the servers' dtype on GPU (rollout.dtype)
        self._server = None

    @property
    def server(self):
        if self._server is None:  # the server is launched after the trainer workers, so look it up lazily
            self._server = ray.get_actor(server_actor_name(self.replica_rank))
        return self._server

    async def resume(self, tags: list[str]):
        await self.server.wake_up.remote(tags=tags)

    async def release(self):
        await self.server.sleep.remote()

    @torch.no_grad()
    async def update_weights(
        self, weights: Iterable[tuple[str, torch.Tensor]], wire_format: str = "named_tensors", **kwargs
    ):
        """Stream (name, tensor) pairs to the server in buckets of `update_weights_bucket_megabytes` (GPU tensors cast
        to the rollout dtype first: `to_wire`), then let it check completeness and take `global_steps` as its weight
        version. The generator is always consumed fully: producing a tensor may be a collective (FSDP full_tensor)
        that every rank must join."""
        if wire_format != "named_tensors":
            raise ValueError(
                f"the dual backend receives full tensors only (wire_format='named_tensors'), got {wire_format!r}"
            )
        bucket, size = [], 0
        for name, tensor in weights:
            cpu = to_wire(tensor, self.wire_dtype)
            bucket.append((name, cpu))
            size += cpu.numel() * cpu.element_size()
            if size >= self.bucket_bytes:
                await self.server.update_weights_bucket.remote(bucket)
                bucket, size = [], 0
        if bucket:
            await self.server.update_weights_bucket.remote(bucket)
        await self.server.finish_weight_update.remote(kwargs.get("global_steps"))


def to_wire(tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The host copy of one weight for the server. A floating tensor on a GPU is cast to the servers' dtype there,
    before the copy: FSDP's fp32 master weights then cross host memory and Ray at half the bytes, and the server
    (which stores that dtype on GPU) gets the same values. CPU tensors (CPU tests, where the server computes in
    float32) are sent as they are."""
    tensor = tensor.detach()
    if tensor.is_cuda and tensor.is_floating_point():
        tensor = tensor.to(dtype)
    return tensor.to("cpu", non_blocking=False).contiguous()
