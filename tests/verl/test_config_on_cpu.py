"""Hydra composition of the recipe config with every preset, and the start-up refusals."""

import pytest
from hydra.errors import MissingConfigException
from omegaconf import OmegaConf
from verl.utils.config import omega_conf_to_dataclass

from recipe.optimal_sampling.engine import PRESETS, SamplerConfig
from recipe.optimal_sampling.main import prepare_config
from recipe.optimal_sampling.verl.config import OptimalSamplingConfig, check_teacher, check_trainer_config
from tests.verl.fixtures import compose_config, save_tiny, tiny_overrides


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_every_preset_composes_and_reaches_the_rollout_config(preset):
    config = compose_config([f"sampler={preset}"])
    rollout = config.actor_rollout_ref.rollout
    assert rollout.name == "dual" and config.trainer.v1.trainer_mode == "optimal_sampling_sync"
    # the preset lands in engine_kwargs, which survives verl's RolloutConfig dataclass conversion
    rollout_config = omega_conf_to_dataclass(rollout)
    block = rollout_config.engine_kwargs["optimal_sampling"]
    os_config = OptimalSamplingConfig.from_engine_kwargs(rollout_config.engine_kwargs)
    assert os_config.sampler_config() == SamplerConfig.preset(preset)
    assert set(PRESETS[preset]) | {"teacher_path", "fixed_alpha", "stop_token_ids"} <= set(block)
    # the IS correction the recipe promises
    correction = OmegaConf.to_container(config.algorithm.rollout_correction)
    assert (correction["rollout_is"], correction["rollout_is_threshold"], correction["bypass_mode"]) == (
        "token",
        2.0,
        False,
    )


def test_default_preset_is_balanced_and_single_keys_override():
    config = compose_config(["actor_rollout_ref.rollout.engine_kwargs.optimal_sampling.teacher_top_p=0.7"])
    block = config.actor_rollout_ref.rollout.engine_kwargs.optimal_sampling
    assert (block.force_teacher_tokens, block.teacher_top_p) == (1, 0.7)


def test_unknown_preset_is_refused_by_hydra():
    with pytest.raises(MissingConfigException, match="sampler"):
        compose_config(["sampler=greedy"])
    with pytest.raises(ValueError, match="unknown sampler preset"):
        SamplerConfig.preset("greedy")


def test_unknown_and_invalid_keys_name_the_field():
    with pytest.raises(ValueError, match="unknown keys .*teacher_toppp"):
        OptimalSamplingConfig.from_engine_kwargs({"optimal_sampling": {"teacher_toppp": 0.9}})
    with pytest.raises(ValueError, match="teacher_top_p"):
        OptimalSamplingConfig.from_engine_kwargs({"optimal_sampling": {"teacher_top_p": 1.5}})


