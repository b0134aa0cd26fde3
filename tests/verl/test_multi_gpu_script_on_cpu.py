"""scripts/multi_gpu_gpu.sh on CPU: its two training commands (every GPU, then one) compose and pass the recipe's and
verl's start-up checks with n_gpus_per_node=2 and differ only in the GPUs; what it packs into $OUT; and
scripts/multi_gpu_compare.py's checks against hand-made metrics files. `python3` and `nvidia-smi` are stand-ins on
PATH: `-m recipe.optimal_sampling.main` calls are recorded (and write a metrics file with the per-replica metrics the
trainer logs), every other python3 call runs the real interpreter."""

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from recipe.optimal_sampling.main import prepare_config
from recipe.optimal_sampling.verl.data import write_datasets
from tests.verl.fixtures import compose_config

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "scripts" / "multi_gpu_gpu.sh"
sys.path.insert(0, str(REPO / "scripts"))
import multi_gpu_compare  # noqa: E402

R = "optimal_sampling/replica"
FAKE_PYTHON = f"""#!/usr/bin/env bash
if [ "${{1:-}} ${{2:-}}" != "-m recipe.optimal_sampling.main" ]; then exec {sys.executable} "$@"; fi
arg() {{ printf "%s\\n" "$@" | sed -n "s/^$1=//p"; }}
name=$(arg trainer.experiment_name "$@")
gpus=$(arg trainer.n_gpus_per_node "$@")
printf "%s\\0" "$@" > "$RECORD_DIR/$name.args"
printf "%s %s %s\\n" "$CUDA_VISIBLE_DEVICES" "$WANDB_MODE" "$VERL_FILE_LOGGER_PATH" > "$RECORD_DIR/$name.env"
for s in $(seq 1 "$(arg trainer.total_training_steps "$@")"); do
    data='"critic/score/mean": 0.5, "timing_s/step": 3.0, "timing_s/gen": 1.0, "{R}_weight_lag_max": 0'
    for r in $(seq 0 $((gpus - 1))); do
        data="$data, \\"{R}$r/responses\\": $((128 / gpus)), \\"{R}$r/logp_policy_server_vs_trainer\\": 0.0"
    done
    echo "{{\\"step\\": $s, \\"data\\": {{$data}}}}" >> "$VERL_FILE_LOGGER_PATH"
done
"""
FAKE_NVIDIA_SMI = """#!/usr/bin/env bash
case "$*" in
    -L) printf "GPU 0: NVIDIA H200 (UUID: a)\\nGPU 1: NVIDIA H200 (UUID: b)\\n" ;;
    *-lms*) printf "2026/12/02 11:00:00.000, 0, 5000, 143771, 10\\n2026/12/02 11:00:00.000, 1, 4000, 143771, 5\\n" ;;
    *) printf "0, NVIDIA H200, 143771 MiB, 570.00\\n1, NVIDIA H200, 143771 MiB, 570.00\\n" ;;
esac
"""
# what differs between the two commands: the GPUs, the run's name and its output paths
ENV = "+ray_kwargs.ray_init.runtime_env.env_vars."
PER_RUN = ("trainer.n_gpus_per_node=", "trainer.experiment_name=", ENV + "WANDB_DIR=", ENV + "VERL_FILE_LOGGER_PATH=")


def executable(path: Path, text: str) -> None:
    path.write_text(text)
    path.chmod(path.stat().st_mode | stat.S_IEXEC)


@pytest.fixture
def launched(tmp_path, checkpoints):
    """The script run with the stand-ins, a task folder of the tiny checkpoints and an 'installed' SITE."""
    task, site, out, records, bin_dir = (tmp_path / d for d in ("task", "site", "out", "records", "bin"))
    for d in (task / "models", site / "verl", out, records, bin_dir):
        d.mkdir(parents=True)
    (site / "verl" / "__init__.py").write_text("")
    (task / "models" / "meta.json").write_text("{}")
    write_datasets(str(task), n_train=4, n_test=2)  # prepare_config reads them (per-request response caps)
    for role in ("policy", "teacher"):
        os.symlink(checkpoints[role], task / "models" / role)
    executable(bin_dir / "python3", FAKE_PYTHON)
    executable(bin_dir / "nvidia-smi", FAKE_NVIDIA_SMI)
    env = {
        **os.environ,
        "PATH": f"{bin_dir}:{os.environ['PATH']}",
        "OUT": str(out),
        "SITE": str(site),
        "TASK_DIR": str(task),
        "WORK_DIR": str(tmp_path / "work"),
        "RECORD_DIR": str(records),
    }
    result = subprocess.run(["bash", str(SCRIPT)], env=env, capture_output=True, text=True, timeout=120)
    return result, out, records, task


def recorded(records: Path, name: str) -> tuple[list[str], list[str]]:
    args = (records / f"{name}.args").read_text().split("\0")[:-1]
    return args[2:], (records / f"{name}.env").read_text().split()


