"""`SamplerConfig`: what the dual sampler does per token, validated once at construction.

Owns the field names shared by the Hydra `sampler` group and the presets (DESIGN.md §2). Knows nothing about
models or tensors.
"""

import math
from dataclasses import asdict, dataclass, field, replace

from ..core import ALPHA_METHODS

PRESETS: dict[str, dict] = {
    # Trust region at the teacher's top-90% set, the first token from the teacher: closest to the teacher.
    "conservative": {"alpha_method": "kl_symmetry", "force_teacher_tokens": 1, "teacher_top_p": 0.90},
    # The default: a looser trust region, the first token from the teacher.
    "balanced": {"alpha_method": "kl_symmetry", "force_teacher_tokens": 1, "teacher_top_p": 0.95},
    # No forcing, no constraint: the KL-balanced mixture over the full vocabulary.
    "exploratory": {"alpha_method": "kl_symmetry", "force_teacher_tokens": 0, "teacher_top_p": None},
}


@dataclass(frozen=True)
class SamplerConfig:
    """Per-token behaviour of `DualSampler`. Defaults are the plain KL-balanced mixture with every switch off;
    `SamplerConfig.preset(name)` gives the named presets."""

    alpha_method: str = field(default="kl_symmetry", metadata={"help": f"how alpha is chosen: one of {ALPHA_METHODS}"})
    fixed_alpha: float | None = field(default=None, metadata={"help": "the teacher weight when alpha_method='fixed'"})
    force_teacher_tokens: int = field(
        default=0, metadata={"help": "the first N generated tokens are drawn from the teacher (alpha = 1); 0 = off"}
    )
    teacher_top_p: float | None = field(
        default=None, metadata={"help": "sample only inside the teacher's top-p set, in (0, 1]; None = no constraint"}
    )
    temperature: float = field(default=1.0, metadata={"help": "both models' logits are divided by this, > 0"})
    stop_token_ids: tuple[int, ...] = field(
        default=(), metadata={"help": "a row stops after generating any of these ids (the id is kept)"}
    )

    def __post_init__(self):
        if self.alpha_method not in ALPHA_METHODS:
            raise ValueError(f"alpha_method must be one of {ALPHA_METHODS}, got {self.alpha_method!r}")
        if self.alpha_method == "fixed":
            if not _is_number(self.fixed_alpha) or not 0.0 <= self.fixed_alpha <= 1.0:
                raise ValueError(
                    f"fixed_alpha must be a number in [0, 1] when alpha_method='fixed', got {self.fixed_alpha!r} "
                    "(0 samples from the policy, 1 from the teacher)"
                )
        elif self.fixed_alpha is not None:
            raise ValueError(
                f"fixed_alpha={self.fixed_alpha!r} is only used with alpha_method='fixed', "
                f"but alpha_method={self.alpha_method!r}: set alpha_method='fixed' or fixed_alpha=None"
            )
        if isinstance(self.force_teacher_tokens, bool) or not isinstance(self.force_teacher_tokens, int):
            raise ValueError(f"force_teacher_tokens must be an int >= 0, got {self.force_teacher_tokens!r}")
        if self.force_teacher_tokens < 0:
            raise ValueError(f"force_teacher_tokens must be >= 0 (0 = off), got {self.force_teacher_tokens}")
        if self.teacher_top_p is not None and not (_is_number(self.teacher_top_p) and 0.0 < self.teacher_top_p <= 1.0):
            raise ValueError(f"teacher_top_p must be in (0, 1] or None (no constraint), got {self.teacher_top_p!r}")
        if not _is_number(self.temperature) or not (self.temperature > 0 and math.isfinite(self.temperature)):
            raise ValueError(f"temperature must be a finite number > 0, got {self.temperature!r}")
        if isinstance(self.stop_token_ids, str | bytes) or not hasattr(self.stop_token_ids or (), "__iter__"):
            raise ValueError(f"stop_token_ids must be a list of non-negative ints, got {self.stop_token_ids!r}")
        stop = tuple(self.stop_token_ids or ())
        if any(isinstance(t, bool) or not isinstance(t, int) or t < 0 for t in stop):
            raise ValueError(f"stop_token_ids must be non-negative ints, got {self.stop_token_ids!r}")
        object.__setattr__(self, "stop_token_ids", stop)

    @classmethod
    def preset(cls, name: str, **overrides) -> "SamplerConfig":
        """A named preset (conservative, balanced, exploratory), with optional field overrides."""
        if name not in PRESETS:
            raise ValueError(f"unknown sampler preset {name!r}; choose one of {sorted(PRESETS)}")
        return cls(**{**PRESETS[name], **overrides})

    def replace(self, **changes) -> "SamplerConfig":
        return replace(self, **changes)

    def to_dict(self) -> dict:
        return {**asdict(self), "stop_token_ids": list(self.stop_token_ids)}


def _is_number(x) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool) and not math.isnan(x)
