"""scripts/experiments: every arm's command composes and passes the recipe's and verl's start-up checks with the
sampler the issue asks for, the GRPO settings are identical across arms, complete runs are skipped, runs are spread
over GPU slots, and failures are reported. `python3` is a stand-in on PATH: `-m ...` calls are recorded (and may write
a metrics file), anything else (run_status.py) runs the real interpreter."""

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from recipe.optimal_sampling.engine.policy_only import ignores_teacher
from recipe.optimal_sampling.main import prepare_config
from recipe.optimal_sampling.verl.config import OptimalSamplingConfig
from tests.verl.fixtures import compose_config

SCRIPTS = Path(__file__).resolve().parents[2] / "scripts" / "experiments"
ARMS = ["on_policy", "balanced", "conservative", "exploratory", "fixed_alpha_0.5", "fixed_alpha_1", "ess_balance"]
VAL_KEY = "optimal_sampling/val_policy_only_accuracy"
# A stand-in python3: records `-m` calls (NUL-separated args, one file per run), writes a complete metrics file
# unless the run's experiment name is in $FAIL_RUNS, and hands every other call to the real interpreter.
FAKE_PYTHON = f"""#!/usr/bin/env bash
if [ "${{1:-}}" != "-m" ]; then exec {sys.executable} "$@"; fi
name=$(printf "%s\\n" "$@" | sed -n 's/^trainer.experiment_name=//p')
printf "%s\\0" "$@" > "$RECORD_DIR/$name.args"
printf "%s\\n" "$CUDA_VISIBLE_DEVICES" > "$RECORD_DIR/$name.gpu"
case " ${{FAIL_RUNS:-}} " in *" $name "*) exit 1 ;; esac
printf '{{"step": 0, "data": {{"{VAL_KEY}": 0.1}}}}\\n{{"step": '$TOTAL_STEPS', "data": {{"{VAL_KEY}": 0.2}}}}\\n' \\
    > "$VERL_FILE_LOGGER_PATH"
"""


@pytest.fixture
def task_dir(tmp_path, checkpoints) -> Path:
    task = tmp_path / "exp" / "task"
    (task / "models").mkdir(parents=True)
    (task / "models" / "meta.json").write_text("{}")
    (task / "test.parquet").write_text("")
    os.symlink(checkpoints["policy"], task / "models" / "policy")
    os.symlink(checkpoints["teacher"], task / "models" / "teacher")
    return task


def launch(tmp_path: Path, task_dir: Path, **env) -> subprocess.CompletedProcess:
    bin_dir, records = tmp_path / "bin", tmp_path / "records"
    bin_dir.mkdir(exist_ok=True)
    records.mkdir(exist_ok=True)
    fake = bin_dir / "python3"
    fake.write_text(FAKE_PYTHON)
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    full_env = {
        **os.environ,
        "PATH": f"{bin_dir}:{os.environ['PATH']}",
        "RECORD_DIR": str(records),
        "EXP_DIR": str(task_dir.parent),
        "STAGGER_S": "0",
        **env,
    }
    return subprocess.run(
        ["bash", str(SCRIPTS / "run_all.sh")], env=full_env, capture_output=True, text=True, timeout=120
    )


def recorded(tmp_path: Path, name: str) -> list[str]:
    args = (tmp_path / "records" / f"{name}.args").read_text().split("\0")[:-1]
    assert args[:2] == ["-m", "recipe.optimal_sampling.main"], args[:2]
    return args[2:]


def dry_run_commands(result: subprocess.CompletedProcess) -> list[str]:
    return [line for line in result.stdout.splitlines() if "recipe.optimal_sampling.main" in line]


def test_dry_run_prints_one_command_per_arm_and_seed_and_runs_nothing(tmp_path, task_dir):
    result = launch(tmp_path, task_dir, DRY_RUN="1", GPUS="0 1", PER_GPU="2")
    assert result.returncode == 0, result.stderr[-2000:]
    commands = dry_run_commands(result)
    assert len(commands) == 21
    assert {(arm, seed) for arm in ARMS for seed in range(3)} == {
        (c.split("experiment_name=exp_")[1].split("_seed")[0], int(c.split("_seed")[1].split()[0])) for c in commands
    }
    assert {c.split()[0] for c in commands} == {"CUDA_VISIBLE_DEVICES=0", "CUDA_VISIBLE_DEVICES=1"}
    assert not list((tmp_path / "records").iterdir()) and not (task_dir.parent / "balanced").exists()


