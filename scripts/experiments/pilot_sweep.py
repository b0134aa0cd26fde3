"""A sweep of CPU-pilot runs (`pilot_cpu.py`) side by side: every (arm spec, learning rate, seed), one process each,
`--jobs` at a time, resumable, then a table of held-out accuracy per spec and learning rate (mean ± std over seeds).

An arm spec is `label=arm` or `label=arm:key=value,key=value` with `guided_loss` keys (`pilot_cpu.py` flags), e.g.
`imitation=balanced:mode=imitation` or `mixed_pb=mixed_1of8:baseline=policy,mode=positive_only`. Each run writes
`OUT/runs/<label>/lr<lr>_seed<k>.jsonl` when it has finished (a temporary file until then), so a rerun skips what is
done; `OUT/summary.md` is rewritten at the end from every finished run. Example (the guided testbed on a GPU host):

    python scripts/experiments/pilot_sweep.py --task carry --device cuda --jobs 24 --seeds 0,1,2,3,4 \
        --lrs 1e-4,3e-4 --steps 200 --eval-every 25 --out outputs/pilot_carry \
        --arms on_policy=on_policy opd=opd control=balanced mixed=mixed_1of8 imitation=balanced:mode=imitation
"""

import argparse
import json
import statistics
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

PILOT = Path(__file__).with_name("pilot_cpu.py")


def parse_spec(spec: str) -> tuple[str, str, dict[str, str]]:
    """"label=arm:key=value,..." -> (label, arm, {key: value})."""
    label, _, rest = spec.partition("=")
    arm, _, flags = rest.partition(":")
    if not label or not arm:
        raise ValueError(f"--arms entry {spec!r}: write label=arm or label=arm:key=value,key=value")
    overrides = dict(item.split("=", 1) for item in flags.split(",") if item)
    return label, arm, overrides


def command(arm: str, overrides: dict, lr: str, seed: int, args, out: Path) -> list[str]:
    cmd = [sys.executable, str(PILOT), "--arms", arm, "--lrs", lr, "--seed", str(seed), "--steps", str(args.steps)]
    cmd += ["--eval-every", str(args.eval_every), "--n-test", str(args.n_test), "--task", args.task]
    cmd += ["--device", args.device, "--out", str(out)]
    for key, value in overrides.items():
        flag = "--" + key.replace("_", "-")
        cmd += [flag] if value == "true" else [flag, value]
    return cmd


def run_one(job) -> str:
    label, arm, overrides, lr, seed, args = job
    final = Path(args.out) / "runs" / label / f"lr{lr}_seed{seed}.jsonl"
    if final.exists():
        return f"{final} (done before)"
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_suffix(".tmp")
    tmp.unlink(missing_ok=True)
    log = final.with_suffix(".log")
    with log.open("w") as stream:
        code = subprocess.call(command(arm, overrides, lr, seed, args, tmp), stdout=stream, stderr=subprocess.STDOUT)
    if code != 0:
        return f"{final}: FAILED (exit {code}, see {log})"
    rows = [json.loads(line) for line in tmp.read_text().splitlines()]
    for row in rows:
        row["label"] = label
    tmp.write_text("".join(json.dumps(row) + "\n" for row in rows))
    tmp.rename(final)
    return f"{final}: {rows[-1].get('val_acc')}"


def finished_rows(out: Path, partial: bool = False) -> list[dict]:
    """Every row of the finished runs under `out` (with `partial`, of the unfinished ones too), labelled."""
    rows = []
    for path in sorted(out.glob("runs/*/*.jsonl")) + sorted(out.glob("runs/*/*.tmp")) * partial:
        for row in map(json.loads, path.read_text().splitlines()):
            rows.append({"label": path.parent.name, **row})
    return rows


def summarize(rows: list[dict]) -> str:
    """Markdown: per (label, lr), held-out accuracy at every evaluated step, mean ± std over seeds, and the seeds."""
    curves: dict[tuple[str, float], dict[int, list[float]]] = {}
    for row in rows:
        if "val_acc" in row:
            curves.setdefault((row["label"], row["lr"]), {}).setdefault(row["step"], []).append(row["val_acc"])
    steps = sorted({s for curve in curves.values() for s in curve})
    lines = ["| spec | lr | seeds | " + " | ".join(f"step {s}" for s in steps) + " |", "|---" * (3 + len(steps)) + "|"]
    for (label, lr), curve in sorted(curves.items()):
        cells = []
        for s in steps:
            values = curve.get(s, [])
            std = statistics.stdev(values) if len(values) > 1 else 0.0
            cells.append(f"{statistics.mean(values):.3f} ± {std:.3f}" if values else "")
        n = max(len(v) for v in curve.values())
        lines.append(f"| {label} | {lr:g} | {n} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arms", nargs="+", required=True, help="label=arm[:key=value,...] (see the module doc)")
    parser.add_argument("--lrs", default="1e-4,3e-4")
    parser.add_argument("--seeds", default="0,1,2,3,4")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--eval-every", type=int, default=25)
    parser.add_argument("--n-test", type=int, default=256)
    parser.add_argument("--task", default="carry")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    specs = [parse_spec(s) for s in args.arms]
    if len({label for label, _, _ in specs}) != len(specs):
        raise ValueError(f"--arms labels must be distinct, got {[label for label, _, _ in specs]}")
    jobs = [(label, arm, o, lr, int(seed), args) for seed in args.seeds.split(",") for label, arm, o in specs
            for lr in args.lrs.split(",")]  # fmt: skip  (seed-major: every spec gets its first seeds first)
    with ThreadPoolExecutor(args.jobs) as pool:
        for message in pool.map(run_one, jobs):
            print(message, flush=True)
    table = summarize(finished_rows(Path(args.out)))
    (Path(args.out) / "summary.md").write_text(table)
    print(table)


if __name__ == "__main__":
    main()
