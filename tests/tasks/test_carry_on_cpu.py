"""The worked (carry) task and the task registry: format against a column-by-column reference, parser, reward,
splits, new-token budget, greedy evaluation of an oracle. No trained models."""

import re
from types import SimpleNamespace

import pytest
import torch

from recipe.optimal_sampling.tasks import (
    ADDITION,
    CARRY,
    Problem,
    addition,
    build_tokenizer,
    carry,
    get_task,
    greedy_accuracy,
    greedy_generate,
    is_test_pair,
    make_problems,
    policy_prompt,
    stop_token_ids,
    teacher_prompt,
)
from recipe.optimal_sampling.tasks.registry import task_for_data_source


def reference_worked(a: int, b: int, n_digits: int) -> str:
    """Column i's digit is digit i of a + b; its carry is whether the low i + 1 digits of a and b overflow."""
    out = []
    for i in range(n_digits):
        digit = (a + b) // 10**i % 10
        overflow = a % 10 ** (i + 1) + b % 10 ** (i + 1) >= 10 ** (i + 1)
        out.append(f"{digit}{int(overflow)}")
    return "".join(out)


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


# --- format --------------------------------------------------------------------------------------------------


def test_worked_answer_examples():
    assert carry.completion_text(Problem("347+285", "632")) == "213160<eos>"
    assert carry.completion_text(Problem("999+999", "1998")) == "819191<eos>"  # last carry = leading 1
    assert carry.answer_text(Problem("10000+20000", "30000")) == "0000000030"


@pytest.mark.parametrize("n_digits", [1, 3, 5])
def test_worked_answer_matches_a_column_reference(n_digits):
    for p in make_problems(300, seed=2, n_digits=n_digits):
        a, b = map(int, p.question.split("+"))
        assert carry.answer_text(p) == reference_worked(a, b, n_digits)


def test_five_digit_answers_are_eleven_tokens_and_fit_the_budget(tok):
    lengths = {len(tok.encode(carry.completion_text(p))) for p in make_problems(200, seed=0, n_digits=5)}
    assert lengths == {11}
    assert CARRY.max_new_tokens(5) == 13 > 11
    assert ADDITION.max_new_tokens(3) == 8  # the addition task's budget is unchanged


# --- parser and reward ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("completion", "expected"),
    [
        ("213160<eos>", "632"),
        ("213160", "632"),
        (" 213160 ", "632"),
        ("213160<|im_end|>", "632"),
        ("819191<eos>", "1998"),
        ("00<eos>", "0"),
        ("21316<eos>", None),  # odd length: a digit without its carry
        ("213260<eos>", None),  # a carry of 2
        ("2131 60", None),
        ("", None),
        ("<eos>", None),
        ("21x160", None),
    ],
)
def test_extract_answer(completion, expected):
    assert carry.extract_answer(completion) == expected


def test_reward_grades_the_sum_not_the_intermediate_carries():
    problem = Problem("347+285", "632")
    assert carry.reward(problem, "213160<eos>") == 1.0
    assert carry.reward(problem, "203160<eos>") == 1.0  # wrong first carry, right digits: scratch work, not graded
    assert carry.reward(problem, "213161<eos>") == 0.0  # wrong last carry: the sum would be 1632
    assert carry.reward(problem, "223160<eos>") == 0.0  # wrong digit
    assert carry.reward(problem, "236<eos>") == 0.0  # the plain addition format is not a worked answer
    assert addition.reward(problem, "213160<eos>") == 0.0  # and the worked format is not a plain answer


def test_reward_agrees_with_completion_text():
    problems = make_problems(300, seed=1, n_digits=5) + make_problems(30, seed=1, n_digits=1)
    assert all(CARRY.reward(p, CARRY.completion_text(p)) == 1.0 for p in problems)
    shifted = [Problem(p.question, str(int(p.answer) + 1)) for p in problems]
    assert all(CARRY.reward(s, CARRY.completion_text(p)) == 0.0 for s, p in zip(shifted, problems, strict=True))


def test_five_digit_splits_are_disjoint():
    train = {p.question for seed in range(3) for p in make_problems(3000, seed=seed, n_digits=5)}
    test = {p.question for p in make_problems(500, seed=0, n_digits=5, split="test")}
    assert len(test) == 500 and not train & test
    assert all(is_test_pair(*map(int, q.split("+"))) for q in test)


# --- registry ------------------------------------------------------------------------------------------------


def test_registry_names_and_data_sources():
    assert get_task("carry") is CARRY and get_task("addition") is ADDITION
    assert task_for_data_source("optimal_sampling/carry") is CARRY
    assert task_for_data_source("optimal_sampling/addition") is ADDITION
    with pytest.raises(ValueError, match="task=.*'mul'"):
        get_task("mul")
    with pytest.raises(ValueError, match="data_source"):
        task_for_data_source("gsm8k")


# --- greedy evaluation follows the task's budget -------------------------------------------------------------


class OracleLM(torch.nn.Module):
    """Writes the right worked answer, one token per call (read off the unpadded prompt and what follows it)."""

    def __init__(self, tokenizer):
        super().__init__()
        self.tokenizer = tokenizer
        self.dummy = torch.nn.Parameter(torch.zeros(1))

    def forward(self, input_ids, attention_mask, position_ids, logits_to_keep):
        logits = torch.zeros(input_ids.shape[0], 1, len(self.tokenizer))  # (B, 1, V)
        for row in range(input_ids.shape[0]):
            text = self.tokenizer.decode(input_ids[row][attention_mask[row].bool()])
            a, b = re.search(r"(\d+)\+(\d+)", text).groups()
            written = re.split(r"A: |assistant\n", text)[-1]
            answer = carry.answer_text(Problem(f"{a}+{b}", str(int(a) + int(b))))
            token = answer[len(written)] if len(written) < len(answer) else "<eos>"
            logits[row, 0, self.tokenizer.convert_tokens_to_ids(token)] = 1.0
        return SimpleNamespace(logits=logits)


def test_greedy_accuracy_of_a_worked_oracle_is_one(tok):
    """Eleven tokens per answer: with the addition task's budget of 8 the oracle would score 0."""
    problems = make_problems(6, seed=0, n_digits=5)
    prompts = [policy_prompt(p.question) for p in problems[:3]] + [
        teacher_prompt(p.question, tok) for p in problems[3:]
    ]
    assert greedy_accuracy(OracleLM(tok), tok, prompts, problems, task=CARRY) == 1.0
    cut = greedy_generate(OracleLM(tok), tok, prompts, stop_token_ids(tok), max_new_tokens=8)  # the old budget
    assert all(CARRY.reward(p, tok.decode(ids)) == 0.0 for p, ids in zip(problems, cut, strict=True))
