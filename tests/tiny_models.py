"""Tiny Qwen3 models with random weights, built from a config in-process (never downloaded)."""

import torch
from transformers import Qwen3Config, Qwen3ForCausalLM


def tiny_qwen3(seed: int, vocab_size: int = 32, sharpness: float = 1.0, layers: int = 2) -> Qwen3ForCausalLM:
    """A 2-layer Qwen3 with hidden 32. `sharpness` scales the output head so next-token distributions are peakier
    (random init gives nearly uniform ones, which would make every alpha close to 0.5)."""
    torch.manual_seed(seed)
    config = Qwen3Config(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        max_position_embeddings=256,
        tie_word_embeddings=False,
    )
    model = Qwen3ForCausalLM(config).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(sharpness)
    return model
