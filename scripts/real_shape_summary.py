"""Per-step time split and memory of a real-shape run (scripts/real_shape_gpu.sh), as Markdown, from verl's metrics
file (`file` logger: one JSON line `{"step": k, "data": {...}}` per step) and, when given, the device-memory timeline
the script samples (`gpu_memory.csv`: `unix_seconds,used_MiB,total_MiB` lines).

    python3 scripts/real_shape_summary.py RUN/metrics.jsonl [--gpu-memory RUN/gpu_memory.csv]
    python3 scripts/real_shape_summary.py RUN/metrics.jsonl --complete 3     # exit 0 when step 3 is logged

Time: verl's `timing_s/*` (gen = the rollout, update_weights = the weight sync after the update, old_log_prob +
update_actor = training) and the server's own view (`optimal_sampling/server/*`: the engine's busy seconds in the
rollout; gen minus that is server, agent-loop and TransferQueue overhead). Memory per phase: the server process's peak
and the device's used memory at the phase's end (server metrics), the actor process's peak (verl's
`actor/perf/max_memory_*`, cumulative since start: the training peak), and with the timeline the device-wide peak
within each phase's window. Standard library only.
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "experiments"))
from run_status import read_rows  # noqa: E402  (verl's file logger: one reader for every report)

SERVER = "optimal_sampling/server/"
PHASES = ("rollout", "train", "sync")


def read_steps(path: str) -> list[dict]:
    """The training steps' {"step": k, "data": {...}} (step >= 1); a truncated last line (a killed run) is left out."""
    return [r for r in read_rows(path) if r.get("step", 0) >= 1]


def read_timeline(path: str | None) -> list[tuple[float, float]]:
    """(unix seconds, used GiB) samples; [] without a file."""
    samples = []
    for line in open(path) if path else []:
        parts = line.strip().split(",")
        try:
            samples.append((float(parts[0]), float(parts[1]) / 1024))
        except (ValueError, IndexError):
            continue
    return samples


def window_peak(samples: list[tuple[float, float]], data: dict, phase: str) -> float | None:
    """Largest device-used sample within the phase's window, or None (no window or no sample in it)."""
    start, seconds = data.get(f"{SERVER}{phase}_start_unix"), data.get(f"{SERVER}{phase}_s")
    if start is None or seconds is None:
        return None
    inside = [used for t, used in samples if start <= t <= start + seconds]
    return max(inside) if inside else None


def fmt(x, digits: int = 2) -> str:
    return "" if x is None else f"{x:.{digits}f}" if isinstance(x, float) else str(x)


def table(header: list[str], rows: list[list]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(fmt(x) for x in row) + " |" for row in rows]


def summary(steps: list[dict], samples: list[tuple[float, float]]) -> str:
    time_rows, memory_rows = [], []
    for row in steps:
        d, k = row["data"], row["step"]
        gen, engine = d.get("timing_s/gen"), d.get(SERVER + "rollout_engine_s")
        time_rows.append([k, gen, engine, None if gen is None or engine is None else gen - engine,
                          d.get("timing_s/update_weights"), d.get("timing_s/old_log_prob"),
                          d.get("timing_s/update_actor"), d.get("timing_s/step"),
                          d.get(SERVER + "rollout_tokens"), d.get("response_length/mean")])  # fmt: skip
        memory_rows.append(
            [k]
            + [d.get(f"{SERVER}{p}_server_peak_gib") for p in PHASES]
            + [d.get(f"{SERVER}{p}_device_used_gib") for p in PHASES]
            + [d.get("actor/perf/max_memory_allocated_gb"), d.get("actor/perf/max_memory_reserved_gb")]
            + [window_peak(samples, d, p) for p in PHASES]
        )
    totals = [r["data"][SERVER + "device_total_gib"] for r in steps if SERVER + "device_total_gib" in r["data"]]
    total = totals[-1] if totals else None
    lines = ["## Time per step (s)", ""]
    lines += table(["step", "gen (rollout)", "engine busy", "gen - engine", "update_weights (sync)", "old_log_prob",
                    "update_actor", "step", "tokens", "response_length/mean"], time_rows)  # fmt: skip
    lines += ["", f"## Memory per phase (GiB; device total {fmt(total)})", ""]
    lines += table(["step", "server peak: rollout", "train", "sync", "device used at end: rollout", "train", "sync",
                    "actor peak allocated", "actor peak reserved", "device peak (timeline): rollout", "train",
                    "sync"], memory_rows)  # fmt: skip
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("metrics", help="verl's file-logger JSONL")
    p.add_argument("--gpu-memory", default=None, help="unix_seconds,used_MiB[,total_MiB] samples")
    p.add_argument("--complete", type=int, default=None, help="only check: exit 0 when this step is logged")
    args = p.parse_args(argv)
    steps = read_steps(args.metrics)
    if args.complete is not None:
        return 0 if any(r["step"] >= args.complete for r in steps) else 1
    print(summary(steps, read_timeline(args.gpu_memory)), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
