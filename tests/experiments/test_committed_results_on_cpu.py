"""docs/experiments.md reports the committed metrics files: regenerating the tables from them with the command the doc
gives must reproduce the committed tables.md / summary.json byte for byte, and the doc must embed those tables."""

import json
from pathlib import Path

import pytest

from tests.experiments.test_plot_experiment_on_cpu import plot

DOCS = Path(__file__).resolve().parents[2] / "docs"
GUIDED = ["--target", "0.05", "--teacher-cost", "5.9", "--train-cost", "4", "--compute-ref", "on_policy"]
GUIDED += ["--task", "carry"]
REPORTS = [  # (metrics folder, output folder, the doc's arguments, its validation steps, the doc)
    ("runs", "experiments", ["--target", "0.21", "--replicates", str(DOCS / "experiments" / "runs_launch1")],
     "0,10,20,30,40", "experiments.md"),
    ("runs_weak", "experiments/weak", ["--target", "0.07"], "0,10,20,30,40", "experiments.md"),
    ("guided/runs", "experiments/guided", GUIDED, "0,20,40,60,80,100", "experiments/guided/README.md"),
]  # fmt: skip


@pytest.mark.parametrize(("runs", "out", "args", "at_steps", "doc"), REPORTS, ids=[r[0] for r in REPORTS])
def test_committed_tables_are_what_the_committed_metrics_give(tmp_path, runs, out, args, at_steps, doc):
    exp_dir = DOCS / "experiments" / runs
    plot.main(["--exp-dir", str(exp_dir), "--out", str(tmp_path), "--at-steps", at_steps, *args])
    committed = DOCS / out
    assert (tmp_path / "tables.md").read_text() == (committed / "tables.md").read_text()
    assert json.loads((tmp_path / "summary.json").read_text()) == json.loads((committed / "summary.json").read_text())
    text = (DOCS / doc).read_text()
    for table in (tmp_path / "tables.md").read_text().split("\n\n### "):
        body = table.split("\n\n", 1)[1].strip()  # the table under its heading
        assert body in text, f"docs/{doc} does not embed this table of {out}/tables.md:\n{body[:300]}"
