"""scripts/experiments/compact_metrics.py and the readers of its output: a compacted experiment gives byte-identical
tables and the same summary as the plain one, the compact file holds every step with exactly the reported metrics,
the bytes are reproducible, run_status.py counts a compact run as complete, the reported-metrics list is exactly what
bench/plot_experiment.py reads, and the committed evidence stays compact."""

import gzip
import importlib.util
import json
import shutil
import subprocess
from pathlib import Path

from tests.experiments.test_plot_experiment_on_cpu import exp_dir, plot  # noqa: F401  (exp_dir: a fixture)

ROOT = Path(__file__).resolve().parents[2]
SCRIPTS = ROOT / "scripts" / "experiments"


def load(name: str):
    spec = importlib.util.spec_from_file_location(name, SCRIPTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


compact = load("compact_metrics")
status = load("run_status")


def run_compaction(*exp_dirs: Path) -> str:
    result = subprocess.run(
        ["python3", str(SCRIPTS / "compact_metrics.py"), *map(str, exp_dirs)], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


def plain_rows(path: Path) -> list[dict]:
    return status.read_rows(str(path))


def test_compact_experiment_gives_the_same_tables_as_the_plain_one(exp_dir, tmp_path):  # noqa: F811
    compacted = tmp_path / "compacted"
    shutil.copytree(exp_dir, compacted)
    before = {p.relative_to(compacted).parent: plain_rows(p) for p in compacted.glob("*/seed*/metrics.jsonl")}
    run_compaction(compacted)
    assert not list(compacted.glob("*/seed*/metrics.jsonl")) and len(list(compacted.glob("*/seed*/*.gz"))) == 8
    for run, rows in before.items():  # every step kept, with exactly the reported metrics it had
        expected = [
            {"step": r["step"], "data": {k: v for k, v in r["data"].items() if k in compact.REPORTED}} for r in rows
        ]
        assert plain_rows(compacted / run / "metrics.jsonl.gz") == expected
    for src, out in ((exp_dir, tmp_path / "plain_out"), (compacted, tmp_path / "compact_out")):
        plot.main(["--exp-dir", str(src), "--out", str(out), "--target", "0.3", "--at-steps", "0,2,4"])
    assert (tmp_path / "plain_out" / "tables.md").read_bytes() == (tmp_path / "compact_out" / "tables.md").read_bytes()
    assert (tmp_path / "plain_out" / "summary.json").read_bytes() == (
        tmp_path / "compact_out" / "summary.json"
    ).read_bytes()


def test_compaction_is_reproducible_and_keep_all_keeps_every_metric(tmp_path):
    rows = [{"step": s, "data": {"timing_s/step": 1.5 * s, "actor/pg_loss": -0.25 * s}} for s in range(3)]
    for name in ("a", "b", "c"):
        run = tmp_path / name / "on_policy" / "seed0"
        run.mkdir(parents=True)
        (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    run_compaction(tmp_path / "a")
    run_compaction(tmp_path / "b")
    gz = "on_policy/seed0/metrics.jsonl.gz"
    assert (tmp_path / "a" / gz).read_bytes() == (tmp_path / "b" / gz).read_bytes()
    assert compact.main([str(tmp_path / "c"), "--keep-all"]) == 0
    assert status.read_rows(str(tmp_path / "c" / gz)) == rows


def test_run_status_reads_compact_runs_and_a_truncated_compact_file(tmp_path):
    run = tmp_path / "exp" / "balanced" / "seed0"
    run.mkdir(parents=True)
    rows = [{"step": s, "data": {status.VAL_KEY: 0.1 * s}} for s in (0, 20, 40)]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    run_compaction(tmp_path / "exp")
    assert status.is_complete(str(run / "metrics.jsonl"), 40) and not status.is_complete(str(run / "metrics.jsonl"), 41)
    assert "complete" in status.summary_lines(str(tmp_path / "exp"), 40)[0]
    data = gzip.decompress((run / "metrics.jsonl.gz").read_bytes())
    (run / "metrics.jsonl.gz").write_bytes(gzip.compress(data)[:-12])  # a stream cut short, as by a killed copy
    assert (
        status.read_rows(str(run / "metrics.jsonl.gz")) == rows[: len(status.read_rows(str(run / "metrics.jsonl.gz")))]
    )


def test_the_reported_metrics_are_exactly_what_the_reports_read():
    read = {plot.ACC, plot.POLICY_TOKENS, plot.TEACHER_TOKENS, plot.STEP_SECONDS, *(key for _, key in plot.STATS)}
    assert set(compact.REPORTED) == read | {status.VAL_KEY}


def test_the_committed_evidence_is_compact():
    tracked = subprocess.run(["git", "ls-files", "docs"], cwd=ROOT, capture_output=True, text=True, check=True)
    files = [ROOT / f for f in tracked.stdout.split()]
    assert not [f for f in files if f.name == "metrics.jsonl" and "experiments" in f.parts]
    assert sum(f.stat().st_size for f in files if f.exists()) < 2_000_000
