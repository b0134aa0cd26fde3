import json

import pytest

from recipe.optimal_sampling.cli import main
from recipe.optimal_sampling.demo import ARMS


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory):
    """The real demo (trained task models, cached across runs) on 40 held-out problems."""
    out = tmp_path_factory.mktemp("demo")
    assert main(["demo", "--out", str(out), "--num-problems", "40"]) == 0
    return out


def test_demo_writes_traces_summary_and_picture(demo_dir):
    assert (demo_dir / "alpha_traces.png").stat().st_size > 10_000
    for arm in ARMS:
        rows = [json.loads(line) for line in (demo_dir / f"{arm}.jsonl").read_text().splitlines()]
        assert len(rows) == 40
        for row in rows:
            n = len(row["token_ids"])
            assert n >= 1 and all(len(row[k]) == n for k in ("alpha", "logp_q", "logp_policy", "logp_teacher"))
            assert row["reward"] in (0.0, 1.0)


def test_demo_shows_the_teacher_above_the_policy_and_q_star_beside_them(demo_dir):
    arms = json.loads((demo_dir / "summary.json").read_text())["arms"]
    assert arms["teacher_only"]["accuracy"] >= arms["policy_only"]["accuracy"] + 0.4
    assert arms["policy_only"]["alpha_mean"] == 0.0 and arms["teacher_only"]["alpha_mean"] == 1.0
    for preset in ("q_conservative", "q_balanced", "q_exploratory"):
        assert 0.0 < arms[preset]["alpha_mean"] < 1.0
        # q* is a mixture: it helps the weak policy
        assert arms[preset]["accuracy"] > arms["policy_only"]["accuracy"]
    assert arms["q_balanced"]["forced_frac"] > 0 and arms["q_exploratory"]["forced_frac"] == 0


def test_table_shows_undefined_alpha_statistics_as_n_a():
    from recipe.optimal_sampling.demo import format_table

    summary = {"accuracy": 0.5, "forced_frac": 1.0, "single_support_frac": 0.0, "kl_q_policy": 0.1,
               "kl_q_teacher": 0.0, "is_weight_mean": 1.0, "tokens_per_s": 10.0}  # fmt: skip
    row = format_table({"all_forced": summary}).splitlines()[-1]
    assert row.startswith("| all_forced | 50.0% | n/a | n/a | n/a | n/a | 100.0% |"), row
