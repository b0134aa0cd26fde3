"""The real-shape workload (`tasks.real_shape`) in verl's formats, for `scripts/real_shape_gpu.sh`: HF checkpoints of
a random policy and teacher at public Qwen3 shapes, the datasets with per-response length caps, and a stand-in reward.

    python -m recipe.optimal_sampling.verl.real_shape --out DIR --policy 4b --teacher 14b   # on a GPU: seconds + disk
    python -m recipe.optimal_sampling.verl.real_shape --out DIR --tiny                      # CPU tests

writes DIR/{policy,teacher}/ (config, bf16 safetensors, the tokenizer with its ChatML template, build.json last; a
checkpoint whose build.json names the same shape, seed and vocabulary is kept, so a rerun skips it) and
DIR/{train,test}.parquet: one user turn of random characters per row (prompt lengths uniform in [--prompt-min,
--prompt-max] tokens) and, in `extra_info.max_response_tokens`, one cap per response of the row's group (`--n` of
them; log-normal with median --median-response and sigma --sigma, at most --max-response: random weights never stop
on their own, so a cap is a response's length). The policy gets a plain template on the command line; the teacher
its chat template. Reward (`reward.custom_reward_function.path=<this file>`, `name=compute_score`): a coin flip read
off the response, so that GRPO groups have non-zero advantages and the update moves the weights the sync then sends.
Knows nothing about verl's internals.
"""

import argparse
import json
import os
import random
import time

from recipe.optimal_sampling.tasks.real_shape import (
    ARCH,
    EOS_TOKEN,
    PAD_TOKEN,
    TINY_VOCAB,
    VOCAB,
    build_tokenizer,
    prompt_text,
    response_cap,
)
from recipe.optimal_sampling.verl.response_caps import CAP_FIELD

DATA_SOURCE = "optimal_sampling/real_shape"
POLICY_TEMPLATE = "Q: {prompt}\nA: "  # the policy's plain prompt (optimal_sampling.policy_template)
MARKER = "build.json"  # written last into each checkpoint folder


def compute_score(data_source: str, solution_str: str, ground_truth: str, extra_info=None, **kwargs) -> float:
    """1.0 when the response's first character has an even code point, else 0.0 (random models solve nothing; this
    gives each GRPO group a mix of rewards)."""
    return float(bool(solution_str) and ord(solution_str[0]) % 2 == 0)


def write_checkpoint(path: str, name: str, seed: int, tokenizer, device: str) -> dict:
    """A random Qwen3 of shape `name` (bf16, initialised on `device`) and `tokenizer` as an HF checkpoint at `path`;
    kept when its build.json matches. Returns the build.json record."""
    import torch

    from recipe.optimal_sampling.tasks.real_shape import random_qwen3

    want = {"shape": name, "seed": seed, "vocab": len(tokenizer)}
    marker = os.path.join(path, MARKER)
    if os.path.exists(marker):
        with open(marker) as f:
            found = json.load(f)
        if {k: found.get(k) for k in want} == want:
            print(f"kept {path}: {found}", flush=True)
            return found
    t0 = time.perf_counter()
    ids = {"eos_id": tokenizer.convert_tokens_to_ids(EOS_TOKEN), "pad_id": tokenizer.convert_tokens_to_ids(PAD_TOKEN)}
    model = random_qwen3(name, seed, len(tokenizer), device, torch.bfloat16, **ids)
    built = time.perf_counter() - t0
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    params = sum(p.numel() for p in model.parameters())
    record = {**want, "params": params, "device": str(device), "init_s": built, "total_s": time.perf_counter() - t0}
    with open(marker, "w") as f:
        json.dump(record, f)
    print(f"wrote {path}: {record}", flush=True)
    del model
    return record


def write_datasets(out_dir: str, tokenizer, args: argparse.Namespace) -> dict[str, str]:
    """DIR/train.parquet and DIR/test.parquet in verl's RLHFDataset layout (see the module docstring)."""
    import pandas as pd

    rng = random.Random(args.seed)
    paths = {}
    for split, count in (("train", args.n_train), ("test", args.n_test)):
        rows = []
        for i in range(count):
            text = prompt_text(rng, tokenizer, rng.randint(args.prompt_min, args.prompt_max))
            caps = [response_cap(rng, args.median_response, args.sigma, args.max_response) for _ in range(args.n)]
            rows.append(
                {
                    "data_source": DATA_SOURCE,
                    "prompt": [{"role": "user", "content": text}],
                    "ability": "none",
                    "reward_model": {"style": "rule", "ground_truth": ""},
                    "extra_info": {"split": split, "index": i, CAP_FIELD: caps},
                }
            )
        paths[split] = os.path.join(out_dir, f"{split}.parquet")
        pd.DataFrame(rows).to_parquet(paths[split])
    return paths


def main(argv=None) -> dict:
    args = parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    vocab = TINY_VOCAB if args.tiny else VOCAB
    names = ("tiny", "tiny") if args.tiny else (args.policy, args.teacher)
    device = args.device or _default_device()
    t0 = time.perf_counter()
    tokenizer = build_tokenizer(vocab)
    # 1) the datasets (cheap, always rewritten), 2) the checkpoints (kept when already built)
    out = {"data": write_datasets(args.out, tokenizer, args)}
    for role, name, seed in (("policy", names[0], 0), ("teacher", names[1], 1)):
        out[role] = write_checkpoint(os.path.join(args.out, role), name, seed, tokenizer, device)
    print(f"real-shape workload in {args.out}: {time.perf_counter() - t0:.1f} s", flush=True)
    return out


def _default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--policy", default="4b", choices=[a for a in ARCH if a != "tiny"])
    p.add_argument("--teacher", default="14b", choices=[a for a in ARCH if a != "tiny"])
    p.add_argument("--tiny", action="store_true", help="2-layer head_dim-16 models, vocabulary 256 (CPU tests)")
    p.add_argument("--device", default=None, help="where the weights are initialised (default: cuda when available)")
    p.add_argument("--n-train", type=int, default=64, help="training prompts")
    p.add_argument("--n-test", type=int, default=8, help="validation prompts")
    p.add_argument("--n", type=int, default=8, help="responses per prompt (rollout.n): one cap each")
    p.add_argument("--prompt-min", type=int, default=64, help="shortest user message, in tokens")
    p.add_argument("--prompt-max", type=int, default=256, help="longest user message, in tokens")
    p.add_argument("--median-response", type=float, default=300, help="median response cap, in tokens")
    p.add_argument("--sigma", type=float, default=0.8, help="log-normal sigma of the response caps")
    p.add_argument("--max-response", type=int, default=1024, help="largest cap (= data.max_response_length)")
    p.add_argument("--seed", type=int, default=0, help="the datasets' seed (the models': policy 0, teacher 1)")
    return p.parse_args(argv)


if __name__ == "__main__":
    main()
