"""How guided samples enter the loss (DESIGN.md §8): per-response advantage modes for GRPO groups that mix responses
sampled with the teacher (guided, from q*) and from the policy alone, the teacher as a dense per-token critic, and the
schedules that fade guidance as the policy succeeds.

Pure functions of tensors and scalars plus one validated config dataclass; imports no verl, Hydra or models. The verl
advantage estimator (`verl/guided.py`) and the CPU pilot (`scripts/experiments/pilot_cpu.py`) call the same functions.
"""

from .advantages import BASELINES, MODES, group_stats, guided_advantages, teacher_critic, token_advantages
from .config import CRITIC_ROWS, GuidedLossConfig
from .estimator import guided_token_advantages
from .schedules import SCHEDULES, critic_coef, faded_guided_per_prompt, guidance_scale

__all__ = [
    "BASELINES",
    "CRITIC_ROWS",
    "MODES",
    "SCHEDULES",
    "GuidedLossConfig",
    "critic_coef",
    "faded_guided_per_prompt",
    "group_stats",
    "guidance_scale",
    "guided_advantages",
    "guided_token_advantages",
    "teacher_critic",
    "token_advantages",
]
