"""The whole rollout of one GRPO step through the fast engine: continuous batching vs static batching vs the
policy-only path vs equal-length rows, against the floor computed from the tokens actually generated.

Workload (seeded): --prompts prompts of random tokens (policy prompt lengths uniform in [--prompt-min, --prompt-max];
the teacher's prompt is the policy's plus --teacher-extra tokens, as a chat template adds), --n responses each
(a GRPO group shares its prompt), each response capped at a length drawn from a long tail (log-normal with median
--median-response and sigma --sigma, at most --max-response): random weights never stop on their own, so the cap
is the response length. Methods, all in one run on the same engine and requests:
  continuous     `ContinuousBatcher` with --slots slots (rows join as others finish; groups share prefills)
  static         batches of --slots requests in queue order, each decoded until its longest member ends (today's
                 server: max_new_tokens = the batch's largest cap; finished rows keep stepping)
  policy_only    `ContinuousBatcher` in mode "policy" (the teacher is not run): the on-policy anchor
  equal_length   one static batch of --slots rows of the mean length: the engine's tokens/s without a tail
Floor (GPU): each decode step reads both models' weights once and each row's KV cache up to its position, so
generating the N tokens with S slots needs at least ceil(N / S) weight reads plus the KV bytes of every token's
context, at the read bandwidth measured in the same run (prefill is not in the floor). One JSON line per method
goes to --out with the device's name. Models are built from the public Qwen3 configs (`tasks.real_shape.ARCH`) with
random bf16 weights (no download); --tiny builds 2-layer head_dim-16 models instead and runs anywhere (CPU: the
kernels' torch twins, no graphs), which is what the smoke test runs. Example on one GPU:
    python bench/grpo_rollout.py --policy 4b --teacher 14b --prompts 32 --n 8 --slots 64 \
        --out bench/results/grpo_rollout.jsonl
"""

import argparse
import json
import math
import random
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from recipe.optimal_sampling import SamplerConfig  # noqa: E402
from recipe.optimal_sampling.engine.fast.engine import FastDualEngine  # noqa: E402
from recipe.optimal_sampling.engine.fast.scheduler import ContinuousBatcher, Request, request_seed  # noqa: E402
from recipe.optimal_sampling.engine.policy_only import policy_only_config  # noqa: E402
from recipe.optimal_sampling.tasks.real_shape import ARCH, TINY_VOCAB, VOCAB, random_qwen3, response_cap  # noqa: E402


def workload(args, vocab: int) -> list[Request]:
    """--prompts groups of --n requests; per-request caps from the long tail (see the module docstring)."""
    rng = random.Random(args.seed)
    requests = []
    for p in range(args.prompts):
        policy_ids = [rng.randrange(1, vocab) for _ in range(rng.randint(args.prompt_min, args.prompt_max))]
        teacher_ids = policy_ids + [rng.randrange(1, vocab) for _ in range(args.teacher_extra)]
        for k in range(args.n):
            cap = response_cap(rng, args.median_response, args.sigma, args.max_response)
            requests.append(Request(policy_ids, teacher_ids, cap, request_seed(args.seed, p * args.n + k)))
    return requests


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_continuous(engine, requests, args, cfg, mode="dual") -> dict:
    batcher = ContinuousBatcher(engine, args.slots, slot_len(requests), check_every=args.check_every)
    if mode != "dual":
        requests = [Request(r.policy_ids, None, r.max_new_tokens, r.seed) for r in requests]
    t0 = time.perf_counter()
    out = batcher.run(requests, cfg, mode)
    sync(engine.device)
    wall = time.perf_counter() - t0
    made = [(r, len(t)) for r, t in zip(requests, out.token_ids, strict=True)]
    return {"wall_s": wall, "made": made, "steps": batcher.steps, "prefilled": batcher.prefilled,
            "copied": batcher.copied}  # fmt: skip


def run_static(engine, requests, args, cfg) -> dict:
    """Batches of --slots requests in queue order; each batch runs to its largest cap, rows are cut to their own."""
    t0, made, steps = time.perf_counter(), [], 0
    for i in range(0, len(requests), args.slots):
        batch = requests[i : i + args.slots]
        longest = max(r.max_new_tokens for r in batch)
        out = engine.generate(
            [r.policy_ids for r in batch], [r.teacher_ids for r in batch], longest, batch[0].seed, cfg
        )
        made += [(r, min(len(t), r.max_new_tokens)) for t, r in zip(out.token_ids, batch, strict=True)]
        steps += longest
    sync(engine.device)
    return {"wall_s": time.perf_counter() - t0, "made": made, "steps": steps}


def run_equal(engine, requests, args, cfg) -> dict:
    """One static batch of --slots rows, every row the mean cap long (no tail)."""
    mean = round(sum(r.max_new_tokens for r in requests) / len(requests))
    batch = (requests * math.ceil(args.slots / len(requests)))[: args.slots]
    t0 = time.perf_counter()
    out = engine.generate([r.policy_ids for r in batch], [r.teacher_ids for r in batch], mean, 0, cfg)
    sync(engine.device)
    made = [(r, len(t)) for r, t in zip(batch, out.token_ids, strict=True)]
    return {"wall_s": time.perf_counter() - t0, "made": made, "steps": mean}


def slot_len(requests: list[Request]) -> int:
    return max(max(len(r.policy_ids), len(r.teacher_ids or [])) + r.max_new_tokens for r in requests)


