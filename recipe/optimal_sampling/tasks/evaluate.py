"""Greedy evaluation of a causal LM on a task (the addition task by default, or any `registry.TaskFormat`).

Owns: a simple batched greedy decoder (`greedy_generate`: left padding, attention mask, position ids, no
KV cache) and the accuracy helpers built on it; the task's format decides the reward and the new-token budget.
Knows nothing about training, caching or the sampler.
"""

from collections.abc import Sequence

import torch
from transformers import PreTrainedTokenizerBase

from recipe.optimal_sampling.tasks.addition import Problem, prompt
from recipe.optimal_sampling.tasks.registry import ADDITION, TaskFormat
from recipe.optimal_sampling.tasks.tokenizer import stop_token_ids


@torch.no_grad()
def greedy_generate(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    stop_ids: Sequence[int],
    max_new_tokens: int = 8,
) -> list[list[int]]:
    """Greedy completions of `prompts`, decoded as one left-padded batch.

    Returns each prompt's generated ids up to and including its first stop id (or `max_new_tokens` ids).
    Every step re-reads the whole sequence (no KV cache): cheap at these lengths, and exact."""
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens=}")
    device = next(model.parameters()).device
    batch = tokenizer(list(prompts), padding=True, padding_side="left", add_special_tokens=False, return_tensors="pt")
    ids, mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)  # (B, T), (B, T)
    prompt_len = ids.shape[1]
    stops = torch.tensor(list(stop_ids), device=device)  # (S,)
    done = torch.zeros(ids.shape[0], dtype=torch.bool, device=device)  # (B,)
    for _ in range(max_new_tokens):
        positions = (mask.cumsum(-1) - 1).clamp_min(0)  # (B, T)
        logits = model(input_ids=ids, attention_mask=mask, position_ids=positions, logits_to_keep=1).logits
        next_ids = logits[:, -1].argmax(-1)  # (B,)
        next_ids = torch.where(done, tokenizer.pad_token_id, next_ids)  # (B,)
        ids = torch.cat([ids, next_ids[:, None]], dim=1)  # (B, T + 1)
        mask = torch.cat([mask, (~done).long()[:, None]], dim=1)  # (B, T + 1)
        done |= torch.isin(next_ids, stops)
        if done.all():
            break
    return [_cut_after_stop(row, set(stop_ids)) for row in ids[:, prompt_len:].tolist()]


def _cut_after_stop(row: list[int], stop_set: set[int]) -> list[int]:
    """`row` up to and including its first stop id."""
    for i, token in enumerate(row):
        if token in stop_set:
            return row[: i + 1]
    return row


def greedy_accuracy(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    problems: Sequence[Problem],
    stop_ids: Sequence[int] | None = None,
    batch_size: int = 200,
    task: TaskFormat = ADDITION,
) -> float:
    """Mean `task.reward` of the greedy completions of `prompts` (prompts[i] asks problems[i]).

    stop_ids: None means the task's stop tokens (`<eos>`, `<|im_end|>`). The new-token budget follows the task
    and the widest operand (`TaskFormat.max_new_tokens`): 8 for 3-digit addition, 13 for 5-digit worked answers."""
    if len(prompts) != len(problems) or not problems:
        raise ValueError(f"need as many prompts as problems, and at least one: {len(prompts)=} {len(problems)=}")
    stop_ids = stop_token_ids(tokenizer) if stop_ids is None else stop_ids
    max_new_tokens = task.max_new_tokens(max(operand_digits(p) for p in problems))
    rewards: list[float] = []
    for start in range(0, len(prompts), batch_size):
        outs = greedy_generate(model, tokenizer, prompts[start : start + batch_size], stop_ids, max_new_tokens)
        chunk = problems[start : start + batch_size]
        rewards += [task.reward(p, tokenizer.decode(o)) for p, o in zip(chunk, outs, strict=True)]
    return sum(rewards) / len(rewards)


def operand_digits(problem: Problem) -> int:
    """Digits of the widest operand of `problem`: "347+285" -> 3."""
    return max(len(operand) for operand in problem.question.split("+"))


def role_accuracy(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    role: str,
    problems: Sequence[Problem],
    task: TaskFormat = ADDITION,
) -> float:
    """`greedy_accuracy` of `model` on `problems`, each asked in `role`'s prompt format, scored by `task`."""
    prompts = [prompt(role, p.question, tokenizer) for p in problems]
    was_training = model.training
    model.eval()
    try:
        return greedy_accuracy(model, tokenizer, prompts, problems, task=task)
    finally:
        model.train(was_training)