def test_complete_runs_are_skipped(tmp_path, task_dir):
    run = task_dir.parent / "balanced" / "seed1"
    run.mkdir(parents=True)
    (run / "metrics.jsonl").write_text(json.dumps({"step": 30, "data": {VAL_KEY: 0.3}}) + "\n")
    for total_steps, launched in (("30", 20), ("20", 20), ("40", 21)):  # a longer run counts for a shorter plan
        result = launch(tmp_path, task_dir, DRY_RUN="1", TOTAL_STEPS=total_steps)
        commands = dry_run_commands(result)
        assert len(commands) == launched and any("exp_balanced_seed1" in c for c in commands) == (launched == 21)
        assert ("skip balanced/seed1" in result.stdout) == (launched == 20)
    # without the validation at the last step the run is not complete
    (run / "metrics.jsonl").write_text(json.dumps({"step": 30, "data": {"timing_s/step": 1.0}}) + "\n")
    assert len(dry_run_commands(launch(tmp_path, task_dir, DRY_RUN="1", TOTAL_STEPS="30"))) == 21


def sampler_of(overrides: list[str]):
    config = compose_config(overrides)
    prepare_config(config)  # the recipe's refusals, verl's validate_config
    rollout = config.actor_rollout_ref.rollout
    return OptimalSamplingConfig.from_engine_kwargs(rollout.engine_kwargs), config


def test_every_arm_composes_with_its_sampler_and_identical_grpo_settings(tmp_path, task_dir):
    result = launch(tmp_path, task_dir, SEEDS="0", ARMS=" ".join(ARMS), GPUS="0", PER_GPU="7")
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    shared = None
    for arm in ARMS:
        overrides = recorded(tmp_path, f"exp_{arm}_seed0")
        os_config, config = sampler_of(overrides)
        s = os_config.sampler_config()
        expected = {
            "on_policy": ("fixed", 0.0, 0, None),
            "balanced": ("kl_symmetry", None, 1, 0.95),
            "conservative": ("kl_symmetry", None, 1, 0.90),
            "exploratory": ("kl_symmetry", None, 0, None),
            "fixed_alpha_0.5": ("fixed", 0.5, 0, None),
            "fixed_alpha_1": ("fixed", 1.0, 0, None),
            "ess_balance": ("ess_balance", None, 1, 0.95),
        }[arm]
        assert (s.alpha_method, s.fixed_alpha, s.force_teacher_tokens, s.teacher_top_p) == expected, arm
        assert ignores_teacher(s) == (arm == "on_policy")
        assert os_config.validate_policy_only and os_config.skip_unused_teacher
        rollout = config.actor_rollout_ref.rollout
        assert (rollout.val_kwargs.temperature, rollout.val_kwargs.do_sample) == (0, False)  # greedy
        assert config.algorithm.rollout_correction.rollout_is == "token"
        grpo = {o for o in overrides if not o.startswith(("sampler=", "trainer.experiment_name", "+ray_kwargs"))}
        grpo = {o for o in grpo if ".alpha_method=" not in o and ".fixed_alpha=" not in o}
        assert shared is None or grpo == shared, (arm, grpo ^ shared)
        shared = grpo
        metrics = task_dir.parent / arm / "seed0" / "metrics.jsonl"
        assert f"VERL_FILE_LOGGER_PATH={metrics}" in " ".join(overrides)
        assert json.loads((metrics.parent / "run.json").read_text())["complete"] is True
    assert "complete" in result.stdout and "INCOMPLETE" not in result.stdout


def test_runs_spread_over_gpus_and_failures_are_reported(tmp_path, task_dir):
    result = launch(
        tmp_path,
        task_dir,
        SEEDS="0 1",
        ARMS="balanced on_policy",
        GPUS="2 3",
        PER_GPU="1",
        FAIL_RUNS="exp_on_policy_seed1",
    )
    assert result.returncode == 1
    gpus = {p.stem: p.read_text().strip() for p in (tmp_path / "records").glob("*.gpu")}
    assert gpus == {  # jobs seed-major: slot 0 (GPU 2) runs jobs 0 and 2, slot 1 (GPU 3) jobs 1 and 3
        "exp_balanced_seed0": "2",
        "exp_on_policy_seed0": "3",
        "exp_balanced_seed1": "2",
        "exp_on_policy_seed1": "3",
    }
    assert (task_dir.parent / "failed.txt").read_text().split() == ["on_policy/seed1"]
    run = json.loads((task_dir.parent / "on_policy" / "seed1" / "run.json").read_text())
    assert (run["exit_code"], run["complete"]) == (1, False)
    assert (run["device"], run["runs_per_gpu"]) == ("none", 1)  # no GPU here; PER_GPU=1
    # re-running resumes: only the failed run is launched again
    for p in (tmp_path / "records").iterdir():
        p.unlink()
    assert launch(tmp_path, task_dir, SEEDS="0 1", ARMS="balanced on_policy", GPUS="2 3", PER_GPU="1").returncode == 0
    assert sorted(p.stem for p in (tmp_path / "records").glob("*.args")) == ["exp_on_policy_seed1"]


