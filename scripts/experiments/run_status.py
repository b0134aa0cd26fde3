"""Status of the experiment's runs, read from their metrics files (verl's `file` logger: one JSON line per step,
`{"step": k, "data": {...}}`; step 0 holds the validation before training), plain (`metrics.jsonl`, as the runs write
them) or compact (`metrics.jsonl.gz`, as compact_metrics.py commits them).

    python3 scripts/experiments/run_status.py complete RUN_DIR/metrics.jsonl --total-steps 30   # exit 0 = complete
    python3 scripts/experiments/run_status.py summary EXP_DIR --total-steps 30                  # one line per run
    python3 scripts/experiments/run_status.py merge RUN_DIR          # metrics.jsonl from RUN_DIR/attempts/*.jsonl
    python3 scripts/experiments/run_status.py rewind RUN_DIR         # resume only from a step whose metrics exist

A run is complete when its file has a line for a step >= `total_steps` that carries the held-out policy-only accuracy
(the last step always validates; a longer run counts for a shorter plan). Standard library only: the launcher calls
it before anything is installed.
"""

import argparse
import glob
import gzip
import json
import os
import sys

VAL_KEY = "optimal_sampling/val_policy_only_accuracy"
METRICS = "metrics.jsonl"  # a run's plain metrics file; METRICS + ".gz" is its compact form
COMPACT = METRICS + ".gz"


def read_rows(path: str) -> list[dict]:
    """The file's lines as {"step": int, "data": dict}, plain or gzip (by the `.gz` suffix); a truncated last line (a
    killed run) is left out."""
    rows = []
    with gzip.open(path, "rt") if path.endswith(".gz") else open(path) as f:
        try:
            for line in f:
                rows.append(json.loads(line))
        except (json.JSONDecodeError, EOFError):
            pass
    return rows


def existing_metrics(path: str) -> str | None:
    """RUN_DIR/metrics.jsonl itself when it exists (a live or uncompacted run), else its compact form, else None."""
    plain = path.removesuffix(".gz")
    return next((p for p in (plain, plain + ".gz") if os.path.exists(p)), None)


def metrics_files(exp_dir: str) -> list[str]:
    """Every EXP_DIR/<arm>/seed<k>/ run's metrics file, sorted, one per run (the plain one where both exist)."""
    run_dirs = {
        os.path.dirname(p) for name in (METRICS, COMPACT) for p in glob.glob(os.path.join(exp_dir, "*", "seed*", name))
    }
    return sorted(existing_metrics(os.path.join(d, METRICS)) for d in run_dirs)


def is_complete(path: str, total_steps: int) -> bool:
    """`path` names RUN_DIR/metrics.jsonl; its compact form counts as well."""
    found = existing_metrics(path)
    return found is not None and any(r["step"] >= total_steps and VAL_KEY in r["data"] for r in read_rows(found))


def summary_lines(exp_dir: str, total_steps: int) -> list[str]:
    lines = []
    for path in metrics_files(exp_dir):
        rows = read_rows(path)
        run = os.path.relpath(os.path.dirname(path), exp_dir)
        val = [(r["step"], r["data"][VAL_KEY]) for r in rows if VAL_KEY in r["data"]]
        last = f"val acc {val[-1][1]:.3f} at step {val[-1][0]}" if val else "no validation yet"
        state = "complete" if is_complete(path, total_steps) else "INCOMPLETE"
        step = max((r["step"] for r in rows), default=0)
        lines.append(f"{run:<28} {state:<10} steps {step:>3}/{total_steps}  {last}")
    return lines


def attempt_files(run_dir: str) -> list[str]:
    """RUN_DIR/attempts/<k>.jsonl in the order the attempts ran (k = 0, 1, ...)."""
    paths = glob.glob(os.path.join(run_dir, "attempts", "*.jsonl"))
    return sorted(paths, key=lambda p: int(os.path.basename(p).removesuffix(".jsonl")))


def merge_attempts(attempts: list[list[dict]]) -> list[dict]:
    """One run's rows from the metrics files of its attempts, in the order they ran. An attempt that resumed from the
    checkpoint of step c starts with its validation at step c (trainer.val_before_train): the earlier attempts' rows
    after c are dropped (that training was redone from the checkpoint), and the two rows of step c are merged (the
    training metrics of the earlier, the validation of the later)."""
    rows: dict[int, dict] = {}
    for attempt in attempts:
        if not attempt:
            continue
        start = min(r["step"] for r in attempt)
        rows = {step: row for step, row in rows.items() if step <= start}
        for r in attempt:
            if r["step"] in rows:
                rows[r["step"]] = {"step": r["step"], "data": {**rows[r["step"]]["data"], **r["data"]}}
            else:
                rows[r["step"]] = r
    return [rows[step] for step in sorted(rows)]


def merge(run_dir: str) -> int:
    """Writes RUN_DIR/metrics.jsonl from its attempts (atomically); returns the number of rows."""
    rows = merge_attempts([read_rows(p) for p in attempt_files(run_dir)])
    tmp = os.path.join(run_dir, METRICS + ".tmp")
    with open(tmp, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    os.replace(tmp, os.path.join(run_dir, METRICS))
    return len(rows)


TRAIN_KEY = "timing_s/step"  # in every training step's row (verl's timing), never in a validation-only row


def rewind(run_dir: str) -> int | None:
    """Makes RUN_DIR/ckpt resume from the latest checkpoint whose step's training metrics were logged, and returns
    that step (None: start from scratch). verl saves a step's checkpoint before it logs the step's metrics, so a run
    stopped in between leaves a checkpoint whose metrics are lost: resuming from it would leave a hole in the compute
    accounting. Such a checkpoint is deleted (the run keeps two: trainer.max_actor_ckpt_to_keep=2) and the step is
    trained again from the one before."""
    import shutil

    ckpt = os.path.join(run_dir, "ckpt")
    tracker = os.path.join(ckpt, "latest_checkpointed_iteration.txt")
    if not os.path.exists(tracker):
        return None
    path = existing_metrics(os.path.join(run_dir, METRICS))
    logged = {r["step"] for r in read_rows(path) if TRAIN_KEY in r["data"]} if path else set()
    steps = sorted(
        int(d.removeprefix("global_step_"))
        for d in os.listdir(ckpt)
        if d.startswith("global_step_") and os.path.isdir(os.path.join(ckpt, d, "actor"))
    )
    while steps and steps[-1] not in logged:
        shutil.rmtree(os.path.join(ckpt, f"global_step_{steps.pop()}"))
    if not steps:
        shutil.rmtree(ckpt)
        return None
    with open(tracker, "w") as f:
        f.write(str(steps[-1]))
    return steps[-1]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("command", choices=["complete", "summary", "merge", "rewind"])
    parser.add_argument("path", help="a metrics.jsonl (complete), the experiment folder (summary) or a run's (merge)")
    parser.add_argument("--total-steps", type=int, default=None, help="complete, summary: the planned steps")
    args = parser.parse_args(argv)
    if args.command == "merge":
        print(f"{args.path}: {merge(args.path)} rows")
        return 0
    if args.command == "rewind":
        step = rewind(args.path)
        print(f"{args.path}: " + ("from scratch" if step is None else f"resumes from step {step}"))
        return 0
    if args.total_steps is None:
        parser.error(f"{args.command} needs --total-steps")
    if args.command == "complete":
        return 0 if is_complete(args.path, args.total_steps) else 1
    lines = summary_lines(args.path, args.total_steps)
    print("\n".join(lines) if lines else f"no runs under {args.path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