@pytest.mark.parametrize(
    "override, match",
    [
        ("algorithm.rollout_correction.bypass_mode=true", "bypass_mode=true is refused.*PPO-clip"),
        ("algorithm.rollout_correction=null", "rollout_correction=null is refused"),
        ("~algorithm.rollout_correction", "rollout_correction=null is refused"),
        ("algorithm.rollout_correction.rollout_is=null", "rollout_is=null is refused.*token or sequence"),
        ("algorithm.rollout_correction.rollout_is=tokens", "rollout_is=tokens is refused"),
        ("algorithm.rollout_correction.rollout_is_threshold=null", "rollout_is_threshold=null is refused"),
        ("algorithm.rollout_correction.rollout_is_threshold=0", "rollout_is_threshold=0 is refused.*C >= 1"),
        ("algorithm.rollout_correction.rollout_is_threshold=-2.0", "rollout_is_threshold=-2.0 is refused"),
        ("algorithm.rollout_correction.rollout_is_threshold=0.5", "rollout_is_threshold=0.5 is refused.*below 1"),
        ("algorithm.rollout_correction.rollout_is_threshold=true", "rollout_is_threshold=true is refused"),
        ("algorithm.rollout_correction.rollout_is_threshold=abc", "rollout_is_threshold=abc is not a number"),
        ("algorithm.rollout_correction.rollout_is_threshold='0.5_5.0'", "IcePop"),
        ("algorithm.rollout_correction.rollout_is_batch_normalize=true", "rollout_is_batch_normalize=true"),
        ("algorithm.rollout_correction.rollout_rs=token_k1", "rollout_rs=token_k1 is refused"),
        ("actor_rollout_ref.actor.policy_loss.loss_mode=bypass_mode", "loss_mode=bypass_mode is refused"),
        ("actor_rollout_ref.actor.policy_loss.loss_mode=geo_mean", "loss_mode=geo_mean is refused.*geometric"),
        ("actor_rollout_ref.rollout.n=1", "adv_estimator=grpo with actor_rollout_ref.rollout.n=1 is refused"),
        (["algorithm.adv_estimator=rloo", "actor_rollout_ref.rollout.n=1"], "adv_estimator=rloo with"),
        (
            ["distillation.enabled=true", "distillation.distillation_loss.use_task_rewards=false"],
            "use_task_rewards=false with use_policy_gradient=false",
        ),
        (
            [
                "distillation.enabled=true",
                "distillation.distillation_loss.use_policy_gradient=true",
                "distillation.distillation_loss.policy_loss_mode=geo_mean",
            ],
            "policy_loss_mode=geo_mean is refused",
        ),
        ("actor_rollout_ref.rollout.temperature=0.7", "temperature=0.7 is refused"),
        ("actor_rollout_ref.rollout.val_kwargs.temperature=0", "val_kwargs"),
        ("actor_rollout_ref.rollout.top_p=0.9", "top_p"),
        ("actor_rollout_ref.rollout.calculate_log_probs=false", "calculate_log_probs"),
        ("actor_rollout_ref.rollout.tensor_model_parallel_size=2", "tensor_model_parallel_size"),
        ("actor_rollout_ref.rollout.data_parallel_size=2", "data_parallel_size=2"),
        ("trainer.v1.trainer_mode=colocate_async", "trainer_mode"),
        ("actor_rollout_ref.rollout.agent.default_agent_loop=single_turn_agent", "default_agent_loop"),
    ],
)
def test_misuse_is_refused_at_start_up(override, match):
    overrides = override if isinstance(override, list) else [override]
    with pytest.raises(ValueError, match=match) as refusal:
        check_trainer_config(compose_config(overrides))
    assert "\n" not in str(refusal.value)  # one line: the key, the value, why and the fix


def test_the_recipe_default_config_passes():
    config = compose_config()
    assert check_trainer_config(config) is not None
    assert config.actor_rollout_ref.rollout.n >= 2 and config.algorithm.rollout_correction.rollout_is == "token"


@pytest.mark.parametrize(
    "overrides",
    [
        ["algorithm.rollout_correction.rollout_is=sequence"],
        ["algorithm.rollout_correction.rollout_is_threshold=1.0"],
        ["algorithm.rollout_correction.rollout_is_threshold='5.0'"],
        ["actor_rollout_ref.actor.policy_loss.loss_mode=gspo"],
        ["algorithm.adv_estimator=reinforce_plus_plus", "actor_rollout_ref.rollout.n=1"],
        ["distillation.enabled=true"],  # the task loss (with its weights) stays; the distillation term is added
    ],
)
def test_allowed_settings_that_keep_the_weights_pass(overrides):
    assert check_trainer_config(compose_config(overrides)) is not None


def test_other_backends_are_left_alone():
    assert check_trainer_config(compose_config(["actor_rollout_ref.rollout.name=vllm"])) is None


def test_teacher_path_must_be_set_exist_and_share_the_vocabulary(checkpoints, tmp_path):
    with pytest.raises(ValueError, match="teacher_path is not set"):
        check_teacher(OptimalSamplingConfig(), checkpoints["policy"])
    with pytest.raises(ValueError, match="not a directory"):
        check_teacher(OptimalSamplingConfig(teacher_path=str(tmp_path / "nope")), checkpoints["policy"])
    other = save_tiny(str(tmp_path / "other_vocab"), seed=3)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(other)
    tok.add_tokens(["<extra>"])
    tok.save_pretrained(other)
    with pytest.raises(ValueError, match="different vocabularies"):
        check_teacher(OptimalSamplingConfig(teacher_path=other), checkpoints["policy"])
    check_teacher(OptimalSamplingConfig(teacher_path=checkpoints["teacher"]), checkpoints["policy"])


def test_the_e2e_settings_pass_the_recipe_and_verl_checks(checkpoints):
    config = compose_config(tiny_overrides(checkpoints))
    prepare_config(config)  # the recipe's refusals, the agent-loop file, verl's validate_config
    assert config.actor_rollout_ref.rollout.agent.agent_loop_config_path.endswith("config/agent_loops.yaml")