def floor_seconds(models, made: list[tuple[Request, int]], slots: int, bandwidth: float | None) -> float | None:
    """Decode floor of the tokens generated (made: (request, tokens) pairs): ceil(N / slots) reads of the models'
    weights plus, per model, the KV bytes of every token's context, at `bandwidth` bytes/s (None off CUDA)."""
    if bandwidth is None:
        return None
    weights = sum(weight_bytes(m.model) for m in models)
    kv = 0
    for m, side in zip(models, ("policy_ids", "teacher_ids"), strict=False):  # models: 1 or 2
        per_token = m.cache_bytes(1, 1)
        kv += sum(per_token * (len(getattr(r, side)) * t + t * (t + 1) // 2) for r, t in made)
    return (math.ceil(sum(t for _, t in made) / slots) * weights + kv) / bandwidth


def weight_bytes(model) -> int:
    """Bytes one decode step reads: every parameter, except an untied input embedding (only B rows are read)."""
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    emb, head = model.get_input_embeddings().weight, model.get_output_embeddings().weight
    return total - (0 if emb is head else emb.numel() * emb.element_size())


def read_bandwidth(device: torch.device) -> float | None:
    """Bytes/s of a large read (sum over 4 GiB of bf16), best of 5; None off CUDA."""
    if device.type != "cuda":
        return None
    x = torch.randn(2**31, dtype=torch.bfloat16, device=device)
    best = math.inf
    for _ in range(6):
        sync(device)
        t0 = time.perf_counter()
        x.sum()
        sync(device)
        best = min(best, time.perf_counter() - t0)
    del x
    return 2**32 / best


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() and not args.cpu else "cpu")
    vocab = TINY_VOCAB if args.tiny else VOCAB
    names = ("tiny", "tiny") if args.tiny else (args.policy, args.teacher)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    policy, teacher = (random_qwen3(name, seed, vocab, device, dtype) for name, seed in zip(names, (0, 1), strict=True))
    engine = FastDualEngine(policy, teacher, vocab)
    requests = workload(args, vocab)
    cfg = SamplerConfig.preset(args.preset)
    bandwidth = read_bandwidth(device)
    engine.reserve(args.slots, slot_len(requests) + 1, slot_len(requests) + 1)  # once: no re-capture while timed
    # 1) warm-up: compile kernels and capture every graph the timed runs replay (short caps, every static batch size)
    few = [replace(r, max_new_tokens=min(r.max_new_tokens, 4)) for r in requests]
    run_continuous(engine, few[: 2 * args.slots], args, cfg)
    run_continuous(engine, few[: 2 * args.slots], args, policy_only_config(1.0, ()), mode="policy")
    for size in {len(requests[i : i + args.slots]) for i in range(0, len(requests), args.slots)}:
        run_static(engine, few[:size], args, cfg)
    # 2) the timed runs
    runs = {
        "continuous": lambda: run_continuous(engine, requests, args, cfg),
        "static": lambda: run_static(engine, requests, args, cfg),
        "policy_only": lambda: run_continuous(engine, requests, args, policy_only_config(1.0, ()), mode="policy"),
        "equal_length": lambda: run_equal(engine, requests, args, cfg),
    }
    rows = []
    for method in args.methods.split(","):
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        row = runs[method]()
        made = row.pop("made")
        models = engine.models if method != "policy_only" else engine.models[:1]
        floor = floor_seconds(models, made, args.slots, bandwidth)
        row["tokens"] = sum(t for _, t in made)
        row.update(
            method=method, device=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            policy=names[0], teacher=names[1], slots=args.slots, requests=len(made), preset=args.preset,
            slot_use=row["tokens"] / (row["steps"] * args.slots), tokens_per_s=row["tokens"] / row["wall_s"],
            floor_s=floor,
            floor_tokens_per_s=None if floor is None else row["tokens"] / floor,
            peak_gib=torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
        )  # fmt: skip
        rows.append(row)
        print(json.dumps(row), flush=True)
        if args.out:
            with open(args.out, "a") as f:
                f.write(json.dumps(row) + "\n")
    return rows


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--policy", default="4b", choices=[a for a in ARCH if a != "tiny"])
    p.add_argument("--teacher", default="14b", choices=[a for a in ARCH if a != "tiny"])
    p.add_argument("--tiny", action="store_true", help="2-layer head_dim-16 models (CPU smoke test)")
    p.add_argument("--cpu", action="store_true", help="run on CPU even where CUDA is available")
    p.add_argument("--prompts", type=int, default=32)
    p.add_argument("--n", type=int, default=8, help="responses per prompt (a GRPO group)")
    p.add_argument("--slots", type=int, default=64)
    p.add_argument("--prompt-min", type=int, default=64)
    p.add_argument("--prompt-max", type=int, default=256)
    p.add_argument("--teacher-extra", type=int, default=16, help="tokens the teacher's chat template adds")
    p.add_argument("--median-response", type=float, default=256)
    p.add_argument("--sigma", type=float, default=0.8, help="log-normal sigma of the response caps")
    p.add_argument("--max-response", type=int, default=1024)
    p.add_argument("--check-every", type=int, default=4)
    p.add_argument("--preset", default="balanced")
    p.add_argument("--methods", default="continuous,static,policy_only,equal_length")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="append one JSON line per method to this file")
    return p.parse_args(argv)


if __name__ == "__main__":
    main()
