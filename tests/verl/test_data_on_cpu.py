"""verl/data.py's `--task` option and the reward function's dispatch on `data_source`: the addition task stays the
default; the carry task writes 5-digit problems that its own reward scores."""

import pandas as pd
import pytest

from recipe.optimal_sampling.tasks import ADDITION, CARRY, Problem, is_test_pair
from recipe.optimal_sampling.verl import data
from recipe.optimal_sampling.verl.reward import compute_score


def read(path):
    return pd.read_parquet(path).to_dict("records")


@pytest.mark.parametrize(("task", "form", "digits"), [("addition", ADDITION, 3), ("carry", CARRY, 5)])
def test_write_datasets_per_task(tmp_path, task, form, digits):
    paths = data.write_datasets(str(tmp_path), n_train=16, n_test=8, task=task)
    train, test = read(paths["train"]), read(paths["test"])
    assert (len(train), len(test)) == (16, 8)
    for split, rows in (("train", train), ("test", test)):
        for row in rows:
            a, b = row["prompt"][0]["content"].split("+")
            assert len(a) == len(b) == digits and row["reward_model"]["ground_truth"] == str(int(a) + int(b))
            assert row["data_source"] == form.data_source and row["extra_info"]["task"] == task
            assert is_test_pair(int(a), int(b)) == (split == "test")
            problem = Problem(f"{a}+{b}", row["reward_model"]["ground_truth"])
            right = form.completion_text(problem)
            assert compute_score(row["data_source"], right, row["reward_model"]["ground_truth"]) == 1.0


def test_the_default_task_is_addition(tmp_path):
    paths = data.write_datasets(str(tmp_path), n_train=4, n_test=2)
    assert {r["data_source"] for r in read(paths["train"])} == {data.DATA_SOURCE} == {ADDITION.data_source}


def test_compute_score_reads_the_format_of_the_data_source():
    assert compute_score("optimal_sampling/carry", "213160<eos>", "632") == 1.0
    assert compute_score("optimal_sampling/addition", "213160<eos>", "632") == 0.0
    assert compute_score("optimal_sampling/carry", "236<eos>", "632") == 0.0
    assert compute_score("optimal_sampling/addition", "236<eos>", "632") == 1.0
    with pytest.raises(ValueError, match="data_source"):
        compute_score("gsm8k", "236", "632")


def test_main_task_option(tmp_path, capsys):
    data.main(["--out", str(tmp_path), "--task", "carry", "--n-train", "4", "--n-test", "2", "--skip-models"])
    assert {r["data_source"] for r in read(tmp_path / "test.parquet")} == {CARRY.data_source}
    with pytest.raises(SystemExit):
        data.main(["--out", str(tmp_path), "--task", "mul", "--skip-models"])
    assert "invalid choice" in capsys.readouterr().err
