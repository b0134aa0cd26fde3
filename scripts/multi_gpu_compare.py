"""The report of scripts/multi_gpu_gpu.sh: a GRPO run on N GPUs against the same run and seed on one GPU, as Markdown
on stdout; exit status 1 when a check fails.

    python3 scripts/multi_gpu_compare.py --multi WORK_DIR/multi --single WORK_DIR/single --gpus 8 --total-steps 5

Each run folder holds `metrics.jsonl` (verl's `file` logger: one `{"step": k, "data": {...}}` line per step) and
`gpu_mem.csv` (`nvidia-smi --query-gpu=timestamp,index,memory.used,memory.total,utilization.gpu
--format=csv,noheader,nounits` samples). Checks, per step of the N-GPU run (the trainer's per-replica metrics,
`OptimalSamplingTrainer._optimal_sampling_metrics`):
- spread: every replica r < N served responses (`optimal_sampling/replica<r>/responses` >= 1);
- synced: no replica missed a weight sync (`optimal_sampling/replica_weight_lag_max` == 0);
- gap: every replica sampled with the trainer's weights (`optimal_sampling/replica<r>/logp_policy_server_vs_trainer`
  <= --gap-tol);
- steps: both runs logged --total-steps training steps;
- noise: each compared training metric agrees with the one-GPU run within noise: the mean over steps of the paired
  per-step difference is within --z standard errors of 0 (the runs share data order and seed but not the draws: the
  requests reach other replicas, whose sampling seeds differ).
Also reported: per-GPU peak memory, and the step time split (verl's `timing_s/*`, the servers' phases
`optimal_sampling/server/*_s` and memory `*_gib`, means over the steps after the first, which includes warm-up).
Standard library only; knows nothing about verl beyond the metric names.
"""

import argparse
import csv
import math
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "experiments"))
from run_status import read_rows  # noqa: E402  (verl's file logger: one reader for every report)

PREFIX = "optimal_sampling/"
COMPARED = (  # training metrics compared with the one-GPU run (those both runs have)
    "critic/score/mean",
    "response_length/mean",
    "optimal_sampling/alpha_mean",
    "optimal_sampling/forced_frac",
    "optimal_sampling/kl_q_policy",
    "optimal_sampling/kl_q_teacher",
    "optimal_sampling/is_weight_mean",
    "rollout_corr/rollout_is_mean",
    "rollout_corr/kl",
    "actor/entropy",
    "actor/pg_loss",
    "actor/grad_norm",
)


def is_split(key: str) -> bool:
    """verl's step timers (s), and the servers' phase times (s) and memory (GiB; the largest over servers)."""
    server = key.startswith(PREFIX + "server/") and key.endswith(("_s", "_gib"))
    return key.startswith("timing_s/") or server


def read_steps(path: str) -> dict[int, dict]:
    """Training steps (>= 1) of a metrics file: {step: data}; a truncated last line (a killed run) is left out."""
    steps = {}
    for row in read_rows(path) if os.path.exists(path) else []:
        if int(row["step"]) >= 1:
            steps.setdefault(int(row["step"]), {}).update(row["data"])
    return steps


def peak_memory(path: str) -> dict[int, tuple[float, float]]:
    """{GPU index: (peak memory.used MiB, memory.total MiB)} from nvidia-smi samples."""
    peaks: dict[int, tuple[float, float]] = {}
    if not os.path.exists(path):
        return peaks
    with open(path) as f:
        for row in csv.reader(f):
            try:
                index, used, total = int(row[1]), float(row[2]), float(row[3])
            except (IndexError, ValueError):
                continue  # a partial line at the sampler's end
            peaks[index] = (max(used, peaks.get(index, (0.0, total))[0]), total)
    return peaks


def paired(multi: dict[int, dict], single: dict[int, dict], key: str) -> tuple[list[float], list[float]]:
    """The metric's values in both runs at the steps both logged it."""
    common = [s for s in sorted(multi.keys() & single.keys()) if key in multi[s] and key in single[s]]
    return [multi[s][key] for s in common], [single[s][key] for s in common]


def within_noise(diffs: list[float], z: float) -> tuple[float, float, bool]:
    """(mean paired difference, its standard error, |mean| <= z * se). One step cannot say: nan, not within."""
    n = len(diffs)
    mean = sum(diffs) / n
    if n < 2:
        return mean, math.nan, False
    se = math.sqrt(sum((d - mean) ** 2 for d in diffs) / (n - 1) / n)
    return mean, se, abs(mean) <= z * se if se > 0 else mean == 0


