"""Multi-digit addition with a verifiable answer: the synthetic task of the demo and the experiments.

Owns: the problems (`make_problems`, with disjoint train/test splits), the two prompt formats, the
answer format and the reward.

Formats (one character = one token, see `tokenizer.py`):
- question: two operands of exactly `n_digits` digits, e.g. "347+285" (no leading zeros; 0-9 when
  n_digits = 1). Fixed-width operands put every digit at a fixed position, which a tiny model learns fast.
- policy prompt (plain): "Q: 347+285\\nA: ".
- teacher prompt (chat): "<|im_start|>user\\n347+285<|im_end|>\\n<|im_start|>assistant\\n".
- completion, identical for both roles: the sum's digits REVERSED (least-significant first, the order in
  which carries propagate), then `<eos>`: 347+285 = 632 -> "236<eos>". Both roles end with `<eos>` (not
  the teacher with `<|im_end|>`) so the two models agree token for token on the whole completion,
  the stop included, which a per-token mixture of the two needs.
- `Problem.answer` and `extract_answer` use the usual order ("632"); only the generated text is reversed.

Train/test disjointness: each operand pair belongs to one split by a fixed hash (about 10% are test),
and the two splits draw from different seed streams, so no test problem is ever a training problem.

Knows nothing about models, training or sampling.
"""

import random
import re
import zlib
from dataclasses import dataclass

from transformers import PreTrainedTokenizerBase

from recipe.optimal_sampling.tasks.tokenizer import EOS_TOKEN, SPECIAL_TOKENS

SPLITS = ("train", "test")
ROLES = ("policy", "teacher")
TEST_FRACTION_MOD = 10  # a pair is a test pair when crc32("a+b") % 10 == 0
_ANSWER_RE = re.compile(r"\s*(\d+)\s*")


@dataclass(frozen=True)
class Problem:
    """One addition problem: `question` "347+285", `answer` the true sum in the usual order, "632"."""

    question: str
    answer: str


def is_test_pair(a: int, b: int) -> bool:
    """True when the pair (a, b) belongs to the test split (a fixed hash; about 1 pair in 10)."""
    return zlib.crc32(f"{a}+{b}".encode()) % TEST_FRACTION_MOD == 0


def _operand_range(n_digits: int) -> tuple[int, int]:
    """[low, high) of an operand with exactly `n_digits` digits."""
    return (0 if n_digits == 1 else 10 ** (n_digits - 1)), 10**n_digits


def make_problems(n: int, seed: int, n_digits: int = 3, split: str = "train") -> list[Problem]:
    """`n` problems drawn uniformly from `split`, deterministic in (n, seed, n_digits, split).

    Test problems are distinct from each other; train problems may repeat (they are fresh draws)."""
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n=}")
    if n_digits < 1:
        raise ValueError(f"n_digits must be >= 1, got {n_digits=}")
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split=!r}")
    rng = random.Random(f"addition/{split}/{n_digits}/{seed}")  # a string seed is stable across runs
    low, high = _operand_range(n_digits)
    is_test = split == "test"
    problems: list[Problem] = []
    seen: set[tuple[int, int]] = set()
    for _ in range(1000 + 100 * n):
        if len(problems) == n:
            return problems
        a, b = rng.randrange(low, high), rng.randrange(low, high)
        if is_test_pair(a, b) != is_test or (is_test and (a, b) in seen):
            continue
        seen.add((a, b))
        problems.append(Problem(question=f"{a}+{b}", answer=str(a + b)))
    if len(problems) == n:
        return problems
    raise ValueError(f"could not draw {n=} distinct {split} problems with {n_digits=}; ask for fewer or more digits")


def policy_prompt(question: str) -> str:
    """The policy's plain prompt: "Q: 347+285\\nA: "."""
    return f"Q: {question}\nA: "


def teacher_messages(question: str) -> list[dict[str, str]]:
    """The teacher's chat messages: one user turn holding the question."""
    return [{"role": "user", "content": question}]


def teacher_prompt(question: str, tokenizer: PreTrainedTokenizerBase) -> str:
    """The teacher's prompt: its chat template applied to `teacher_messages`, with the generation prompt."""
    return tokenizer.apply_chat_template(teacher_messages(question), tokenize=False, add_generation_prompt=True)


def prompt(role: str, question: str, tokenizer: PreTrainedTokenizerBase) -> str:
    """The prompt of `role` ("policy" or "teacher") for `question`."""
    if role == "policy":
        return policy_prompt(question)
    if role == "teacher":
        return teacher_prompt(question, tokenizer)
    raise ValueError(f"role must be one of {ROLES}, got {role=!r}")


def answer_text(problem: Problem) -> str:
    """The answer as generated: the sum's digits reversed, "632" -> "236"."""
    return problem.answer[::-1]


def completion_text(problem: Problem) -> str:
    """What either model should generate after its prompt: the reversed answer then `<eos>`, "236<eos>"."""
    return answer_text(problem) + EOS_TOKEN


def extract_answer(completion: str) -> str | None:
    """The sum (usual order) written in `completion`, or None when it is malformed.

    The text is cut at the first special token (`<eos>`, `<|im_end|>`, ...; so a completion decoded with or
    without special tokens both work); what is left must be digits with optional surrounding whitespace.
    "236<eos>" -> "632"; " 236" -> "632"; "23x" -> None; "" -> None."""
    cut = min([i for i in (completion.find(t) for t in SPECIAL_TOKENS) if i >= 0], default=len(completion))
    match = _ANSWER_RE.fullmatch(completion[:cut])
    return None if match is None else match.group(1)[::-1]


def reward(problem: Problem, completion: str) -> float:
    """1.0 when `completion` states the right sum (see `extract_answer`), else 0.0."""
    return 1.0 if extract_answer(completion) == problem.answer else 0.0
