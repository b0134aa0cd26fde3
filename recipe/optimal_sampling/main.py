"""Hydra entry point for training with optimal sampling: `python -m recipe.optimal_sampling.main [overrides]`.

Composes config/optimal_sampling_trainer.yaml (verl's ppo_trainer + the `dual` backend + a `sampler` preset),
refuses configs under which the importance weights would be wrong, and runs verl's v1 trainer.
"""

import os
import sys

from recipe.optimal_sampling.verl.config import check_teacher, check_trainer_config
from recipe.optimal_sampling.verl.response_caps import check_dataset_caps

VERL_EXTRA = 'pip install -e ".[verl]" (verl[verl-core]==0.9.1; from a wheel: pip install "optimal-sampling[verl]")'

try:  # the `verl` extra: hydra, ray, verl and the verl-core modules verl's v1 trainer imports inside Ray actors
    import cachetools  # noqa: F401
    import hydra
    import ray
    import transfer_queue  # noqa: F401
    import uvicorn  # noqa: F401
    from omegaconf import DictConfig, open_dict
    from verl.trainer.main_ppo import TaskRunnerV1, run_ppo
    from verl.trainer.ppo.utils import need_critic, need_reference_policy
    from verl.utils.config import validate_config
    from verl.utils.device import auto_set_device

    from recipe.optimal_sampling.verl.guided import check_guided_loss  # registers the guided estimator (needs verl)
except ImportError as e:
    if __name__ != "__main__":
        raise
    sys.exit(
        f"python -m recipe.optimal_sampling.main: error: training needs the `verl` extra ({e}); install it with "
        f"{VERL_EXTRA}"
    )

CONFIG_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "config")


@ray.remote(num_cpus=1)
class OptimalSamplingTaskRunner(TaskRunnerV1.__ray_metadata__.modified_class.__ray_actor_class__):
    """Differs from verl's TaskRunnerV1 only in importing the recipe's trainer first, which registers
    `trainer.v1.trainer_mode=optimal_sampling_sync` in the task runner's process."""

    def run(self, config: DictConfig):
        import recipe.optimal_sampling.verl.trainer  # noqa: F401  (registration side effect)

        return super().run(config)


def prepare_config(config: DictConfig) -> None:
    """The recipe's refusals (ValueError), the agent-loop registry file, then verl's own checks. Reads the teacher's and
    the policy's tokenizers and the datasets' per-request caps (`extra_info.max_response_tokens`), not the models."""
    rollout = config.actor_rollout_ref.rollout
    if not rollout.agent.agent_loop_config_path:
        with open_dict(config):
            rollout.agent.agent_loop_config_path = os.path.join(CONFIG_DIR, "agent_loops.yaml")
    os_config = check_trainer_config(config)
    check_guided_loss(config)  # the guided_loss block against the rest (algorithm.adv_estimator, rollout, steps)
    if os_config is not None:
        model = config.actor_rollout_ref.model
        check_teacher(os_config, model.get("tokenizer_path") or model.path)
        _check_caps(config)
    auto_set_device(config)
    validate_config(config=config, use_reference_policy=need_reference_policy(config), use_critic=need_critic(config))


def _check_caps(config: DictConfig) -> None:
    """The datasets' per-request response caps, each against data.max_response_length (train: rollout.n responses per
    prompt; validation: rollout.val_kwargs.n)."""
    data, rollout = config.data, config.actor_rollout_ref.rollout
    limit = int(data.max_response_length)
    check_dataset_caps(data.get("train_files"), int(rollout.n), limit)
    check_dataset_caps(data.get("val_files"), int(rollout.val_kwargs.get("n", 1)), limit)


@hydra.main(config_path="../../config", config_name="optimal_sampling_trainer", version_base=None)
def main(config: DictConfig) -> None:
    prepare_config(config)
    run_ppo(config, task_runner_class=OptimalSamplingTaskRunner)


if __name__ == "__main__":
    main()
