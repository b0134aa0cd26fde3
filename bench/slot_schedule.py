"""Replay of the continuous batcher's slot scheduling on request caps (CPU, no models): how many decode steps one
GRPO step's rollout needs under the engine's policy and under others, against the lower bounds.

The requests are `bench/grpo_rollout.py`'s own seeded workload (same flags, same generator: the same requests the
GPU benchmark decoded). A request's cap is its response length (random weights never stop on their own). Policies:
  fifo            `ContinuousBatcher`: at each host check (every `check_every` steps) the free slots take the next
                  queued requests in queue order; a row that reaches its cap is freed at the next check
  longest_first   the same loop with the queue sorted by cap, longest first (an oracle: it knows the lengths)
  static          batches of `slots` requests in queue order, each decoded until its longest member ends
Bounds: max(ceil(N / slots), longest cap) steps for N tokens (no schedule does better), and the check-rounded
variant for a given check_every (every request occupies its slot ceil(cap / check_every) * check_every steps).
Slot use = N / (steps * slots): the share of slot-steps that produced a token (the benchmark's `slot_use`).
Knows nothing about models, devices or sampling. Example (the GPU run's workload, and 2x / 4x / 16x more requests):
    python bench/slot_schedule.py --prompts 32 --n 8 --slots 64 --scale 1,2,4,16 \
        --measured bench/results/grpo_rollout_h200.jsonl
"""

import argparse
import heapq
import json
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from grpo_rollout import TINY_VOCAB, VOCAB, workload  # noqa: E402
from grpo_rollout import parse_args as rollout_args  # noqa: E402


def continuous_steps(caps: list[int], slots: int, check_every: int) -> int:
    """Decode steps of `ContinuousBatcher.serve` for requests of these caps, admitted in list order: admission and
    harvest happen every `check_every` steps, so a request holds its slot ceil(cap / check_every) rounds. List
    scheduling in rounds: each request takes the slot that frees first (slots are identical, so which free slot
    does not change the count)."""
    assert slots >= 1 and check_every >= 1 and all(c >= 1 for c in caps), (slots, check_every, min(caps, default=1))
    free_at = [0] * min(slots, len(caps))  # round at which each slot is free again (a heap)
    for cap in caps:
        start = heapq.heappop(free_at)
        heapq.heappush(free_at, start + math.ceil(cap / check_every))
    return max(free_at, default=0) * check_every


def static_steps(caps: list[int], slots: int) -> int:
    """Steps of static batching: batches of `slots` requests in queue order, each runs to its largest cap."""
    return sum(max(caps[i : i + slots]) for i in range(0, len(caps), slots))


def lower_bound(caps: list[int], slots: int, check_every: int = 1) -> int:
    """No schedule needs fewer steps: the slot-steps every request holds (its cap rounded up to a check) spread over
    all slots, or the longest request alone."""
    held = [math.ceil(c / check_every) * check_every for c in caps]
    return max(math.ceil(sum(held) / slots), max(held))


def schedules(caps: list[int], slots: int, check_every: int) -> list[tuple[str, str | None, int]]:
    """(policy, the grpo_rollout.py method it replays or None, steps) for each policy and bound on these caps."""
    longest_first = sorted(caps, reverse=True)
    return [
        (f"fifo, check_every={check_every} (the engine)", "continuous", continuous_steps(caps, slots, check_every)),
        ("fifo, check_every=1", None, continuous_steps(caps, slots, 1)),
        (
            f"longest_first, check_every={check_every} (oracle)",
            None,
            continuous_steps(longest_first, slots, check_every),
        ),
        ("longest_first, check_every=1 (oracle)", None, continuous_steps(longest_first, slots, 1)),
        ("static batches", "static", static_steps(caps, slots)),
        (f"lower bound, check_every={check_every}", None, lower_bound(caps, slots, check_every)),
        ("lower bound max(ceil(N/S), longest)", None, lower_bound(caps, slots)),
    ]


def rows_for(args: argparse.Namespace, prompts: int) -> list[dict]:
    """One row per policy for the workload with `prompts` prompts (the other flags as given)."""
    wl = rollout_args([*args.rollout_argv, "--prompts", str(prompts)])
    caps = [r.max_new_tokens for r in workload(wl, TINY_VOCAB if wl.tiny else VOCAB)]
    tokens = sum(caps)
    return [
        {"prompts": prompts, "requests": len(caps), "slots": wl.slots, "tokens": tokens, "policy": name,
         "replays": method, "steps": steps, "slot_use": tokens / (steps * wl.slots)}
        for name, method, steps in schedules(caps, wl.slots, wl.check_every)
    ]  # fmt: skip


HEADER = (
    "| requests | slots | tokens | policy | steps | slot use | measured steps | projected tok/s | of equal-length |"
)


def table(rows: list[dict], measured: dict[str, dict]) -> str:
    """Markdown table. With a measured run (same slots): its steps next to the replay of its own method where the
    workload is the run's, and tokens/s projected at the run's own time per step (static's for static batches,
    continuous's for the rest), also as a share of the run's equal-length tokens/s (the issue's 85% target)."""
    lines = [HEADER, "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        run = measured.get("static" if r["replays"] == "static" else "continuous")
        shown = tps = share = ""
        if run is not None and run["slots"] == r["slots"]:
            if r["replays"] and (run["requests"], run["tokens"]) == (r["requests"], r["tokens"]):
                shown = f"{run['steps']:,}"
            projected = r["tokens"] / (r["steps"] * run["wall_s"] / run["steps"])  # prefills included in s/step
            tps = f"{projected:,.0f}"
            if "equal_length" in measured:
                share = f"{projected / measured['equal_length']['tokens_per_s']:.1%}"
        lines.append(
            f"| {r['requests']} | {r['slots']} | {r['tokens']:,} | {r['policy']} | {r['steps']:,} | "
            f"{r['slot_use']:.3f} | {shown} | {tps} | {share} |"
        )
    return "\n".join(lines)


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    measured = {}
    if args.measured:
        measured = {r["method"]: r for r in map(json.loads, Path(args.measured).read_text().splitlines())}
    base = rollout_args(args.rollout_argv).prompts
    rows = [row for k in args.scale for row in rows_for(args, base * k)]
    print(table(rows, measured))
    return rows


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], allow_abbrev=False)
    p.add_argument("--scale", default="1", help="comma-separated multiples of --prompts to replay (e.g. 1,4,16)")
    p.add_argument("--measured", default=None, help="a grpo_rollout.py JSONL whose steps to show next to the replay")
    args, rest = p.parse_known_args(argv)
    args.scale = [int(k) for k in args.scale.split(",")]
    if any(k < 1 for k in args.scale):
        raise ValueError(f"--scale {args.scale}: every multiple must be >= 1 (e.g. --scale 1,4,16)")
    rollout_args(rest)  # the workload's own flags (--prompts, --n, --slots, --check-every, ...): refused if unknown
    args.rollout_argv = rest
    return args


if __name__ == "__main__":
    main()
