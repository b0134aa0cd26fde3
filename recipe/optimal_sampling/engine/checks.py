"""Checks of what callers hand `DualSampler`: models, prompts and the once-per-step guard on the logits.

Owns the one-line ValueErrors of the engine's public entry points (types, lengths, vocabulary range, position
budget) and the FloatingPointError of non-finite logits. Knows nothing about sampling maths or tokenizers' text.
"""

import operator

from torch import Tensor, nn

from .config import SamplerConfig

FIX_DTYPE = "load the models in bfloat16 or float32 (CLI: --dtype bfloat16), or check the checkpoint's weights"


def check_models(policy_model, teacher_model, config) -> None:
    """Raise unless both models are torch modules with parameters and `config` is a SamplerConfig (or None)."""
    for name, model in (("policy_model", policy_model), ("teacher_model", teacher_model)):
        if not isinstance(model, nn.Module) or next(model.parameters(), None) is None:
            raise ValueError(
                f"{name} must be a causal LM (a torch nn.Module with weights, e.g. AutoModelForCausalLM), "
                f"got {type(model).__name__}"
            )
    if config is not None and not isinstance(config, SamplerConfig):
        raise ValueError(
            f"config must be a SamplerConfig (e.g. SamplerConfig.preset('balanced')) or None, "
            f"got {type(config).__name__}"
        )


def check_prompts(prompts, name: str, vocab_size: int, model: nn.Module | None, max_new_tokens: int) -> None:
    """`prompts`: a list of non-empty token-id lists inside [0, vocab_size) whose longest, plus max_new_tokens,
    fits `model`'s positions (config.max_position_embeddings; not checked when model is None)."""
    if not isinstance(prompts, list | tuple):
        raise ValueError(
            f"{name} must be a list of token-id lists, got {type(prompts).__name__}: tokenize first "
            "(e.g. tokenizer(texts).input_ids), or call generate_text with strings"
        )
    for i, ids in enumerate(prompts):
        if not isinstance(ids, list | tuple) or not all(_is_token_id(t) for t in ids):
            raise ValueError(f"{name}[{i}] must be a list of int token ids, got {_short(ids)}")
        if len(ids) == 0:
            raise ValueError(f"{name}[{i}] is empty: every prompt needs at least one token")
        bad = [int(t) for t in ids if not 0 <= int(t) < vocab_size]
        if bad:
            raise ValueError(f"{name}[{i}] has ids outside the shared vocabulary [0, {vocab_size}): {bad[:8]}")
    if model is not None and prompts:
        _check_positions(prompts, name, model, max_new_tokens)


def _check_positions(prompts, name: str, model: nn.Module, max_new_tokens: int) -> None:
    limit = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if not isinstance(limit, int):
        return
    i = max(range(len(prompts)), key=lambda k: len(prompts[k]))
    n = len(prompts[i])
    if n + max_new_tokens > limit:
        fix = f"lower max_new_tokens to <= {limit - n}" if n < limit else f"shorten it to < {limit} tokens"
        raise ValueError(
            f"{name}[{i}] has {n} tokens and max_new_tokens={max_new_tokens} needs {n + max_new_tokens} positions, "
            f"but the {name.split('_')[0]} model has max_position_embeddings={limit}: {fix}"
        )


def check_max_new_tokens(max_new_tokens) -> None:
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be an int >= 1, got {max_new_tokens!r}")


def check_seed(seed) -> None:
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or seed < 0):
        raise ValueError(f"seed must be an int >= 0 or None (a random seed), got {seed!r}")


def non_finite_rows(logits: Tensor) -> Tensor:
    """(B,) bool: rows with a NaN or +-inf logit (an all -inf row included). logits: (B, V). No host sync."""
    return ~logits.isfinite().all(dim=-1)


def raise_non_finite(flags: list[bool], bad_rows: list[Tensor], step: int) -> None:
    """Raise a FloatingPointError naming the model(s), the step and the rows whose logits were not finite.
    flags: [policy bad, teacher bad] read on the host; bad_rows: the matching (B,) bool tensors."""
    names = [name for name, flag in zip(("policy", "teacher"), flags, strict=True) if flag]
    if not names:
        return
    rows = sorted({i for name, rows in zip(("policy", "teacher"), bad_rows, strict=True) if name in names
                   for i in rows.nonzero().flatten().tolist()})  # fmt: skip
    raise FloatingPointError(
        f"the {' and '.join(names)} model produced NaN or infinite logits at generated token {step} (rows "
        f"{rows[:8]}): fp16 overflow? {FIX_DTYPE}; the sample was discarded"
    )


def _is_token_id(t) -> bool:
    """An int-like (int, numpy or 0-d torch integer), not a bool, float or string."""
    if isinstance(t, bool):
        return False
    try:
        operator.index(t)
    except TypeError:
        return False
    return True


def _short(value, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
