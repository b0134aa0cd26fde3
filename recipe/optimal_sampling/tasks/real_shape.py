"""A workload at real shapes with nothing to download: Qwen3 models built from the public configs' shapes with random
weights, a tokenizer with the same vocabulary size built in code, prompts of realistic length and long-tailed
per-response length caps (random weights never stop on their own, so a response's cap is its length).

Owns the shapes (`ARCH`), the random models (`random_qwen3`), the tokenizer (`build_tokenizer`: one character per
token, ChatML template), prompt texts (`prompt_text`) and the cap distribution (`response_cap`). Used by
`bench/grpo_rollout.py` and by `verl/real_shape.py` (checkpoints and verl datasets for `scripts/real_shape_gpu.sh`).
Knows nothing about the sampler, the engine or verl.
"""

import math
import random
from functools import lru_cache

import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast, Qwen3Config, Qwen3ForCausalLM

from .tokenizer import CHAT_TEMPLATE

# Public Qwen3 configs: hidden, intermediate, layers, heads, kv heads, head_dim, tied embeddings; vocab 151,936.
ARCH = {
    "0.6b": (1024, 3072, 28, 16, 8, 128, True),
    "1.7b": (2048, 6144, 28, 16, 8, 128, True),
    "4b": (2560, 9728, 36, 32, 8, 128, True),
    "8b": (4096, 12288, 36, 32, 8, 128, False),
    "14b": (5120, 17408, 40, 40, 8, 128, False),
    "tiny": (64, 128, 2, 4, 2, 16, False),  # head_dim 16: the smallest shape the fast engine runs (CPU tests)
}
VOCAB, TINY_VOCAB = 151_936, 256
PAD_TOKEN, IM_START_TOKEN, EOS_TOKEN = "<|endoftext|>", "<|im_start|>", "<|im_end|>"  # Qwen's names
SPECIAL_TOKENS = (PAD_TOKEN, IM_START_TOKEN, EOS_TOKEN)  # ids 0, 1, 2
PROMPT_EXCLUDED = set("<|>")  # prompt texts never spell a special token


def qwen3_config(name: str, vocab: int, eos_id: int | None = None, pad_id: int | None = None) -> Qwen3Config:
    hidden, inter, layers, heads, kv, head_dim, tied = ARCH[name]
    return Qwen3Config(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv, head_dim=head_dim, tie_word_embeddings=tied,
        max_position_embeddings=40960, rope_theta=1_000_000, rms_norm_eps=1e-6,
        eos_token_id=eos_id, pad_token_id=pad_id, bos_token_id=None,
    )  # fmt: skip


def random_qwen3(name: str, seed: int, vocab: int, device, dtype: torch.dtype, **ids) -> Qwen3ForCausalLM:
    """A Qwen3 of shape ARCH[name] with random weights, initialised directly on `device` in `dtype` (a 14B model in
    seconds on a GPU). ids: eos_id / pad_id for the config. "tiny" gets a 6x output head: peakier next-token
    distributions, so that alpha and the top-p set vary."""
    torch.manual_seed(seed)
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = Qwen3ForCausalLM(qwen3_config(name, vocab, **ids)).eval().requires_grad_(False)
    finally:
        torch.set_default_dtype(torch.float32)
    if name == "tiny":
        with torch.no_grad():
            model.lm_head.weight.mul_(6.0)
    return model


def vocab_characters(n: int) -> list[str]:
    """n distinct characters, one per token: newline, printable ASCII, then code points from U+00A1 up (no
    surrogates, no noncharacters)."""
    chars = ["\n"] + [chr(c) for c in range(0x20, 0x7F)]
    code = 0xA1
    while len(chars) < n:
        if not (0xD800 <= code <= 0xDFFF or 0xFDD0 <= code <= 0xFDEF or code & 0xFFFE == 0xFFFE):
            chars.append(chr(code))
        code += 1
    assert len(chars) >= n, f"{n=} is smaller than the {len(chars)} characters the templates need"
    return chars[:n]


def build_tokenizer(vocab_size: int = VOCAB) -> PreTrainedTokenizerFast:
    """Exactly `vocab_size` tokens: the 3 special tokens (ids 0-2: pad, im_start, eos = im_end), then one token per
    character (`vocab_characters`), so that every id a model samples decodes and every text encodes one token per
    character. No BOS/EOS is added; ChatML chat template (the teacher's; the policy gets a plain template)."""
    chars = vocab_characters(vocab_size - len(SPECIAL_TOKENS))
    vocab = {token: i for i, token in enumerate([*SPECIAL_TOKENS, *chars])}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token=PAD_TOKEN))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")  # every character alone
    backend.decoder = decoders.Fuse()
    backend.add_special_tokens(list(SPECIAL_TOKENS))
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token=PAD_TOKEN,
        eos_token=EOS_TOKEN,
        additional_special_tokens=[IM_START_TOKEN],
        padding_side="left",
        clean_up_tokenization_spaces=False,
        model_max_length=40960,
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    assert len(tokenizer) == vocab_size, f"{len(tokenizer)=} {vocab_size=}"
    return tokenizer


def prompt_text(rng: random.Random, tokenizer: PreTrainedTokenizerFast, n_tokens: int) -> str:
    """A text of exactly n_tokens tokens: random non-space characters of the vocabulary (noise in many scripts)."""
    alphabet = _prompt_alphabet(len(tokenizer))
    return "".join(rng.choice(alphabet) for _ in range(n_tokens))


@lru_cache
def _prompt_alphabet(vocab_size: int) -> tuple[str, ...]:
    chars = vocab_characters(vocab_size - len(SPECIAL_TOKENS))
    return tuple(c for c in chars if not c.isspace() and c not in PROMPT_EXCLUDED)


def response_cap(rng: random.Random, median: float, sigma: float, max_tokens: int) -> int:
    """One response's length cap: log-normal with this median and sigma, in [1, max_tokens] (one draw of rng)."""
    return min(max_tokens, max(1, round(rng.lognormvariate(math.log(median), sigma))))
