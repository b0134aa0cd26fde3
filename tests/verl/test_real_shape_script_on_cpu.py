"""scripts/real_shape_gpu.sh up to the trainer, on CPU: with the install present and the tiny build in place of the
4B/14B checkpoints, the script runs its steps in order (build, training under the deadline, pack), its exact training
command composes through the recipe's Hydra config and passes the recipe's and verl's start-up checks (the datasets'
caps included), and $OUT gets at most 8 files. A stand-in `python3` on PATH records every call instead of running it
(and says "not complete" to the summary's --complete check, so the training is started). Also the summary script's
time split and memory per phase from a metrics file and a device-memory timeline."""

import importlib.util
import json
import os
import stat
import subprocess
from contextlib import redirect_stdout
from io import StringIO
from pathlib import Path

import pytest

from recipe.optimal_sampling.main import prepare_config
from recipe.optimal_sampling.verl import real_shape
from tests.verl.fixtures import compose_config

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "real_shape_gpu.sh"
RECORDER = """#!/usr/bin/env bash
n=$(ls "$CALLS" | wc -l)
printf "%s\\0" "$@" > "$CALLS/$(printf %03d "$n")"
case "$1" in *real_shape_summary.py) [ "${3:-}" = --complete ] && exit 1 ;; esac
exit 0
"""


def run_script(tmp_path: Path, env: dict) -> list[list[str]]:
    bin_dir, calls = tmp_path / "bin", tmp_path / "calls"
    bin_dir.mkdir()
    calls.mkdir()
    fake = bin_dir / "python3"
    fake.write_text(RECORDER)
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    full_env = {**os.environ, **env, "PATH": f"{bin_dir}:{os.environ['PATH']}", "CALLS": str(calls)}
    subprocess.run(["bash", str(SCRIPT)], env=full_env, check=False, capture_output=True, timeout=120)
    return [p.read_text().split("\0")[:-1] for p in sorted(calls.iterdir())]


@pytest.fixture(scope="module")
def tiny_work_dir(tmp_path_factory) -> Path:
    """WORK_DIR with the tiny build where the script expects the 4B/14B one (8 responses per prompt, caps <= 1024)."""
    work = tmp_path_factory.mktemp("work")
    real_shape.main(["--out", str(work / "4b_14b"), "--tiny", "--device", "cpu", "--n-train", "8", "--n-test", "2"])
    return work


def test_the_script_builds_trains_and_packs_with_a_command_that_passes_the_checks(tiny_work_dir, tmp_path):
    site, out = tmp_path / "site", tmp_path / "out"
    (site / "verl").mkdir(parents=True)
    (site / "verl" / "__init__.py").write_text("")  # the install is there: not redone
    calls = run_script(tmp_path, {"OUT": str(out), "SITE": str(site), "WORK_DIR": str(tiny_work_dir)})
    # 1) the steps, in order
    modules = [c[1] if c[0] == "-m" else Path(c[0]).name for c in calls]
    assert modules[:3] == ["recipe.optimal_sampling.verl.real_shape", "real_shape_summary.py",
                           "recipe.optimal_sampling.main"]  # fmt: skip
    assert "ray.scripts.scripts" in modules[3:]
    build = calls[0]
    assert build[build.index("--policy") + 1 :][:3] == ["4b", "--teacher", "14b"]
    assert build[build.index("--n") + 1] == "8" and build[build.index("--max-response") + 1] == "1024"
    # 2) the training command composes and passes the recipe's and verl's checks
    overrides = calls[2][2:]
    config = compose_config(overrides)
    prepare_config(config)
    rollout, actor = config.actor_rollout_ref.rollout, config.actor_rollout_ref.actor
    block = rollout.engine_kwargs.optimal_sampling
    assert (block.engine, block.continuous_batching, block.policy_template) == ("fast", True, "Q: {prompt}\nA: ")
    assert (config.data.train_batch_size * rollout.n, rollout.max_num_seqs, rollout.response_length) == (64, 64, 1024)
    assert actor.fsdp_config.param_offload and actor.fsdp_config.optimizer_offload
    assert actor.strategy == "fsdp" and config.trainer.total_training_steps == 3 and config.trainer.n_gpus_per_node == 1
    assert "file" in config.trainer.logger and config.ray_kwargs.ray_init.runtime_env.env_vars.VERL_FILE_LOGGER_PATH
    # 3) what comes back: at most 8 files, the status of each step among them
    assert 1 <= len(list(out.iterdir())) <= 8
    status = (out / "status.txt").read_text()
    assert "build rc=0" in status and "training rc=0" in status and "packed" in status


def test_the_deadline_leaves_the_training_unstarted_when_too_little_time_is_left(tiny_work_dir, tmp_path):
    site, out = tmp_path / "site", tmp_path / "out"
    (site / "verl").mkdir(parents=True)
    (site / "verl" / "__init__.py").write_text("")
    env = {"OUT": str(out), "SITE": str(site), "WORK_DIR": str(tiny_work_dir), "BUDGET_S": "100"}
    calls = run_script(tmp_path, env)
    assert not any(c[:2] == ["-m", "recipe.optimal_sampling.main"] for c in calls)
    assert "training not started" in (out / "status.txt").read_text()


def test_the_summary_splits_time_and_memory_by_phase(tmp_path):
    spec = importlib.util.spec_from_file_location("real_shape_summary", SCRIPT.parent / "real_shape_summary.py")
    summary = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(summary)
    server = "optimal_sampling/server/"
    data = {"timing_s/gen": 30.0, "timing_s/update_weights": 4.0, "timing_s/old_log_prob": 5.0,
            "timing_s/update_actor": 20.0, "timing_s/step": 60.0, server + "rollout_engine_s": 25.0,
            server + "rollout_start_unix": 100.0, server + "rollout_s": 30.0, server + "train_start_unix": 130.0,
            server + "train_s": 26.0, server + "rollout_server_peak_gib": 64.0, server + "device_total_gib": 139.8,
            "actor/perf/max_memory_allocated_gb": 70.0}  # fmt: skip
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text(json.dumps({"step": 1, "data": data}) + "\n" + '{"step": 2, "da')  # a killed run's last line
    timeline = tmp_path / "gpu_memory.csv"
    timeline.write_text("99.0,1024,143000\n110.0,66560,143000\n140.0,107520,143000\n170.0,2048,143000\nbad\n")
    assert summary.main([str(metrics), "--complete", "1"]) == 0 and summary.main([str(metrics), "--complete", "2"]) == 1
    with redirect_stdout(StringIO()) as printed:
        summary.main([str(metrics), "--gpu-memory", str(timeline)])
    time_row, memory_row = [line for line in printed.getvalue().splitlines() if line.startswith("| 1 |")]
    assert time_row.startswith("| 1 | 30.00 | 25.00 | 5.00 | 4.00 | 5.00 | 20.00 | 60.00 |")
    assert memory_row == "| 1 | 64.00 |  |  |  |  |  | 70.00 |  | 65.00 | 105.00 |  |"  # timeline: 66560 MiB, 107520
