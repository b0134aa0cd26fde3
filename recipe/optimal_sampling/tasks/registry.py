"""The task formats by name: what differs between the addition task and the worked (carry) task.

Owns `TaskFormat` (a task's answer format, parser, reward, greedy budget and verl `data_source`) and `TASKS`.
Both tasks share the problems (`addition.make_problems`) and the two prompts (`addition.prompt`); a format only
says what the models write after the prompt. Knows nothing about models, training, sampling or verl's internals.
"""

from collections.abc import Callable
from dataclasses import dataclass

from recipe.optimal_sampling.tasks import addition, carry
from recipe.optimal_sampling.tasks.addition import Problem
from recipe.optimal_sampling.tasks.tokenizer import EOS_TOKEN


@dataclass(frozen=True)
class TaskFormat:
    """One task's completion format. `answer_text(problem)` is what a right model writes before `<eos>`;
    `extract_answer(completion)` reads the sum back (usual digit order) or None when malformed."""

    name: str
    data_source: str  # verl's `data_source` column, and how the reward function finds the format
    n_digits: int  # digits per operand of the task's own models and datasets
    answer_text: Callable[[Problem], str]
    extract_answer: Callable[[str], str | None]
    answer_tokens: Callable[[int], int]  # n_digits -> the longest right answer's tokens, `<eos>` excluded

    def completion_text(self, problem: Problem) -> str:
        """The answer then `<eos>`: what either model should generate after its prompt."""
        return self.answer_text(problem) + EOS_TOKEN

    def reward(self, problem: Problem, completion: str) -> float:
        """1.0 when `completion` states the right sum (see the format's `extract_answer`), else 0.0."""
        return 1.0 if self.extract_answer(completion) == problem.answer else 0.0

    def max_new_tokens(self, n_digits: int) -> int:
        """Greedy/sampling budget: the longest right answer, `<eos>`, and 2 tokens of slack (surrounding whitespace;
        an over-long answer shows as such). At least 8, the addition task's budget before tasks had formats."""
        return max(8, self.answer_tokens(n_digits) + 3)


ADDITION = TaskFormat(
    name="addition",
    data_source="optimal_sampling/addition",
    n_digits=3,
    answer_text=addition.answer_text,
    extract_answer=addition.extract_answer,
    answer_tokens=lambda n_digits: n_digits + 1,  # a sum has at most n + 1 digits
)
CARRY = TaskFormat(
    name="carry",
    data_source="optimal_sampling/carry",
    n_digits=5,
    answer_text=carry.answer_text,
    extract_answer=carry.extract_answer,
    answer_tokens=lambda n_digits: 2 * n_digits,  # n (digit, carry) pairs
)
TASKS: dict[str, TaskFormat] = {task.name: task for task in (ADDITION, CARRY)}


def get_task(name: str) -> TaskFormat:
    """The format named `name`; a ValueError that lists the known names otherwise."""
    if name not in TASKS:
        raise ValueError(f"task must be one of {sorted(TASKS)}, got task={name!r}")
    return TASKS[name]


def task_for_data_source(data_source: str) -> TaskFormat:
    """The format whose verl `data_source` is `data_source` (a ValueError otherwise)."""
    for task in TASKS.values():
        if task.data_source == data_source:
            return task
    raise ValueError(f"data_source must be one of {sorted(t.data_source for t in TASKS.values())}, got {data_source!r}")
