"""Files of `optimal-sampling generate`: the prompts JSONL it reads, the traces JSONL it writes, resuming an
interrupted output and the `OUTPUT.meta.json` sidecar that pins the settings an output was written with.

Owns the file formats and their checks. Knows nothing about models, tokenizers or sampling: a trace is a
JSON-ready dict (`DualSample.row(i)`). Every user error is a `CliError` whose one-line message names the file,
the line (1-based) and the fix.

Input: one JSON object per line with a non-empty string `prompt` and an optional `id` (any JSON value); other
fields travel to the output under `meta`. Blank lines are errors (they would make `index` differ from the line
number), except blank lines at the very end of the file.
Output: one object per input row, in input order: `index` (0-based line index), `id`, `prompt`, the trace
fields, `meta`. Rows are appended a whole batch at a time, each batch flushed and fsynced. Standard JSON only: a
NaN or infinite value is refused (`output_line`), never written as a `NaN`/`Infinity` literal.
One writer per output: `output_lock` holds `OUTPUT.lock` (flock) for the whole run and refuses a second one.
Resume identity: the sidecar pins the settings and a fingerprint of each checkpoint's files (`checkpoint_files`),
so a checkpoint replaced at the same path is refused, not mixed into a resumed output.
"""

import contextlib
import fcntl
import hashlib
import json
import os
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import BinaryIO

META_FORMAT = 2  # bump when the meaning of an output row or of the sidecar changes (2: checkpoint fingerprints)
# Files of a checkpoint directory that decide its outputs: config, weights, tokenizer, chat template, remote code.
CHECKPOINT_SUFFIXES = (".json", ".safetensors", ".bin", ".pt", ".model", ".txt", ".jinja", ".tiktoken", ".py")
FULL_HASH_BYTES = 64 << 20  # files up to this size are hashed whole; larger ones by size + SAMPLED_CHUNKS chunks
SAMPLED_CHUNKS, CHUNK_BYTES = 64, 64 << 10
_MISSING = object()
_JSON_TYPES = {dict: "object", list: "array", str: "string", int: "number", float: "number", bool: "boolean"}


class CliError(Exception):
    """A user error: `cli.main` prints it as one line and exits with status 2."""


@dataclass(frozen=True)
class InputRow:
    index: int  # 0-based line index in the input file
    id: object  # the row's "id" (any JSON value); None when absent
    prompt: str
    meta: dict  # every other field of the input object, carried to the output unchanged


@dataclass(frozen=True)
class Resume:
    """What an existing output holds: `done` rows to keep (in whole batches), in its first `keep_bytes` bytes."""

    done: int
    keep_bytes: int
    found: int  # complete rows found; found - done rows of a cut batch are redone
    partial: bool  # a partial last line (a write cut by the interruption) was found


def read_prompts(path: str) -> list[InputRow]:
    """The rows of the input JSONL file, checked (see the module docstring)."""
    if not os.path.isfile(path):
        raise CliError(f"input file {path} {'is not a file' if os.path.exists(path) else 'does not exist'}")
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().split("\n")  # not splitlines(): JSON strings may hold raw U+2028 and friends
    except UnicodeDecodeError as e:
        raise CliError(f"input file {path} is not UTF-8 text ({e.reason} at byte {e.start})") from None
    while lines and not lines[-1].strip():
        lines.pop()
    if not lines:
        raise CliError(f'input file {path} has no rows: write one JSON object per line, e.g. {{"prompt": "2+2="}}')
    return [_parse_input_line(path, i, line) for i, line in enumerate(lines)]


def _parse_input_line(path: str, i: int, line: str) -> InputRow:
    where = f"{path} line {i + 1}"
    if not line.strip():
        raise CliError(f"{where} is blank: remove blank lines (row `index` is the line number - 1)")
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        raise CliError(f"{where} is not valid JSON: {e.msg} at column {e.colno}") from None
    if not isinstance(obj, dict):
        raise CliError(
            f'{where} is a JSON {_JSON_TYPES.get(type(obj), "null")}, not an object like {{"prompt": "..."}}'
        )
    if "prompt" not in obj:
        raise CliError(f'{where} has no "prompt" field (fields: {", ".join(obj) or "none"})')
    prompt = obj["prompt"]
    if not isinstance(prompt, str) or not prompt.strip():
        raise CliError(f'{where}: "prompt" must be a non-empty string, got {_short(prompt)}')
    meta = {k: v for k, v in obj.items() if k not in ("id", "prompt")}
    return InputRow(index=i, id=obj.get("id"), prompt=prompt, meta=meta)