def test_gpu_host_packs_the_runs_into_out_and_passes_a_deadline(tmp_path, task_dir):
    """gpu_host.sh with an existing install (SITE), a stand-in nvidia-smi, and the stand-in python3: $OUT holds a
    few files, the runs in one archive without the task folder; runs respect the command's deadline."""
    import tarfile

    site, out = tmp_path / "site", tmp_path / "out"
    (site / "verl").mkdir(parents=True)
    (site / "verl" / "__init__.py").write_text("")
    out.mkdir()
    (tmp_path / "bin").mkdir()
    smi = tmp_path / "bin" / "nvidia-smi"
    smi.write_text("#!/usr/bin/env bash\necho 'NVIDIA H100 80GB HBM3, 81559 MiB, 580'\n")
    smi.chmod(smi.stat().st_mode | stat.S_IEXEC)
    env = {"SITE": str(site), "OUT": str(out), "SEEDS": "0", "ARMS": "balanced on_policy", "BUDGET_S": "900"}
    bin_dir = tmp_path / "bin"
    (bin_dir / "python3").write_text(FAKE_PYTHON)
    (bin_dir / "python3").chmod(0o755)
    (tmp_path / "records").mkdir()
    full_env = {
        **os.environ,
        **env,
        "PATH": f"{bin_dir}:{os.environ['PATH']}",
        "RECORD_DIR": str(tmp_path / "records"),
        "EXP_DIR": str(task_dir.parent),
        "STAGGER_S": "0",
    }
    result = subprocess.run(
        ["bash", str(SCRIPTS / "gpu_host.sh")], env=full_env, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert sorted(p.name for p in out.iterdir()) == ["device.txt", "experiments.tgz", "run_all.log", "status.txt"]
    with tarfile.open(out / "experiments.tgz") as tar:
        names = tar.getnames()
    assert "exp/balanced/seed0/metrics.jsonl" in names and "exp/on_policy/seed0/run.json" in names
    assert not any(n.startswith("exp/task") for n in names)
    assert "balanced/seed0" in (out / "status.txt").read_text()
    # too little time before the deadline: a run is not started (the next command resumes it)
    full_env |= {"BUDGET_S": "60", "ARMS": "exploratory"}
    result = subprocess.run(
        ["bash", str(SCRIPTS / "gpu_host.sh")], env=full_env, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 1 and "not started exploratory/seed0" in (out / "run_all.log").read_text()
    assert not (tmp_path / "records" / "exp_exploratory_seed0.args").exists()


def test_jobs_runs_just_the_listed_runs_and_the_mixed_arms_compose(tmp_path, task_dir):
    """JOBS=arm:seed replaces the ARMS x SEEDS product; the mixed-group arms (beyond issue 5) are the balanced preset
    with guided_per_prompt and otherwise the same command as `balanced`."""
    jobs = "balanced:1 mixed_1of8:1 mixed_4of8:2"
    result = launch(tmp_path, task_dir, JOBS=jobs, SEEDS="0", ARMS="on_policy", GPUS="0", PER_GPU="3")
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    names = {p.name.removesuffix(".args") for p in (tmp_path / "records").glob("*.args")}
    assert names == {"exp_balanced_seed1", "exp_mixed_1of8_seed1", "exp_mixed_4of8_seed2"}
    balanced = recorded(tmp_path, "exp_balanced_seed1")
    for arm, seed, k in (("mixed_1of8", 1, 1), ("mixed_4of8", 2, 4)):
        overrides = recorded(tmp_path, f"exp_{arm}_seed{seed}")
        os_config, _ = sampler_of(overrides)
        assert os_config.guided_per_prompt == k
        assert os_config.sampler_config() == sampler_of(balanced)[0].sampler_config()
        differ = {o for o in set(overrides) ^ set(balanced) if "seed" not in o and "exp_" not in o}
        assert differ == {f"actor_rollout_ref.rollout.engine_kwargs.optimal_sampling.guided_per_prompt={k}"}, differ
