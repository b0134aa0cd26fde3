"""A character-level tokenizer for the synthetic addition task, built in code (no download).

Owns: the vocabulary (special tokens, digits, a few symbols, the ASCII letters), the chat template the
teacher is trained with, and the names of the stop tokens. Every character is one token; special tokens
are matched whole before the text is split into characters. Encoding adds no BOS/EOS. The result is a
plain `PreTrainedTokenizerFast`, so `save_pretrained` + `AutoTokenizer.from_pretrained` round-trips it
with no custom code.

Knows nothing about the addition task, the models or the sampler.
"""

import string

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

PAD_TOKEN = "<pad>"
EOS_TOKEN = "<eos>"
UNK_TOKEN = "<unk>"
IM_START_TOKEN = "<|im_start|>"
IM_END_TOKEN = "<|im_end|>"
SPECIAL_TOKENS = (PAD_TOKEN, EOS_TOKEN, UNK_TOKEN, IM_START_TOKEN, IM_END_TOKEN)
# Tokens a sampler should stop on: `<eos>` ends every answer (policy and teacher alike), `<|im_end|>` is
# the chat end-of-turn marker, kept in the set so a teacher that closes its turn also stops.
STOP_TOKENS = (EOS_TOKEN, IM_END_TOKEN)

# Digits, the symbols the prompts use, lowercase letters (roles, words) and the two capitals of "Q: ... A:".
CHARACTERS = string.digits + "+=-*:.,?!' \n" + string.ascii_lowercase + "AQ"

# ChatML, as Qwen writes it: every message is `<|im_start|>{role}\n{content}<|im_end|>\n`.
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\n' }}{%- endif %}"
)


def build_vocab() -> dict[str, int]:
    """Token -> id: the special tokens first (`<pad>` = 0), then one id per character of CHARACTERS."""
    tokens = list(SPECIAL_TOKENS) + list(CHARACTERS)
    assert len(set(tokens)) == len(tokens), f"duplicate tokens in {tokens=}"
    return {token: i for i, token in enumerate(tokens)}


def build_tokenizer() -> PreTrainedTokenizerFast:
    """The task tokenizer: WordLevel over single characters, specials matched whole, no added BOS/EOS.

    55 tokens; characters outside CHARACTERS encode to `<unk>`. Padding is on the left (for generation)."""
    vocab = build_vocab()
    assert len(vocab) < 64, f"{len(vocab)=}"
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK_TOKEN))
    # `[\s\S]` rather than `.` so that newlines are split off as tokens too.
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    backend.decoder = decoders.Fuse()  # join characters back without separators
    backend.add_special_tokens(list(SPECIAL_TOKENS))
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token=PAD_TOKEN,
        eos_token=EOS_TOKEN,
        unk_token=UNK_TOKEN,
        additional_special_tokens=[IM_START_TOKEN, IM_END_TOKEN],
        padding_side="left",
        clean_up_tokenization_spaces=False,
        model_max_length=128,
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def stop_token_ids(tokenizer: PreTrainedTokenizerFast) -> list[int]:
    """Ids of STOP_TOKENS in `tokenizer`: `[<eos>, <|im_end|>]`."""
    ids = tokenizer.convert_tokens_to_ids(list(STOP_TOKENS))
    assert tokenizer.unk_token_id not in ids, f"stop tokens missing from the vocabulary: {STOP_TOKENS=} {ids=}"
    return ids
