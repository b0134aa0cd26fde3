"""The verl 0.9.1 integration: a rollout backend named `dual` that samples every response token from q*.

Pieces (DESIGN.md §5), each in its own module and imported only where verl needs it:
- `plugin`: registration, loaded in every verl process through the `verl.plugins` entry point (lazy loaders only);
- `config`: `OptimalSamplingConfig` (the `engine_kwargs.optimal_sampling` block) and the start-up checks;
- `is_checks`: the start-up refusals of verl settings that would drop, alter or ignore the importance weights;
- `server`: `DualSamplerServer`, the Ray actor holding the policy copy and the frozen teacher;
- `replica`: `DualReplica`, one server per GPU, next to the trainer;
- `adapter`: `DualServerAdapter`, the trainer-side end of the per-step weight sync;
- `agent_loop`: `DualAgentLoop`, policy and teacher prompts, per-token traces as tensor fields;
- `trainer`: `OptimalSamplingTrainer`, verl's sync trainer plus `optimal_sampling/*` metrics;
- `guided`: the `optimal_sampling_guided` advantage estimator (verl's registry) and the `guided_loss` start-up checks;
- `reward`, `data`: the synthetic addition task in verl's dataset and reward formats.

Importing this package imports nothing from verl.
"""

ROLLOUT_NAME = "dual"  # actor_rollout_ref.rollout.name
AGENT_LOOP_NAME = "optimal_sampling_agent"  # actor_rollout_ref.rollout.agent.default_agent_loop
TRAINER_MODE = "optimal_sampling_sync"  # trainer.v1.trainer_mode
ENGINE_KWARGS_KEY = "optimal_sampling"  # actor_rollout_ref.rollout.engine_kwargs.<this>
