"""Reward of the synthetic tasks in verl's custom-reward format
(`reward.custom_reward_function.path=<this file>`, `name=compute_score`).

Owns nothing but the adapter from verl's call signature to the task format named by the row's `data_source`
(`tasks.registry`: "optimal_sampling/addition" or "optimal_sampling/carry").
"""

from recipe.optimal_sampling.tasks.registry import task_for_data_source


def compute_score(data_source: str, solution_str: str, ground_truth: str, extra_info=None, **kwargs) -> float:
    """1.0 when the decoded response states `ground_truth` (the sum, usual digit order) in the format of
    `data_source`'s task, else 0.0."""
    return 1.0 if task_for_data_source(data_source).extract_answer(solution_str) == str(ground_truth) else 0.0
