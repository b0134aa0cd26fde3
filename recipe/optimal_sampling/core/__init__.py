"""Pure tensor maths of optimal sampling: the mixture q_alpha, alpha solvers, the teacher top-p support and
per-token diagnostics. No models, configs, verl, Hydra or W&B here; nothing syncs to the host.
alpha is the TEACHER's weight: log q_alpha = (1 - alpha) log pi_theta + alpha log pi_t - log Z(alpha)."""

from .alpha import ALPHA_METHODS, solve_alpha
from .diagnostics import token_diagnostics
from .mixture import LOGP_FLOOR, mix_logprobs, restrict, teacher_top_p_support

__all__ = [
    "ALPHA_METHODS",
    "LOGP_FLOOR",
    "mix_logprobs",
    "restrict",
    "solve_alpha",
    "teacher_top_p_support",
    "token_diagnostics",
]
