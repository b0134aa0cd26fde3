"""Worked addition: the reversed sum with each carry written after its digit, the testbed where guidance can matter.

Owns the worked answer format, its parser and its reward. The problems and both prompts are the addition task's
(`addition.make_problems`, `addition.policy_prompt`, `addition.teacher_prompt`): only the completion differs.

Format (one character = one token): for operands of n digits, n pairs "digit carry", least-significant first,
then `<eos>`. Pair i holds digit i of the sum and the carry out of column i (0 or 1); the last carry is the sum's
leading digit (0 when the sum has n digits). 347+285: 7+5 = 12 -> "21", 4+8+1 = 13 -> "31", 3+2+1 = 6 -> "60",
so "213160<eos>" (2n + 1 = 7 tokens; 11 for 5-digit operands). Every digit depends on the carry written just before
it, so a model that writes the carries can add column by column; a model that skips them must carry in its head.

Reward: 1.0 when the sum read off the worked answer (the n digits, then the last carry as the leading digit) is the
true sum, else 0.0, as a final-answer reward in math RL grades the answer, not the work: a wrong intermediate carry
next to right digits still scores 1 (it is the model's scratch work), a wrong last carry does not (it is a digit of
the sum). A malformed answer (an odd number of characters, a non-digit, a carry other than 0/1) scores 0.

Knows nothing about models, training or sampling.
"""

import re

from recipe.optimal_sampling.tasks.addition import Problem
from recipe.optimal_sampling.tasks.tokenizer import EOS_TOKEN, SPECIAL_TOKENS

_WORKED_RE = re.compile(r"\s*((?:\d[01])+)\s*")  # pairs of (digit, carry), optional surrounding whitespace


def answer_text(problem: Problem) -> str:
    """The worked answer as generated: "347+285" -> "213160" (digit, carry out, per column, least-significant first)."""
    a, b = problem.question.split("+")
    width = max(len(a), len(b))
    a, b = a.zfill(width)[::-1], b.zfill(width)[::-1]  # least-significant digit first
    pairs, carry = [], 0
    for x, y in zip(a, b, strict=True):
        column = int(x) + int(y) + carry
        carry = column // 10
        pairs.append(f"{column % 10}{carry}")
    assert int(problem.answer) == int(a[::-1]) + int(b[::-1]), f"{problem=}"
    return "".join(pairs)


def completion_text(problem: Problem) -> str:
    """What either model should generate after its prompt: the worked answer then `<eos>`, "213160<eos>"."""
    return answer_text(problem) + EOS_TOKEN


def extract_answer(completion: str) -> str | None:
    """The sum (usual order, no leading zeros) that the worked answer in `completion` states, or None when malformed.

    The text is cut at the first special token, as in `addition.extract_answer`; what is left must be pairs of
    (digit, carry in {0, 1}). "213160<eos>" -> "632"; "819191<eos>" -> "1998"; "21316<eos>" -> None (odd length);
    "213260" -> None (a carry of 2)."""
    cut = min([i for i in (completion.find(t) for t in SPECIAL_TOKENS) if i >= 0], default=len(completion))
    match = _WORKED_RE.fullmatch(completion[:cut])
    if match is None:
        return None
    worked = match.group(1)
    digits = worked[0::2][::-1]  # (n,) the sum's digits, most-significant first
    return str(int(worked[-1] + digits))  # the last carry leads; int() drops a leading 0


def reward(problem: Problem, completion: str) -> float:
    """1.0 when `completion`'s worked answer states the right sum (see the module docstring), else 0.0."""
    return 1.0 if extract_answer(completion) == problem.answer else 0.0