def test_both_runs_compose_pass_the_checks_and_differ_only_in_their_gpus(launched, checkpoints):
    result, out, records, task = launched
    assert result.returncode == 0, result.stderr[-3000:]
    multi, multi_env = recorded(records, "multi_gpu_multi_2gpu")
    single, single_env = recorded(records, "multi_gpu_single_1gpu")
    assert multi_env[:2] == ["0,1", "offline"] and single_env[:2] == ["0", "offline"]
    for overrides, gpus in ((multi, 2), (single, 1)):
        config = compose_config(overrides)
        prepare_config(config)  # the recipe's refusals, the teacher check, verl's validate_config with these GPUs
        assert config.trainer.n_gpus_per_node == gpus and config.trainer.nnodes == 1
        assert config.trainer.total_training_steps >= 5
        assert {"wandb", "file"} <= set(config.trainer.logger)
        assert config.ray_kwargs.ray_init.runtime_env.env_vars.WANDB_MODE == "offline"
        assert config.actor_rollout_ref.model.path == str(task / "models" / "policy")
        assert config.actor_rollout_ref.rollout.seed == config.data.seed == 0
    assert [a for a in multi if not a.startswith(PER_RUN)] == [a for a in single if not a.startswith(PER_RUN)]


def test_out_holds_the_metrics_the_report_and_the_logs(launched):
    result, out, _, _ = launched
    assert result.returncode == 0, result.stderr[-3000:]
    files = sorted(p.name for p in out.iterdir())
    assert files == ["compare.md", "device.txt", "logs.tgz", "multi.metrics.jsonl", "single.metrics.jsonl"]
    report = (out / "compare.md").read_text()
    assert "- PASS spread" in report and "- PASS synced" in report and "- FAIL" not in report
    assert "| 0 | 5000 | 5000 | 143771 |" in report  # per-GPU peak memory of both runs


def write_run(folder: Path, steps: list[dict]) -> str:
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "metrics.jsonl", "w") as f:
        for step, data in enumerate(steps, start=1):
            f.write(json.dumps({"step": step, "data": data}) + "\n")
    return str(folder)


def replica_step(counts, gaps, lag=0, **extra) -> dict:
    data = {f"{R}_weight_lag_max": lag, **extra}
    for r, (count, gap) in enumerate(zip(counts, gaps, strict=True)):
        data[f"{R}{r}/responses"] = count
        if count:
            data[f"{R}{r}/logp_policy_server_vs_trainer"] = gap
    return data


def test_report_passes_a_clean_run_and_names_each_failure(tmp_path):
    scores = [0.50, 0.60, 0.55, 0.70, 0.65]
    single = write_run(tmp_path / "single", [{"critic/score/mean": s} for s in scores])
    noisy = [s + d for s, d in zip(scores, [0.02, -0.03, 0.01, -0.01, 0.02], strict=True)]  # mean diff 0.002
    extra = {"timing_s/gen": 2.0, "optimal_sampling/server/rollout_s": 1.5, "optimal_sampling/server/train_s": 9.0}
    clean_steps = [replica_step([64, 64], [0.0, 1e-3], **{"critic/score/mean": s}, **extra) for s in noisy]
    clean = write_run(tmp_path / "ok", clean_steps)
    text, ok = multi_gpu_compare.report(clean, single, gpus=2, total_steps=5, gap_tol=0.01, z=3)
    assert ok, text
    assert "| 1 | 64, 64 | 0 | 0.001 |" in text
    assert "| `optimal_sampling/server/rollout_s` | 1.5 |  |" in text and "| `timing_s/gen` | 2 |  |" in text
    # an idle replica, a missed sync, a stale replica's gap, a shifted metric, a short run: each its own FAIL
    bad_steps = [replica_step([128, 0], [0.0, 0.0], **{"critic/score/mean": s + 0.3}) for s in scores[:4]]
    bad_steps[1] = replica_step([64, 64], [0.0, 0.4], lag=1, **{"critic/score/mean": scores[1] + 0.3})
    bad = write_run(tmp_path / "bad", bad_steps)
    text, ok = multi_gpu_compare.report(bad, single, gpus=2, total_steps=5, gap_tol=0.01, z=3)
    assert not ok
    for check in ("spread", "synced", "gap", "steps", "noise critic/score/mean"):
        assert f"- FAIL {check}" in text, check
    assert multi_gpu_compare.main(["--multi", bad, "--single", single, "--gpus", "2"]) == 1


def test_noise_is_judged_on_paired_step_differences():
    assert multi_gpu_compare.within_noise([0.1, -0.1, 0.1, -0.1], z=3)[2]
    assert not multi_gpu_compare.within_noise([0.3, 0.31, 0.29, 0.3], z=3)[2]
    assert multi_gpu_compare.within_noise([0.0, 0.0], z=3)[2] and not multi_gpu_compare.within_noise([0.1], z=3)[2]
