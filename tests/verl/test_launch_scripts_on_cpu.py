"""The launch scripts' Hydra overrides compose and pass the recipe's and verl's start-up checks. Each script runs
with a stand-in `python3` on PATH that records its arguments instead of training, and the tiny checkpoints."""

import json
import os
import stat
import subprocess
from pathlib import Path

import pandas as pd
import pytest

from recipe.optimal_sampling.main import prepare_config
from tests.verl.fixtures import compose_config

SCRIPTS = Path(__file__).resolve().parents[2] / "scripts"
RECORDER = '#!/usr/bin/env bash\nprintf "%s\\0" "$@" > "$ARGS_FILE"\n'  # NUL-separated: values may hold newlines


def recorded_overrides(script: str, env: dict, tmp_path: Path, extra_args: list[str] = ()) -> list[str]:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    fake = bin_dir / "python3"
    fake.write_text(RECORDER)
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    args_file = tmp_path / "args.txt"
    full_env = {**os.environ, **env, "PATH": f"{bin_dir}:{os.environ['PATH']}", "ARGS_FILE": str(args_file)}
    subprocess.run(
        ["bash", str(SCRIPTS / script), *extra_args], env=full_env, check=True, capture_output=True, timeout=60
    )
    args = args_file.read_text().split("\0")[:-1]
    assert args[:2] == ["-m", "recipe.optimal_sampling.main"], args[:2]
    return args[2:]


@pytest.mark.parametrize("preset", ["conservative", "balanced", "exploratory"])
def test_8_gpu_scripts_compose_and_pass_the_checks(preset, checkpoints, tmp_path):
    env = {"MODEL_PATH": checkpoints["policy"], "TEACHER_PATH": checkpoints["teacher"], "DATA_DIR": str(tmp_path)}
    overrides = recorded_overrides(f"grpo_qwen3_4b_base_teacher_qwen3_14b_{preset}.sh", env, tmp_path)
    assert f"sampler={preset}" in overrides
    config = compose_config(overrides)
    prepare_config(config)
    assert config.actor_rollout_ref.rollout.engine_kwargs.optimal_sampling.teacher_path == checkpoints["teacher"]
    assert config.trainer.n_gpus_per_node == 8


def test_tiny_gpu_script_composes_and_passes_the_checks(checkpoints, tmp_path):
    task = tmp_path / "task"
    (task / "models").mkdir(parents=True)
    (task / "models" / "meta.json").write_text(json.dumps({}))
    pd.DataFrame({"prompt": [[{"role": "user", "content": "1+1"}]]}).to_parquet(task / "train.parquet")
    os.symlink(checkpoints["policy"], task / "models" / "policy")
    os.symlink(checkpoints["teacher"], task / "models" / "teacher")
    env = {"WORK_DIR": str(tmp_path / "work"), "TASK_DIR": str(task)}
    overrides = recorded_overrides("e2e_tiny_gpu.sh", env, tmp_path)
    config = compose_config(overrides)
    prepare_config(config)
    block = config.actor_rollout_ref.rollout.engine_kwargs.optimal_sampling
    assert block.policy_template == "Q: {prompt}\nA: " and block.teacher_top_p == 0.95
    assert config.trainer.total_training_steps == 3 and "wandb" in config.trainer.logger
    assert config.ray_kwargs.ray_init.runtime_env.env_vars.WANDB_MODE == "offline"
