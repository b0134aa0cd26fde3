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

import pandas as pd
import pytest

from recipe.optimal_sampling.engine.policy_only import ignores_teacher
from recipe.optimal_sampling.main import prepare_config
from recipe.optimal_sampling.verl.config import OptimalSamplingConfig
from tests.verl.fixtures import compose_config

SCRIPTS = Path(__file__).resolve().parents[2] / "scripts" / "experiments"
ARMS = ["on_policy", "balanced", "conservative", "exploratory", "fixed_alpha_0.5", "fixed_alpha_1", "ess_balance"]
VAL_KEY = "optimal_sampling/val_policy_only_accuracy"
KEY = "actor_rollout_ref.rollout.engine_kwargs.optimal_sampling"
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
    pd.DataFrame({"prompt": [[{"role": "user", "content": "1+1"}]]}).to_parquet(task / "test.parquet")
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
        assert f"VERL_FILE_LOGGER_PATH={metrics.parent / 'attempts' / '0.jsonl'}" in " ".join(overrides)
        assert json.loads((metrics.parent / "run.json").read_text())["complete"] is True
        assert "trainer.save_freq=-1" in overrides and "trainer.resume_mode=auto" not in overrides
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


GUIDED_ARMS = {  # the guided experiment's arms (issue 11): sampler, guided members, estimator, guided_loss, scoring
    "on_policy": ("fixed", None, "grpo", {}, False),
    "opd": ("fixed", None, "optimal_sampling_guided", {"critic_coef": 1.0}, True),
    "control": ("kl_symmetry", None, "grpo", {}, False),
    "mixed": ("kl_symmetry", 1, "grpo", {}, False),
    "imitation": ("kl_symmetry", None, "optimal_sampling_guided", {"mode": "imitation"}, False),
    "imitation_critic": (
        "kl_symmetry", None, "optimal_sampling_guided",
        {"mode": "imitation", "critic_coef": 1.0, "critic_rows": "guided"}, False,
    ),
    "positive": ("kl_symmetry", None, "optimal_sampling_guided", {"mode": "positive_only"}, False),
    "mixed_pb": ("kl_symmetry", 1, "optimal_sampling_guided", {"baseline": "policy", "mode": "positive_only"}, False),
    "mixed_pb_critic": (
        "kl_symmetry", 1, "optimal_sampling_guided",
        {"baseline": "policy", "mode": "positive_only", "critic_coef": 1.0}, True,
    ),
}  # fmt: skip