def evidence(multi: dict[int, dict], gpus: int, gap_tol: float) -> tuple[list[str], dict[str, bool]]:
    """Table rows of the N-GPU run's per-replica metrics, and the checks spread / synced / gap."""
    rows, checks = [], {"spread": bool(multi), "synced": bool(multi), "gap": bool(multi)}
    for step in sorted(multi):
        data = multi[step]
        counts = [data.get(f"{PREFIX}replica{r}/responses", 0.0) for r in range(gpus)]
        gaps = [data.get(f"{PREFIX}replica{r}/logp_policy_server_vs_trainer", math.nan) for r in range(gpus)]
        lag = data.get(PREFIX + "replica_weight_lag_max", math.nan)
        checks["spread"] &= min(counts) >= 1
        checks["synced"] &= lag == 0
        checks["gap"] &= all(g <= gap_tol for g in gaps)  # NaN (no responses, no metric) fails
        worst = max(gaps, key=lambda g: math.inf if math.isnan(g) else g)  # a missing gap shows as nan
        rows.append(f"| {step} | {', '.join(f'{c:g}' for c in counts)} | {lag:g} | {worst:.3g} |")
    return rows, checks


def report(multi_dir: str, single_dir: str, gpus: int, total_steps: int, gap_tol: float, z: float) -> tuple[str, bool]:
    multi = read_steps(os.path.join(multi_dir, "metrics.jsonl"))
    single = read_steps(os.path.join(single_dir, "metrics.jsonl"))
    checks: dict[str, bool] = {}
    out = [f"# {gpus} GPUs against 1 GPU, same seed", ""]
    # 1) per-replica evidence of the N-GPU run
    rows, found = evidence(multi, gpus, gap_tol)
    checks.update(found)
    checks["steps"] = len(multi) >= total_steps and len(single) >= total_steps
    out += ["## Replicas (N-GPU run)", "", "| step | responses per replica | weight lag max | max log-prob gap |"]
    out += ["|---|---|---|---|", *rows, ""]
    # 2) per-GPU memory
    out += ["## Per-GPU peak memory (MiB, nvidia-smi)", "", "| GPU | N-GPU run | 1-GPU run | total |"]
    out += ["|---|---|---|---|"]
    mem_multi, mem_single = (peak_memory(os.path.join(d, "gpu_mem.csv")) for d in (multi_dir, single_dir))
    for index in sorted(mem_multi.keys() | mem_single.keys()):
        total = (mem_multi.get(index) or mem_single.get(index))[1]
        used = [f"{m[index][0]:.0f}" if index in m else "" for m in (mem_multi, mem_single)]
        out.append(f"| {index} | {used[0]} | {used[1]} | {total:.0f} |")
    # 3) step time split (verl's timers, the servers' phases) and the servers' memory per phase
    out += ["", "## Step time split and server memory (mean over steps >= 2)", "", "| metric | N-GPU run | 1-GPU run |"]
    out += ["|---|---|---|"]
    for key in sorted({k for d in (*multi.values(), *single.values()) for k in d if is_split(k)}):
        means = []
        for steps in (multi, single):
            values = [d[key] for s, d in steps.items() if key in d and (s >= 2 or len(steps) == 1)]
            means.append(f"{sum(values) / len(values):.3g}" if values else "")
        out.append(f"| `{key}` | {means[0]} | {means[1]} |")
    # 4) training metrics against the one-GPU run
    out += ["", f"## Metrics against the 1-GPU run (paired per step; within noise: |mean diff| <= {z:g} se)", ""]
    out += ["| metric | N-GPU mean | 1-GPU mean | mean diff | se | within noise |", "|---|---|---|---|---|---|"]
    for key in COMPARED:
        a, b = paired(multi, single, key)
        if not a:
            continue
        mean, se, ok = within_noise([x - y for x, y in zip(a, b, strict=True)], z)
        checks[f"noise {key}"] = ok
        row = f"| `{key}` | {sum(a) / len(a):.4g} | {sum(b) / len(b):.4g} | {mean:.3g} | {se:.3g} |"
        out.append(f"{row} {'yes' if ok else 'NO'} |")
    # 5) verdict
    out += ["", "## Checks", ""] + [f"- {'PASS' if ok else 'FAIL'} {name}" for name, ok in checks.items()]
    return "\n".join(out) + "\n", all(checks.values())


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--multi", required=True, help="the N-GPU run's folder (metrics.jsonl, gpu_mem.csv)")
    parser.add_argument("--single", required=True, help="the 1-GPU run's folder")
    parser.add_argument("--gpus", type=int, required=True, help="N: GPUs (= rollout replicas) of the N-GPU run")
    parser.add_argument("--total-steps", type=int, default=5, help="training steps each run should have logged")
    parser.add_argument("--gap-tol", type=float, default=0.01, help="largest per-replica log-prob gap that passes")
    parser.add_argument("--z", type=float, default=3.0, help="standard errors a paired difference may reach")
    args = parser.parse_args(argv)
    text, ok = report(args.multi, args.single, args.gpus, args.total_steps, args.gap_tol, args.z)
    sys.stdout.write(text)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
