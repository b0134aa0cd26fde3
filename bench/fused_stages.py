"""Where the fused q* step spends its time: each stage of `core.fused` alone, on random bf16 logits of the full
151,936-token vocabulary, per batch size (CUDA events, median). Prints one JSON line per batch.
    python bench/fused_stages.py --batches 1,64,256"""

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.dual_decode import timed  # noqa: E402
from recipe.optimal_sampling.core import fused as F  # noqa: E402


def profile(B: int, top_p: float, V: int = 151_936) -> dict:
    lp = torch.randn(B, V, device="cuda").mul(3).bfloat16()
    lt = torch.randn(B, V, device="cuda").mul(3).bfloat16()
    step, seed = torch.zeros((), dtype=torch.long, device="cuda"), torch.zeros((), dtype=torch.long, device="cuda")
    plan = F._Plan(lp)
    stats = F.fused_stats(lp, lt, 1.0, plan)
    thr = F.fused_top_p_threshold(lt, top_p, 1.0, stats, plan)
    return {
        "device": torch.cuda.get_device_name(),
        "batch": B,
        "splits": plan.ns,
        "stats_ms": timed(lambda: F.fused_stats(lp, lt, 1.0, plan), 20),
        "top_p_ms": timed(lambda: F.fused_top_p_threshold(lt, top_p, 1.0, stats, plan), 20),
        "alpha_ms": timed(lambda: F.fused_solve_alpha(lp, lt, thr, 1.0, stats, plan), 20),
        "whole_q_step_ms": timed(lambda: F.fused_sample(lp, lt, step, seed, top_p=top_p), 20),
        "read_once_ms": timed(lambda: (lp.sum(), lt.sum()), 20),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--batches", default="1,64,256")
    parser.add_argument("--top-p", type=float, default=0.95)
    args = parser.parse_args()
    for B in [int(b) for b in args.batches.split(",")]:
        print(json.dumps(profile(B, args.top_p)), flush=True)


if __name__ == "__main__":
    main()
