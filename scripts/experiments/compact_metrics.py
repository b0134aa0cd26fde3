"""Compact an experiment's metrics files for committing: every EXP_DIR/<arm>/seed<k>/metrics.jsonl (verl's `file`
logger, ~125 metrics a step, ~200 KB a run) becomes metrics.jsonl.gz holding each step with only the metrics the
reports read (REPORTED below: bench/plot_experiment.py's curves and tables, run_status.py's completion check), ~4 KB a
run. The values are copied unchanged, so the tables regenerated from the compact files are byte-identical.

    python3 scripts/experiments/compact_metrics.py docs/experiments/guided/runs [more EXP_DIRs]   # then commit

The gzip stream is deterministic (no timestamp, no file name): compacting the same file twice gives the same bytes.
Each compact file is read back and compared before its plain file is removed. `--keep-all` keeps every metric
(compression only, ~7x larger). Standard library only. Knows nothing about verl or the recipe: it reads JSON lines.
"""

import argparse
import gzip
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from run_status import COMPACT, METRICS, VAL_KEY, metrics_files, read_rows  # noqa: E402

REPORTED = (  # every metric bench/plot_experiment.py and run_status.py read (tests/experiments checks the list)
    VAL_KEY,
    "optimal_sampling/policy_forward_tokens",
    "optimal_sampling/teacher_forward_tokens",
    "timing_s/step",
    "timing_s/gen",
    "optimal_sampling/alpha_mean",
    "optimal_sampling/alpha_p10",
    "optimal_sampling/alpha_p50",
    "optimal_sampling/alpha_p90",
    "optimal_sampling/forced_frac",
    "optimal_sampling/single_support_frac",
    "optimal_sampling/kl_q_policy",
    "optimal_sampling/guided_frac",
    "optimal_sampling/zero_advantage_frac",
    "optimal_sampling/critic_coef",
    "optimal_sampling/critic_logratio_mean",
    "optimal_sampling/critic_scored_frac",
    "optimal_sampling/logp_policy_server_vs_trainer",
    "rollout_corr/rollout_is_mean",
    "rollout_corr/rollout_is_eff_sample_size",
    "rollout_corr/rollout_is_ratio_fraction_high",
    "critic/score/mean",
)


def trimmed(rows: list[dict], keep_all: bool) -> list[dict]:
    """The same steps, each with only the reported metrics (those it has)."""
    if keep_all:
        return rows
    return [{"step": r["step"], "data": {k: r["data"][k] for k in REPORTED if k in r["data"]}} for r in rows]


def write_compact(path: str, rows: list[dict]) -> None:
    """Deterministic gzip of the JSON lines (mtime 0, no name), written to a temporary file and renamed."""
    text = "".join(json.dumps(r) + "\n" for r in rows).encode()
    tmp = path + ".tmp"
    with open(tmp, "wb") as raw, gzip.GzipFile(filename="", fileobj=raw, mode="wb", mtime=0) as f:
        f.write(text)
    os.replace(tmp, path)


def compact_run(plain: str, keep_all: bool) -> tuple[int, int]:
    """RUN_DIR/metrics.jsonl -> RUN_DIR/metrics.jsonl.gz, checked, then the plain file removed. Returns the sizes."""
    rows = trimmed(read_rows(plain), keep_all)
    compact = plain + ".gz"
    write_compact(compact, rows)
    assert read_rows(compact) == rows, f"{compact} does not read back as written"
    before, after = os.path.getsize(plain), os.path.getsize(compact)
    os.remove(plain)
    return before, after


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("exp_dirs", nargs="+", help="folders holding <arm>/seed<k>/metrics.jsonl")
    parser.add_argument("--keep-all", action="store_true", help="keep every metric (compress only)")
    args = parser.parse_args(argv)
    total_before = total_after = 0
    for exp_dir in args.exp_dirs:
        plain = [p for p in metrics_files(exp_dir) if p.endswith(METRICS)]
        if not plain and not any(p.endswith(COMPACT) for p in metrics_files(exp_dir)):
            print(f"compact_metrics.py: error: no <arm>/seed<k>/{METRICS} under {exp_dir!r}", file=sys.stderr)
            return 2
        for path in plain:
            before, after = compact_run(path, args.keep_all)
            total_before, total_after = total_before + before, total_after + after
    print(f"compacted: {total_before / 1e6:.2f} MB -> {total_after / 1e6:.2f} MB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
