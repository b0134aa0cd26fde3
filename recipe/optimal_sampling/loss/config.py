"""`GuidedLossConfig`: how guided samples enter the loss, as configuration (the `guided_loss` block of
config/optimal_sampling_trainer.yaml, read by the `optimal_sampling_guided` advantage estimator and by the CPU pilot).

Owns the meaning of every key and the checks of their values taken one by one (ValueError naming key, value and
fix). Settings that contradict the rest of a trainer config are refused by `verl/guided.py:check_guided_loss`.
Knows nothing about verl, Hydra or tensors.
"""

import math
from collections.abc import Mapping
from dataclasses import dataclass, field, fields

from .advantages import BASELINES, MODES
from .schedules import SCHEDULES

CRITIC_ROWS = ("all", "guided", "policy")
KEY = "guided_loss"  # the block's name in the trainer config


@dataclass(frozen=True)
class GuidedLossConfig:
    """Defaults are verl's GRPO with every guided-loss switch off."""

    mode: str = field(
        default="grpo",
        metadata={"help": f"advantage of guided responses: one of {MODES} (see loss.advantages.guided_advantages)"},
    )
    baseline: str = field(
        default="group",
        metadata={"help": f"{BASELINES}: group mean over all members, or over the policy's own (unguided) members"},
    )
    imitation_value: float | None = field(
        default=None, metadata={"help": "mode=imitation: A of a correct guided response; None = its reward"}
    )
    critic_coef: float = field(
        default=0.0, metadata={"help": "beta of the teacher critic A_t += beta (log pi_t - log pi_theta); 0 = off"}
    )
    critic_schedule: str = field(default="constant", metadata={"help": f"beta over steps: one of {SCHEDULES}"})
    critic_end_step: int | None = field(
        default=None, metadata={"help": "linear/cosine: the step at which beta reaches 0 (required for them)"}
    )
    critic_rows: str = field(default="all", metadata={"help": f"{CRITIC_ROWS}: the responses that get the critic term"})
    critic_clip: float | None = field(
        default=None, metadata={"help": "clip |log pi_t - log pi_theta| to this per token; None = no clip"}
    )
    fade_reward_threshold: float | None = field(
        default=None,
        metadata={"help": "guidance fades to 0 as the policy's own mean training reward rises to this; None = off"},
    )
    fade_end_step: int | None = field(
        default=None, metadata={"help": "guidance fades linearly to 0 at this step; None = off"}
    )
    fade_critic: bool = field(
        default=False, metadata={"help": "the fade also scales the critic coefficient (not only guided members)"}
    )

    def __post_init__(self):
        _one_of("mode", self.mode, MODES)
        _one_of("baseline", self.baseline, BASELINES)
        _one_of("critic_schedule", self.critic_schedule, SCHEDULES)
        _one_of("critic_rows", self.critic_rows, CRITIC_ROWS)
        if self.imitation_value is not None and self.mode != "imitation":
            raise ValueError(
                f"{KEY}.imitation_value={self.imitation_value} is only read with mode=imitation (got mode={self.mode})"
                "; set mode=imitation or imitation_value=null"
            )
        _number("imitation_value", self.imitation_value, low=0.0, allow_none=True, strict=True)
        _number("critic_coef", self.critic_coef, low=0.0)
        _number("critic_clip", self.critic_clip, low=0.0, allow_none=True, strict=True)
        _number("fade_reward_threshold", self.fade_reward_threshold, low=0.0, allow_none=True, strict=True)
        if self.fade_reward_threshold is not None and self.fade_reward_threshold > 1:
            raise ValueError(
                f"{KEY}.fade_reward_threshold={self.fade_reward_threshold} never fades: the policy's mean reward (its "
                "success rate for 0/1 rewards) cannot pass 1; use a threshold in (0, 1] or null (no reward fade)"
            )
        for name in ("critic_end_step", "fade_end_step"):
            _step(name, getattr(self, name))
        if self.critic_schedule != "constant" and self.critic_end_step is None:
            raise ValueError(
                f"{KEY}.critic_schedule={self.critic_schedule} decays to 0 by critic_end_step, which is null; set "
                "critic_end_step to a step of the run or critic_schedule=constant"
            )
        if self.critic_schedule == "constant" and self.critic_end_step is not None:
            raise ValueError(
                f"{KEY}.critic_end_step={self.critic_end_step} is only read by a decaying critic_schedule (got "
                "constant); set critic_schedule=linear or cosine, or critic_end_step=null"
            )
        if not isinstance(self.fade_critic, bool):
            raise ValueError(f"{KEY}.fade_critic must be true or false, got {self.fade_critic!r}")
        if self.fade_critic and not self.critic_on:
            raise ValueError(f"{KEY}.fade_critic=true but critic_coef=0 (no critic to fade): set critic_coef > 0")
        if self.fade_critic and not self.fades:
            raise ValueError(
                f"{KEY}.fade_critic=true but no fade is set: set fade_reward_threshold and/or fade_end_step, or "
                "fade_critic=false"
            )

    @property
    def fades(self) -> bool:
        return self.fade_reward_threshold is not None or self.fade_end_step is not None

    @property
    def critic_on(self) -> bool:
        return self.critic_coef > 0

    def changed(self) -> dict:
        """The keys that differ from the defaults (verl's GRPO), with their values."""
        default, values = type(self)(), {f.name: getattr(self, f.name) for f in fields(self)}
        return {k: v for k, v in values.items() if getattr(default, k) != v}

    @classmethod
    def from_mapping(cls, block: Mapping | None) -> "GuidedLossConfig":
        """From the `guided_loss` block (a dict or DictConfig; None = defaults); unknown keys are refused."""
        block = dict(block or {})
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(block) - known)
        if unknown:
            raise ValueError(f"unknown keys in {KEY}: {unknown}; known keys: {sorted(known)}")
        return cls(**block)


def _one_of(name: str, value, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{KEY}.{name} must be one of {choices}, got {value!r}")


def _number(name: str, value, low: float, allow_none: bool = False, strict: bool = False) -> None:
    if value is None and allow_none:
        return
    ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or value < low or (strict and value == low):
        bound = f"> {low}" if strict else f">= {low}"
        none = " or null" if allow_none else ""
        raise ValueError(f"{KEY}.{name} must be a finite number {bound}{none}, got {value!r}")


def _step(name: str, value) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise ValueError(f"{KEY}.{name} must be a training step >= 1 or null, got {value!r}")
