"""Schedules of the guidance: the critic coefficient over training steps, and the fade of guidance as the policy's own
success rate rises (fewer guided members per group, optionally a lower critic coefficient), so that late training is
on-policy.

Pure functions of Python scalars (they run once per step on the driver). Knows nothing about tensors, configs or
trainers. Steps count as verl's `global_steps` do (the first training step is 1).
"""

import math

SCHEDULES = ("constant", "linear", "cosine")


def critic_coef(step: int, coef: float, schedule: str = "constant", end_step: int | None = None) -> float:
    """beta(step): `constant` = coef; `linear` = coef * (1 - step / end_step); `cosine` = coef * (1 + cos(pi *
    step / end_step)) / 2; both decays reach 0 at `end_step` and stay there."""
    assert schedule in SCHEDULES, f"{schedule=}"
    if schedule == "constant":
        return float(coef)
    assert end_step is not None and end_step > 0, f"{end_step=}"
    frac = min(max(step / end_step, 0.0), 1.0)
    if schedule == "linear":
        return float(coef) * (1.0 - frac)
    return float(coef) * 0.5 * (1.0 + math.cos(math.pi * frac))


def guidance_scale(
    policy_reward_mean: float | None, step: int, reward_threshold: float | None = None, end_step: int | None = None
) -> float:
    """How much guidance is left, in [0, 1]: the smaller of the reward fade 1 - R_policy / reward_threshold (the
    policy's own mean training reward; 0 once it reaches the threshold) and the step fade 1 - step / end_step. A fade
    that is not set (None), or a reward not measured yet (None: no step so far, or no unguided response), counts 1."""
    scale = 1.0
    if reward_threshold is not None and policy_reward_mean is not None:
        scale = min(scale, 1.0 - policy_reward_mean / reward_threshold)
    if end_step is not None:
        scale = min(scale, 1.0 - step / end_step)
    return min(max(scale, 0.0), 1.0)


def faded_guided_per_prompt(k: int, scale: float) -> int:
    """Guided members per group under a guidance scale: ceil(k * scale), so a group keeps a guided member until the
    fade is complete (scale 0 -> 0: on-policy)."""
    return min(k, math.ceil(k * scale - 1e-9))
