"""The fast decode path of `DualSampler` (backend "cuda_graph"): static KV caches, Triton kernels, the fused q*
step of `core.fused` and one CUDA graph per batch bucket. `FastDualEngine` lives in `engine.py` and continuous
batching in `scheduler.py`; both are imported on first use. This module only decides which backend runs, and says
why when the fast one cannot.
"""

import torch
from torch import nn

from ...core.fused import fused_available
from .model import unsupported_reason

BACKENDS = ("auto", "reference", "cuda_graph")


def fast_path_reasons(device: torch.device, policy, teacher) -> list[str]:
    """Why the cuda_graph backend cannot run these models on this device ([] when it can). policy, teacher: the
    models or their HF configs (so that this can be asked before loading any weights)."""
    reasons = [f"{name}: {r}" for name, m in (("policy", policy), ("teacher", teacher)) if (r := unsupported_reason(m))]
    if device.type != "cuda" or not fused_available(device):
        reasons.append(f"the models are on {device}, the cuda_graph backend needs a CUDA device with Triton")
    return reasons


def choose_backend(backend: str, device: torch.device, policy: nn.Module, teacher: nn.Module) -> tuple[str, str]:
    """("reference" | "cuda_graph", why). "auto" picks cuda_graph on a CUDA device with Triton when both models are
    Qwen3s the fast path implements, else reference; asking for "cuda_graph" where it cannot run is an error."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "reference":
        return backend, "backend='reference' was asked for"
    reasons = fast_path_reasons(device, policy, teacher)
    if not reasons:
        return "cuda_graph", "both models are Qwen3s the fast path implements, on a CUDA device with Triton"
    if backend == "auto":
        return "reference", "the fast engine cannot run here: " + "; ".join(reasons)
    raise ValueError(f"backend='cuda_graph' cannot run here ({'; '.join(reasons)}): use backend='reference' or 'auto'")


def resolve_backend(backend: str, device: torch.device, policy: nn.Module, teacher: nn.Module) -> str:
    """The backend `choose_backend` picks, without the reason."""
    return choose_backend(backend, device, policy, teacher)[0]