def batch_seed(seed: int, start: int) -> int:
    """The sampling seed of the batch whose first row is `start`: a hash of (seed, start), so a batch draws the
    same tokens whether an uninterrupted or a resumed run reaches it. 63 bits, as torch.Generator accepts."""
    digest = hashlib.sha256(f"optimal-sampling:{seed}:{start}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def output_line(row: InputRow, trace: dict) -> bytes:
    """One output row: index, id, prompt, the trace fields (`DualSample.row`), meta; UTF-8, newline-terminated."""
    assert not {"index", "id", "prompt", "meta"} & trace.keys(), f"{sorted(trace)=}"
    record = {"index": row.index, "id": row.id, "prompt": row.prompt, **trace, "meta": row.meta}
    try:
        text = json.dumps(record, ensure_ascii=False, allow_nan=False)
    except ValueError:  # NaN/inf: the engine's guard should have refused the logits; never write non-standard JSON
        bad = sorted(k for k, v in trace.items() if not _finite_json(v))
        raise CliError(
            f"the trace of input line {row.index + 1} holds NaN or infinite values in {bad}: nothing of its batch "
            "was written; rerun with --dtype float32 (or bfloat16) and check the checkpoints"
        ) from None
    return (text + "\n").encode("utf-8")


def _finite_json(value) -> bool:
    if isinstance(value, float):
        return value == value and abs(value) != float("inf")
    if isinstance(value, list | tuple):
        return all(_finite_json(v) for v in value)
    return True


def meta_path(output: str) -> str:
    return f"{output}.meta.json"


def plan_resume(output: str, rows: list[InputRow], batch_size: int, meta: dict) -> Resume:
    """What of an existing `output` a run keeps, checked against the input and the settings; reads only.
    1) no file or an empty one: start from row 0;
    2) a non-empty file needs a sidecar equal to `meta` (else the settings differ: refuse);
    3) a partial last line (a write cut by a kill) is dropped; every complete line must be the input's row at
       that position (index, id, prompt), else the file belongs to another input: refuse;
    4) rows are kept in whole batches: the written rows of a cut batch are redone with that batch's seed, so the
       final file is byte-identical to an uninterrupted run's."""
    data = _read_existing(output)
    if not data:
        return Resume(done=0, keep_bytes=0, found=0, partial=False)
    _check_meta(output, meta)
    end = data.rfind(b"\n") + 1  # bytes in complete lines
    lines = data[:end].split(b"\n")[:-1]
    if len(lines) > len(rows):
        raise CliError(
            f"{output} has {len(lines)} rows but the input only {len(rows)}: {_ANOTHER_INPUT.format(output)}"
        )
    offsets = [0]
    for n, raw in enumerate(lines):
        _check_output_line(output, n, raw, rows[n])
        offsets.append(offsets[-1] + len(raw) + 1)
    done = len(lines) if len(lines) == len(rows) else len(lines) // batch_size * batch_size
    return Resume(done=done, keep_bytes=offsets[done], found=len(lines), partial=end < len(data))


_ANOTHER_INPUT = "it holds the output of another input; choose another --output, or delete {0} to start over"


def _read_existing(output: str) -> bytes:
    if os.path.isdir(output):
        raise CliError(f"--output {output} is a directory: give a file path such as {output.rstrip('/')}/out.jsonl")
    if not os.path.exists(output):
        return b""
    with open(output, "rb") as f:
        return f.read()


def _check_output_line(output: str, n: int, raw: bytes, row: InputRow) -> None:
    try:
        obj = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise CliError(f"{output} line {n + 1} is not valid JSON: {_ANOTHER_INPUT.format(output)}") from None
    expected = {"index": row.index, "id": row.id, "prompt": row.prompt}
    if not isinstance(obj, dict) or {k: obj.get(k) for k in expected} != expected:
        raise CliError(
            f"{output} line {n + 1} does not match input line {n + 1} (index, id or prompt differ): "
            + _ANOTHER_INPUT.format(output)
        )


def _check_meta(output: str, meta: dict) -> None:
    path = meta_path(output)
    if not os.path.isfile(path):
        raise CliError(
            f"{output} exists but {path} does not, so its settings are unknown: choose another --output, "
            f"or delete {output} to start over"
        )
    try:
        with open(path, encoding="utf-8") as f:
            old = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise CliError(f"{path} is not valid JSON: delete {output} and {path} to start over") from None
    diffs = meta_diff(old, _sidecar(meta))
    if diffs:
        raise CliError(
            f"{output} was written with other settings ({'; '.join(diffs)}; see {path}): rerun with the same "
            f"settings to resume, choose another --output, or delete {output} to start over"
        )


def meta_diff(old: dict, new: dict) -> list[str]:
    """`key: old -> new` for every differing key of two sidecars, nested keys dotted (`sampler.temperature`)."""
    flat_old, flat_new = _flatten(old), _flatten(new)
    show = lambda flat, key: _short(flat[key]) if key in flat else "(absent)"  # noqa: E731
    return [
        f"{key}: {show(flat_old, key)} -> {show(flat_new, key)}"
        for key in sorted(flat_old.keys() | flat_new.keys())
        if flat_old.get(key, _MISSING) != flat_new.get(key, _MISSING)
    ]


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in d.items():
        if isinstance(value, dict):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def write_meta(output: str, meta: dict) -> None:
    """Write the sidecar atomically (a temporary file, then a rename)."""
    path = meta_path(output)
    _make_parent(output)
    with open(f"{path}.tmp", "w", encoding="utf-8") as f:
        json.dump(_sidecar(meta), f, indent=2, sort_keys=True)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(f"{path}.tmp", path)


def open_output(output: str, keep_bytes: int) -> BinaryIO:
    """Open `output` for appending after cutting it to `keep_bytes` (drops a partial line or a cut batch)."""
    f = open(output, "ab")
    f.truncate(keep_bytes)
    os.fsync(f.fileno())
    return f


def append_rows(f: BinaryIO, lines: list[bytes]) -> None:
    """Append one batch of rows durably: one write, then flush and fsync."""
    f.write(b"".join(lines))
    f.flush()
    os.fsync(f.fileno())


@contextlib.contextmanager
def output_lock(output: str) -> Iterator[None]:
    """Hold `OUTPUT.lock` (an exclusive flock) while the body runs; a second writer of the same output is refused
    at once with the holder's pid, host and start time. Creating the lock also proves that the output's
    directory is writable, before any model is loaded. The lock file is removed on exit."""
    path = f"{output}.lock"
    _make_parent(output)
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise CliError(
                f"--output {output}: cannot create {path} ({e.strerror}): choose a writable location"
            ) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 200).decode("utf-8", "replace").strip() or "another process"
            os.close(fd)
            raise CliError(
                f"{output} is being written by another run ({holder}; lock {path}): wait for it to finish, "
                "or choose another --output"
            ) from None
        if _same_file(fd, path):
            break
        os.close(fd)  # the previous holder removed the file between our open and our lock: take the new one
    holder = f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}"
    os.ftruncate(fd, 0)
    os.write(fd, holder.encode())
    try:
        yield
    finally:
        os.unlink(path)
        os.close(fd)


