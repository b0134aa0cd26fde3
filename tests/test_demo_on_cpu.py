import json
from pathlib import Path

import pytest

from recipe.optimal_sampling.cli import main
from recipe.optimal_sampling.demo import ARMS


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory):
    """The real demo, as the README runs it (trained task models, cached across runs; 200 held-out problems)."""
    out = tmp_path_factory.mktemp("demo")
    assert main(["demo", "--out", str(out)]) == 0
    return out


def test_demo_writes_traces_summary_and_picture(demo_dir):
    assert (demo_dir / "alpha_traces.png").stat().st_size > 10_000
    for arm in ARMS:
        rows = [json.loads(line) for line in (demo_dir / f"{arm}.jsonl").read_text().splitlines()]
        assert len(rows) == 200
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


def readme_demo_table() -> dict[str, dict[str, str]]:
    """The demo table in README.md: {arm: {column: cell}}."""
    lines = (Path(__file__).parents[1] / "README.md").read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("| arm | accuracy | alpha_mean"))
    header = [c.strip() for c in lines[start].strip("|").split("|")]
    rows = {}
    for line in lines[start + 2 :]:
        if not line.startswith("|"):
            break
        cells = [c.strip() for c in line.strip("|").split("|")]
        rows[cells[0]] = dict(zip(header, cells, strict=True))
    return rows


def test_the_readme_demo_table_is_what_the_demo_prints(demo_dir):
    """Training is portable (tasks/portable.py), so a fresh machine reproduces the README's numbers; the accuracy
    may move by a few points at most (float32 sampling near a tie), tokens/s is the machine's own."""
    readme = readme_demo_table()
    arms = json.loads((demo_dir / "summary.json").read_text())["arms"]
    assert set(readme) == set(arms) == set(ARMS)
    for arm, s in arms.items():
        assert abs(s["accuracy"] - float(readme[arm]["accuracy"].rstrip("%")) / 100) <= 0.03, arm
        for key in ("alpha_mean", "alpha_p50"):
            assert abs(s[key] - float(readme[arm][key])) <= 0.02, (arm, key)
        assert abs(s["forced_frac"] - float(readme[arm]["forced"].rstrip("%")) / 100) <= 0.01, arm


def test_table_shows_undefined_alpha_statistics_as_n_a():
    from recipe.optimal_sampling.demo import format_table

    summary = {"accuracy": 0.5, "forced_frac": 1.0, "single_support_frac": 0.0, "kl_q_policy": 0.1,
               "kl_q_teacher": 0.0, "is_weight_mean": 1.0, "tokens_per_s": 10.0}  # fmt: skip
    row = format_table({"all_forced": summary}).splitlines()[-1]
    assert row.startswith("| all_forced | 50.0% | n/a | n/a | n/a | n/a | 100.0% |"), row
