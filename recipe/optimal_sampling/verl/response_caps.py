"""Per-request response caps from the dataset: a row's `extra_info.max_response_tokens` caps the length of its
responses below `data.max_response_length` (a dataset with long-tailed lengths, e.g. for real-shape runs with random
weights, which never stop on their own).

The value is an int (every response of the row) or a list with one int per response of the row's group (response k =
verl's `session_id` k gets the k-th); each in [1, data.max_response_length]. `DualAgentLoop` sends it as that
request's `max_tokens`; `check_dataset_caps` refuses a bad value at start-up, before any model loads. Rows without the
field (or with null) keep data.max_response_length. Knows nothing about models or Ray; imports neither verl nor Hydra.
"""

import os
from collections.abc import Mapping
from numbers import Integral

CAP_FIELD = "max_response_tokens"  # the key in a dataset row's extra_info


def response_cap(extra_info: Mapping | None, session_id: int | None, max_response_length: int) -> int | None:
    """The cap of response `session_id` of a row whose extra_info is `extra_info`, or None when the row sets none.
    Raises ValueError naming the field, the value and the fix."""
    value = _value(extra_info)
    if value is None:
        return None
    if isinstance(value, list | tuple):
        if session_id is None:
            raise ValueError(
                f"extra_info.{CAP_FIELD} is a list (one cap per response) but the agent loop got no `session_id` (the "
                "response's index in its group, which verl's v1 trainer passes): use one int for the whole row"
            )
        if not 0 <= int(session_id) < len(value):
            raise ValueError(
                f"extra_info.{CAP_FIELD} has {len(value)} caps but this is response {session_id} of its group: give "
                "at least rollout.n (and rollout.val_kwargs.n) caps per row, or one int for the whole row"
            )
        value = value[int(session_id)]
    return _checked(value, max_response_length)


def _checked(value, max_response_length: int) -> int:
    if isinstance(value, bool) or not isinstance(value, Integral) or not 1 <= value <= max_response_length:
        raise ValueError(
            f"extra_info.{CAP_FIELD}={value!r}: a response cap must be an int in [1, data.max_response_length="
            f"{max_response_length}]; fix the dataset or raise data.max_response_length"
        )
    return int(value)


def _value(extra_info: Mapping | None):
    """The field's value as plain Python (numpy arrays and scalars, as parquet readers give them, become lists and
    ints)."""
    value = (extra_info or {}).get(CAP_FIELD)
    return value.tolist() if hasattr(value, "tolist") else value


def check_row(extra_info: Mapping | None, n: int, max_response_length: int) -> None:
    """Every cap of one row (a list needs at least n caps, one per response of the group)."""
    value = _value(extra_info)
    if value is None:
        return
    if not isinstance(value, list | tuple):
        _checked(value, max_response_length)
        return
    if len(value) < n:
        raise ValueError(
            f"extra_info.{CAP_FIELD} has {len(value)} caps but each prompt gets {n} responses: give at least {n} "
            "caps per row (one per response) or one int for the whole row"
        )
    for v in value:
        _checked(v, max_response_length)


def check_dataset_caps(files, n: int, max_response_length: int) -> None:
    """Read the extra_info column of each local parquet file in `files` (a path or a list of paths; others, and files
    that do not exist, are left to verl's loader) and check every row's caps (`check_row`). Raises ValueError naming
    the file and the row."""
    import pyarrow.parquet as pq

    for path in [files] if isinstance(files, str) else list(files or []):
        if not (str(path).endswith(".parquet") and os.path.isfile(path)):
            continue
        schema = pq.read_schema(path)
        if "extra_info" not in schema.names or not _may_hold_caps(schema.field("extra_info").type):
            continue  # no row can set a cap: the rows are not read (start-up stays fast on large datasets)
        for i, extra_info in enumerate(pq.read_table(path, columns=["extra_info"]).column(0).to_pylist()):
            try:
                check_row(extra_info, n, max_response_length)
            except ValueError as e:
                raise ValueError(f"{path} row {i}: {e}") from None


def _may_hold_caps(extra_info_type) -> bool:
    """False when the parquet type of extra_info shows that no row has the field (a struct without it); other types
    (maps, strings) are read."""
    import pyarrow as pa

    return not pa.types.is_struct(extra_info_type) or extra_info_type.get_field_index(CAP_FIELD) >= 0
