"""Per-request response caps (`extra_info.max_response_tokens`): which cap each response of a row gets, the one-line
errors for bad values, and the start-up check of the datasets through `prepare_config` (before any model loads).
The caps reaching the server through the real agent loop are tested in test_rollout_on_cpu.py."""

import numpy as np
import pandas as pd
import pytest

from recipe.optimal_sampling.main import prepare_config
from recipe.optimal_sampling.verl.response_caps import CAP_FIELD, check_dataset_caps, check_row, response_cap
from tests.verl.fixtures import compose_config, tiny_overrides


def test_an_int_caps_every_response_and_a_list_one_each():
    assert response_cap({CAP_FIELD: 5}, session_id=3, max_response_length=8) == 5
    assert [response_cap({CAP_FIELD: [1, 8, 3]}, k, 8) for k in range(3)] == [1, 8, 3]
    assert response_cap({CAP_FIELD: np.array([4, 2])}, 1, 8) == 2  # as a parquet reader gives it
    assert response_cap({CAP_FIELD: np.int64(7)}, None, 8) == 7
    for no_cap in (None, {}, {"index": 3}, {CAP_FIELD: None}):
        assert response_cap(no_cap, 0, 8) is None


@pytest.mark.parametrize(
    ("value", "session_id", "match"),
    [
        (9, 0, r"extra_info.max_response_tokens=9: a response cap must be an int in \[1, data.max_response_length=8\]"),
        (0, 0, r"max_response_tokens=0: .* fix the dataset or raise data.max_response_length"),
        (2.5, 0, r"max_response_tokens=2.5: a response cap must be an int"),
        (True, 0, r"max_response_tokens=True"),
        ("4", 0, r"max_response_tokens='4'"),
        ([3, 4], 2, r"has 2 caps but this is response 2 of its group: give at least rollout.n"),
        ([3, 4], None, r"is a list \(one cap per response\) but the agent loop got no `session_id`"),
        ([3, 40], 1, r"max_response_tokens=40"),
    ],
)
def test_bad_caps_are_one_line_errors_naming_field_value_and_fix(value, session_id, match):
    with pytest.raises(ValueError, match=match) as error:
        response_cap({CAP_FIELD: value}, session_id, 8)
    assert "\n" not in str(error.value)


def test_a_row_needs_a_cap_per_response_of_its_group():
    check_row({CAP_FIELD: [1, 2, 3, 4]}, n=4, max_response_length=8)
    with pytest.raises(ValueError, match="has 3 caps but each prompt gets 4 responses"):
        check_row({CAP_FIELD: [1, 2, 3]}, n=4, max_response_length=8)


def write_rows(path, caps: list) -> str:
    rows = [{"prompt": [{"role": "user", "content": "1+1"}], "extra_info": {"index": i, CAP_FIELD: c}} for i, c in
            enumerate(caps)]  # fmt: skip
    pd.DataFrame(rows).to_parquet(path)
    return str(path)


def test_dataset_check_reads_every_row_of_local_parquet_files(tmp_path):
    good = write_rows(tmp_path / "good.parquet", [[1, 2, 3, 4], [8, 8, 8, 8]])
    bad = write_rows(tmp_path / "bad.parquet", [[1, 2, 3, 4], [8, 9, 8, 8]])
    check_dataset_caps([good, str(tmp_path / "missing.parquet"), "hdfs://elsewhere/x.parquet"], 4, 8)
    with pytest.raises(ValueError, match=r"bad.parquet row 1: extra_info.max_response_tokens=9"):
        check_dataset_caps(bad, 4, 8)


def test_a_dataset_whose_extra_info_has_no_cap_field_is_not_read_row_by_row(tmp_path, monkeypatch):
    """A struct extra_info without the field cannot hold a cap: the check reads the schema only (fast start-up on
    large datasets); with the field, every row is read."""
    import pandas as pd
    import pyarrow.parquet as pq

    from recipe.optimal_sampling.verl import response_caps

    plain = tmp_path / "plain.parquet"
    pd.DataFrame([{"extra_info": {"index": i}} for i in range(3)]).to_parquet(plain)
    capped = write_rows(tmp_path / "capped.parquet", [[9, 1, 1, 1]])
    reads = []
    real = pq.read_table
    monkeypatch.setattr(pq, "read_table", lambda path, **kw: reads.append(str(path)) or real(path, **kw))
    response_caps.check_dataset_caps([str(plain)], 4, 8)
    with pytest.raises(ValueError, match="capped.parquet row 0"):
        response_caps.check_dataset_caps([capped], 4, 8)
    assert reads == [capped]


def test_prepare_config_refuses_a_dataset_with_a_bad_cap_before_loading_models(checkpoints, tmp_path):
    train = write_rows(tmp_path / "train.parquet", [[2, 3, 4, 5], [2, 3, 4, 100]])
    val = write_rows(tmp_path / "val.parquet", [5])  # validation: val_kwargs.n = 1 response per prompt
    overrides = [*tiny_overrides(checkpoints), f"data.val_files={val}", "data.max_response_length=8"]
    prepare_config(compose_config([*overrides, f"data.train_files={write_rows(tmp_path / 'ok.parquet', [[1] * 4])}"]))
    with pytest.raises(ValueError, match=r"train.parquet row 1: extra_info.max_response_tokens=100: .*=8\]"):
        prepare_config(compose_config([*overrides, f"data.train_files={train}"]))