def _same_file(fd: int, path: str) -> bool:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return False
    return (st.st_dev, st.st_ino) == (os.fstat(fd).st_dev, os.fstat(fd).st_ino)


def _make_parent(output: str) -> None:
    parent = os.path.dirname(os.path.abspath(output))
    try:
        os.makedirs(parent, exist_ok=True)
    except OSError as e:
        raise CliError(f"--output {output}: cannot create its directory {parent} ({e.strerror}): choose a writable "
                       "location") from None  # fmt: skip


def check_writable(output: str) -> None:
    """Raise a CliError unless `output` and its sidecar can be written (call under `output_lock`, which has
    already created the directory and a file in it)."""
    for path in (output, meta_path(output)):
        if os.path.isdir(path):
            raise CliError(f"--output {output}: {path} is a directory: give a file path, or remove it")
        if os.path.exists(path) and not os.access(path, os.W_OK):
            raise CliError(f"--output {output}: {path} is not writable: fix its permissions or choose another --output")


def checkpoint_files(path: str) -> dict[str, str]:
    """{file name: digest} of the files in checkpoint directory `path` that decide its outputs (CHECKPOINT_SUFFIXES,
    top level): a fingerprint for the resume identity. Files up to FULL_HASH_BYTES are hashed whole; larger
    ones (weights) by size and SAMPLED_CHUNKS evenly spaced chunks, so a retrained or replaced checkpoint is
    detected in about a second even for tens of GB, while a copy of the same files resumes."""
    names = sorted(n for n in os.listdir(path) if n.endswith(CHECKPOINT_SUFFIXES) and not n.startswith("."))
    return {name: _file_digest(os.path.join(path, name)) for name in names if os.path.isfile(os.path.join(path, name))}


def _file_digest(path: str) -> str:
    size = os.path.getsize(path)
    h = hashlib.blake2b(str(size).encode(), digest_size=10)
    with open(path, "rb") as f:
        if size <= FULL_HASH_BYTES:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
            return h.hexdigest()
        for k in range(SAMPLED_CHUNKS):
            f.seek((size - CHUNK_BYTES) * k // (SAMPLED_CHUNKS - 1))
            h.update(f.read(CHUNK_BYTES))
    return h.hexdigest()


def _sidecar(meta: dict) -> dict:
    """The sidecar's content as JSON reads it back (tuples become lists)."""
    return json.loads(json.dumps({"format": META_FORMAT, **meta}))


def _short(value, limit: int = 60) -> str:
    text = json.dumps(value, ensure_ascii=False)
    return text if len(text) <= limit else text[: limit - 3] + "..."
