"""optimal-sampling: RL rollouts drawn from q* ∝ pi_theta^(1 - alpha) * pi_t^alpha (alpha = the teacher's weight),
with alpha solved per token so that KL(q*||pi_theta) = KL(q*||pi_t).

Layers, data flowing one way: `core` (tensor maths) -> `engine` (two HF models decoding in lockstep) ->
`verl` (rollout backend) -> `cli` / `main`. Importing this package loads nothing heavy; `DualSampler`,
`SamplerConfig` and `DualSample` are imported from `engine` on first use.
"""

__all__ = ["DualSample", "DualSampler", "SamplerConfig"]


def __getattr__(name: str):
    if name in __all__:
        from . import engine

        return getattr(engine, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
