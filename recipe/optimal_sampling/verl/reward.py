"""Reward of the synthetic addition task in verl's custom-reward format
(`reward.custom_reward_function.path=<this file>`, `name=compute_score`).

Owns nothing but the adapter from verl's call signature to `tasks.addition`.
"""

from recipe.optimal_sampling.tasks.addition import extract_answer


def compute_score(data_source: str, solution_str: str, ground_truth: str, extra_info=None, **kwargs) -> float:
    """1.0 when the decoded response states `ground_truth` (the sum, usual digit order), else 0.0."""
    return 1.0 if extract_answer(solution_str) == str(ground_truth) else 0.0
