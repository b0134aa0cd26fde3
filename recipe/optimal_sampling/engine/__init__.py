"""Two causal LMs decoding in lockstep, sampling every token from q* (see `core/`)."""

from .config import PRESETS, SamplerConfig
from .prompts import build_dual_prompts, stop_ids_for
from .sampler import DualSample, DualSampler, check_shared_vocabulary, resolve_vocab_size
from .step import StepRecord, sample_step

__all__ = [
    "PRESETS",
    "DualSample",
    "DualSampler",
    "SamplerConfig",
    "StepRecord",
    "build_dual_prompts",
    "check_shared_vocabulary",
    "resolve_vocab_size",
    "sample_step",
    "stop_ids_for",
]
