"""The fast decode path of `DualSampler` (backend "cuda_graph"): static KV caches, Triton kernels, the fused q*
step of `core.fused` and one CUDA graph per batch bucket. `FastDualEngine` lives in `engine.py` and is imported
on first use; this module only decides which backend runs.
"""

import torch
from torch import nn

from ...core.fused import fused_available
from .model import unsupported_reason

BACKENDS = ("auto", "reference", "cuda_graph")


def resolve_backend(backend: str, device: torch.device, policy: nn.Module, teacher: nn.Module) -> str:
    """ "reference" or "cuda_graph". "auto" picks cuda_graph on a CUDA device with Triton when both models are
    Qwen3s the fast path implements, else reference; asking for "cuda_graph" where it cannot run is an error."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "reference":
        return backend
    reasons = [f"{name}: {r}" for name, m in (("policy", policy), ("teacher", teacher)) if (r := unsupported_reason(m))]
    if device.type != "cuda" or not fused_available(device):
        reasons.append(f"the models are on {device}, the cuda_graph backend needs a CUDA device with Triton")
    if not reasons:
        return "cuda_graph"
    if backend == "auto":
        return "reference"
    raise ValueError(f"backend='cuda_graph' cannot run here ({'; '.join(reasons)}): use backend='reference' or 'auto'")
