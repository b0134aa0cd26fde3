"""Where the fused q* step spends its time: each stage of `core.fused` alone, on random bf16 logits of the full
151,936-token vocabulary, per batch size (CUDA events, median). Prints one JSON line per batch.
    python bench/fused_stages.py --batches 1,64,256
--fused-module names another implementation with the same functions (e.g. a copy of an older `core` package put
on the path with --path), so that two versions are timed in one run on one card."""

import argparse
import importlib
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.dual_decode import graphed, timed  # noqa: E402


def profile(F, B: int, top_p: float, V: int = 151_936) -> dict:
    lp = torch.randn(B, V, device="cuda").mul(3).bfloat16()
    lt = torch.randn(B, V, device="cuda").mul(3).bfloat16()
    step, seed = torch.zeros((), dtype=torch.long, device="cuda"), torch.zeros((), dtype=torch.long, device="cuda")
    plan = F._Plan(lp)
    stats = F.fused_stats(lp, lt, 1.0, plan)
    thr = F.fused_top_p_threshold(lt, top_p, 1.0, stats, plan)
    whole = lambda: F.fused_sample(lp, lt, step, seed, top_p=top_p)  # noqa: E731
    return {
        "device": torch.cuda.get_device_name(),
        "fused_module": F.__name__,
        "batch": B,
        "splits": plan.ns,
        "stats_ms": timed(lambda: F.fused_stats(lp, lt, 1.0, plan), 20),
        "top_p_ms": timed(lambda: F.fused_top_p_threshold(lt, top_p, 1.0, stats, plan), 20),
        "alpha_ms": timed(lambda: F.fused_solve_alpha(lp, lt, thr, 1.0, stats, plan), 20),
        "whole_q_step_ms": timed(whole, 20),
        "whole_q_step_graph_ms": timed(graphed(whole), 20),
        "read_once_ms": timed(lambda: (lp.sum(), lt.sum()), 20),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--batches", default="1,64,256")
    parser.add_argument("--top-p", type=float, default=0.95)
    parser.add_argument("--fused-module", default="recipe.optimal_sampling.core.fused")
    parser.add_argument("--path", default=None, help="a folder to put first on sys.path (for --fused-module)")
    args = parser.parse_args()
    if args.path:
        sys.path.insert(0, args.path)
    F = importlib.import_module(args.fused_module)
    for B in [int(b) for b in args.batches.split(",")]:
        print(json.dumps(profile(F, B, args.top_p)), flush=True)


if __name__ == "__main__":
    main()
