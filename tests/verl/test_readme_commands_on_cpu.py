"""The README's training commands run as written, up to the trainer: each `python -m recipe.optimal_sampling.main`
command's overrides compose through the recipe's Hydra config (as main.py does) and pass the recipe's refusals and
verl's own validate_config; each `bash scripts/...` command's script does the same with its extra overrides. Only
the model paths are pointed at tiny checkpoints. Fails when the README drifts from the config or from verl."""

from pathlib import Path

import pytest

from recipe.optimal_sampling.main import prepare_config
from tests.readme_commands import readme_commands
from tests.verl.fixtures import compose_config
from tests.verl.test_launch_scripts_on_cpu import recorded_overrides

MAIN = ["python", "-m", "recipe.optimal_sampling.main"]
MODEL_KEYS = {  # the only values replaced: where the README names real checkpoints
    "actor_rollout_ref.model.path": "policy",
    "actor_rollout_ref.rollout.engine_kwargs.optimal_sampling.teacher_path": "teacher",
}


def with_tiny_models(overrides: list[str], checkpoints: dict[str, str]) -> list[str]:
    out = []
    for override in overrides:
        key = override.split("=", 1)[0]
        out.append(f"{key}={checkpoints[MODEL_KEYS[key]]}" if key in MODEL_KEYS else override)
    return out


def test_the_readme_has_the_commands_these_tests_exercise():
    commands = readme_commands()
    assert any(c[:3] == MAIN for c in commands)
    assert any(c[:2] == ["bash", "scripts/grpo_qwen3_4b_base_teacher_qwen3_14b_balanced.sh"] for c in commands)


@pytest.mark.parametrize("index", range(sum(c[:3] == MAIN for c in readme_commands())))
def test_readme_trainer_command_composes_and_passes_the_recipe_and_verl_checks(index, checkpoints):
    command = [c for c in readme_commands() if c[:3] == MAIN][index]
    config = compose_config(with_tiny_models(command[3:], checkpoints))
    prepare_config(config)  # the recipe's refusals, the teacher check, verl's validate_config
    assert config.actor_rollout_ref.rollout.name == "dual" and config.actor_rollout_ref.rollout.n >= 2


def script_commands() -> list[list[str]]:
    return [c for c in readme_commands() if c[0] == "bash" and c[1].startswith("scripts/grpo_")]


@pytest.mark.parametrize("index", range(len(script_commands())))
def test_readme_launch_script_command_composes_and_passes_the_checks(index, checkpoints, tmp_path):
    command = script_commands()[index]
    env = {"MODEL_PATH": checkpoints["policy"], "TEACHER_PATH": checkpoints["teacher"], "DATA_DIR": str(tmp_path)}
    overrides = recorded_overrides(Path(command[1]).name, env, tmp_path, extra_args=command[2:])
    assert overrides[-len(command[2:]) :] == command[2:]  # the README's overrides reach the trainer, last (they win)
    config = compose_config(overrides)
    prepare_config(config)
