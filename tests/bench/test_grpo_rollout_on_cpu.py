"""Smoke run of bench/grpo_rollout.py with --tiny on CPU: every method runs on the same requests, writes its JSON
line, and the bookkeeping holds (every request gets its capped length; continuous batching needs no more steps
than static batching; groups share their prompt's prefill)."""

import importlib.util
import json
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "bench" / "grpo_rollout.py"


def test_tiny_rollout_benchmark_runs_every_method(tmp_path):
    spec = importlib.util.spec_from_file_location("grpo_rollout", SCRIPT)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "rollout.jsonl"
    argv = ["--tiny", "--cpu", "--prompts", "2", "--n", "3", "--slots", "2", "--prompt-min", "3", "--prompt-max", "6",
            "--teacher-extra", "2", "--median-response", "3", "--max-response", "5", "--check-every", "1",
            "--out", str(out)]  # fmt: skip
    rows = bench.main(argv)
    assert [json.loads(line) for line in out.read_text().splitlines()] == rows
    by = {r["method"]: r for r in rows}
    assert list(by) == ["continuous", "static", "policy_only", "equal_length"]
    caps = sum(r.max_new_tokens for r in bench.workload(bench.parse_args(argv), bench.TINY_VOCAB))
    assert by["continuous"]["tokens"] == by["static"]["tokens"] == by["policy_only"]["tokens"] == caps
    assert by["continuous"]["steps"] <= by["static"]["steps"]
    assert by["continuous"]["prefilled"] == 2 and by["continuous"]["copied"] == 4  # 2 prompts x 3 responses
    for r in rows:
        assert r["device"] == "cpu" and 0 < r["slot_use"] <= 1 and r["tokens_per_s"] > 0 and r["floor_s"] is None