def test_guided_arms_compose_on_the_carry_task_with_their_loss_learning_rate_and_checkpoints(tmp_path, task_dir):
    """TASK=carry: the worked answers' response budget; each guided arm is the pilot spec of the same name (sampler,
    guided members, estimator, guided_loss block, teacher scoring), ARM_LRS gives arms their own learning rate, and
    SAVE_FREQ makes the runs resumable from verl's checkpoints; every other setting is shared."""
    from recipe.optimal_sampling.loss import GuidedLossConfig

    result = launch(
        tmp_path, task_dir, TASK="carry", SEEDS="0", ARMS=" ".join(GUIDED_ARMS), GPUS="0", PER_GPU="9",
        ARM_LRS="opd=3e-4 mixed_pb_critic=2e-4", SAVE_FREQ="10",
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    shared = None
    for arm, (alpha_method, k, estimator, loss, scored) in GUIDED_ARMS.items():
        overrides = recorded(tmp_path, f"exp_{arm}_seed0")
        os_config, config = sampler_of(overrides)
        assert (os_config.alpha_method, os_config.guided_per_prompt) == (alpha_method, k), arm
        assert config.algorithm.adv_estimator == estimator, arm
        assert GuidedLossConfig.from_mapping(config.guided_loss).changed() == loss, arm
        assert os_config.score_policy_samples == scored, arm
        assert config.data.max_response_length == 13
        assert config.actor_rollout_ref.actor.optim.lr == {"opd": 3e-4, "mixed_pb_critic": 2e-4}.get(arm, 1e-4), arm
        run_dir = task_dir.parent / arm / "seed0"
        trainer = config.trainer
        assert (trainer.save_freq, trainer.resume_mode, trainer.default_local_dir) == (10, "auto", f"{run_dir}/ckpt")
        assert trainer.max_actor_ckpt_to_keep == 2
        differ = ("sampler=", "trainer.experiment_name", "+ray_kwargs", "algorithm.adv_estimator", "guided_loss.")
        grpo = {o for o in overrides if not o.startswith(differ) and "optim.lr=" not in o and "/ckpt" not in o}
        grpo = {o for o in grpo if not o.startswith(f"{KEY}.") or "_path=" in o or "template=" in o}
        assert shared is None or grpo == shared, (arm, grpo ^ shared)
        shared = grpo


def test_a_resumed_run_merges_its_attempts_into_one_metrics_file(tmp_path):
    """verl's file logger truncates its file at start: each attempt logs to its own file and `run_status.py merge`
    keeps the earlier attempt's rows up to the checkpoint the later one resumed from (merging the two rows of that
    step: training metrics and validation), the later attempt's rows after it."""
    sys.path.insert(0, str(SCRIPTS))
    import run_status

    attempts = tmp_path / "attempts"
    attempts.mkdir()
    first = [  # validation at 0, steps 1-13 (checkpoint at 10, validation every 5), killed after 13
        {"step": 0, "data": {VAL_KEY: 0.0}},
        *({"step": s, "data": {"timing_s/step": 1.0, "attempt": 0, **({VAL_KEY: s / 100} if s % 5 == 0 else {})}}
          for s in range(1, 14)),
    ]  # fmt: skip
    second = [  # resumed from step 10: validation at 10, then steps 11-12, killed again
        {"step": 10, "data": {VAL_KEY: 0.5}},
        *({"step": s, "data": {"timing_s/step": 2.0, "attempt": 1}} for s in (11, 12)),
    ]
    for i, rows in enumerate((first, second)):
        (attempts / f"{i}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (attempts / "10.jsonl").write_text("")  # attempts sort by number, not name; an empty one changes nothing
    assert run_status.main(["merge", str(tmp_path)]) == 0
    merged = run_status.read_rows(str(tmp_path / "metrics.jsonl"))
    assert [r["step"] for r in merged] == list(range(13))  # step 13 was redone and lost with the second attempt
    assert merged[10]["data"] == {"timing_s/step": 1.0, "attempt": 0, VAL_KEY: 0.5}  # training of 0, validation of 1
    assert [merged[s]["data"]["attempt"] for s in (9, 11, 12)] == [0, 1, 1]
    assert not run_status.is_complete(str(tmp_path / "metrics.jsonl"), 12)  # no validation at step 12


def test_a_run_resumes_from_the_latest_checkpoint_whose_metrics_were_logged(tmp_path):
    """verl saves a step's checkpoint before it logs the step: a run stopped in between has a checkpoint whose metrics
    are lost. `rewind` drops it and points verl's tracker at the one before, so that the step is trained again."""
    sys.path.insert(0, str(SCRIPTS))
    import run_status

    ckpt = tmp_path / "ckpt"
    for step in (20, 30):
        (ckpt / f"global_step_{step}" / "actor").mkdir(parents=True)
    (ckpt / "global_step_10").mkdir()  # an older step whose actor verl already pruned: not a resume point
    (ckpt / "latest_checkpointed_iteration.txt").write_text("30")
    rows = [{"step": s, "data": {"timing_s/step": 1.0}} for s in range(1, 30)]  # killed after saving step 30
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert run_status.rewind(str(tmp_path)) == 20
    assert not (ckpt / "global_step_30").exists() and (ckpt / "global_step_20" / "actor").is_dir()
    assert (ckpt / "latest_checkpointed_iteration.txt").read_text() == "20"
    assert run_status.rewind(str(tmp_path)) == 20  # idempotent
    # a validation-only row (the resumed attempt's) does not count as the step's training metrics
    (tmp_path / "metrics.jsonl").write_text(json.dumps({"step": 20, "data": {VAL_KEY: 0.1}}) + "\n")
    assert run_status.rewind(str(tmp_path)) is None and not ckpt.exists()  # nothing left: from scratch
    assert run_status.rewind(str(tmp_path)) is None
