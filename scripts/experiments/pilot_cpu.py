"""CPU pilot for choosing the experiment's learning rate and step count. NOT the experiment and NOT verl: a minimal
GRPO loop in plain PyTorch with the experiment's settings (16 prompts x 8 responses, 8 tokens, token-mean loss,
w = min(pi_old / q*, C) with pi_old = pi_theta (one update per step), AdamW with weight decay 0.01, grad clip 1.0),
sampling with the real `DualSampler` under each arm's SamplerConfig and scoring the policy alone greedily on the
held-out problems (`mixed_*` arms: k of each prompt's n responses from q*, the rest from the policy alone). Its
numbers say whether a learning rate moves the policy within the planned steps; the reported
results come from the verl runs (run_all.sh) only.

    python scripts/experiments/pilot_cpu.py --lrs 1e-4,2e-4 --steps 40 --seed 0 --out pilot.jsonl
"""

import argparse
import json
import time
from types import SimpleNamespace

import torch
from torch import Tensor

from recipe.optimal_sampling.engine import DualSampler, SamplerConfig
from recipe.optimal_sampling.engine.policy_only import POLICY_ONLY
from recipe.optimal_sampling.tasks import (
    greedy_accuracy,
    load_task_models,
    make_problems,
    policy_prompt,
    reward,
    stop_token_ids,
    teacher_prompt,
)
from recipe.optimal_sampling.tasks.models import default_cache_dir, policy_config

ARMS = {  # as scripts/experiments/run_arm.sh
    "on_policy": POLICY_ONLY,
    "balanced": SamplerConfig.preset("balanced"),
    "conservative": SamplerConfig.preset("conservative"),
    "exploratory": SamplerConfig.preset("exploratory"),
    "fixed_alpha_0.5": SamplerConfig(alpha_method="fixed", fixed_alpha=0.5),
    "fixed_alpha_1": SamplerConfig(alpha_method="fixed", fixed_alpha=1.0),
    "ess_balance": SamplerConfig.preset("balanced", alpha_method="ess_balance"),
    "mixed_1of8": SamplerConfig.preset("balanced"),  # + MIXED: k of each prompt's n responses from q*
    "mixed_4of8": SamplerConfig.preset("balanced"),
}
MIXED = {"mixed_1of8": 1, "mixed_4of8": 4}  # guided_per_prompt: the other responses come from pi_theta alone


def response_logprobs(policy, prompts: list[list[int]], responses: list[list[int]]) -> Tensor:
    """log pi_theta(y_t) of every response token, right-padded: (B, T_max), 0 past each response."""
    rows = [p + r for p, r in zip(prompts, responses, strict=True)]
    L, T = max(map(len, rows)), max(map(len, responses))
    ids = torch.zeros(len(rows), L, dtype=torch.long)  # (B, L)
    mask = torch.zeros_like(ids)  # (B, L)
    for i, row in enumerate(rows):
        ids[i, : len(row)], mask[i, : len(row)] = torch.tensor(row), 1
    logp = policy(input_ids=ids, attention_mask=mask).logits.float().log_softmax(-1)  # (B, L, V)
    out = torch.zeros(len(rows), T)  # (B, T)
    for i, (p, r) in enumerate(zip(prompts, responses, strict=True)):
        positions = torch.arange(len(p) - 1, len(p) + len(r) - 1)  # (n,) the logits that predict y_t
        out[i, : len(r)] = logp[i, positions].gather(-1, torch.tensor(r).unsqueeze(-1)).squeeze(-1)
    return out


def grpo_step(policy, optimizer, samplers, tok, problems, n: int, seed: int, threshold: float, guided=None) -> dict:
    """One GRPO step with token-level truncated IS; returns the training reward and the mean IS weight.
    samplers: (q* sampler, policy-only sampler); guided: None (all n responses from q*) or k (the first k of each
    prompt's n from q*, the rest from the policy: mixed groups)."""
    # 1) n responses per prompt from q* (or k from q* and n - k from the policy)
    group = [p for p in problems for _ in range(n)]
    policy_ids = [tok(policy_prompt(p.question), add_special_tokens=False)["input_ids"] for p in group]
    teacher_ids = [tok(teacher_prompt(p.question, tok), add_special_tokens=False)["input_ids"] for p in group]
    from_q = [guided is None or i % n < guided for i in range(len(group))]
    token_ids, logp_q = [None] * len(group), [None] * len(group)
    for sampler, want in zip(samplers, (True, False), strict=True):
        rows = [i for i, q in enumerate(from_q) if q == want]
        if rows:
            part = sampler.generate([policy_ids[i] for i in rows], [teacher_ids[i] for i in rows], 8, seed=seed)
            for j, i in enumerate(rows):
                token_ids[i], logp_q[i] = part.token_ids[j], part.logp_q[j]
    sample = SimpleNamespace(token_ids=token_ids, logp_q=logp_q)
    # 2) group-normalised advantages (verl's GRPO: (r - mean) / (std + 1e-6))
    r = torch.tensor([reward(p, tok.decode(y)) for p, y in zip(group, sample.token_ids, strict=True)])  # (B,)
    g = r.view(len(problems), n)  # (P, n)
    adv = ((g - g.mean(-1, keepdim=True)) / (g.std(-1, keepdim=True) + 1e-6)).view(-1)  # (B,)
    # 3) token-mean loss -A w ratio, ratio = pi_theta / pi_old = 1 with the gradient of log pi_theta
    logp = response_logprobs(policy, policy_ids, sample.token_ids)  # (B, T)
    mask = torch.zeros_like(logp)  # (B, T)
    logq = torch.zeros_like(logp)  # (B, T)
    for i, lq in enumerate(sample.logp_q):
        mask[i, : len(lq)], logq[i, : len(lq)] = 1, torch.tensor(lq)
    w = (logp.detach() - logq).exp().clamp(max=threshold) * mask  # (B, T)
    ratio = (logp - logp.detach()).exp()  # (B, T)
    loss = -(adv.unsqueeze(-1) * w * ratio * mask).sum() / mask.sum()
    optimizer.zero_grad()
    loss.backward()
    torch.nn.utils.clip_grad_norm_(policy.parameters(), 1.0)
    optimizer.step()
    return {"train_reward": float(r.mean()), "is_weight_mean": float(w.sum() / mask.sum())}


def run(arm: str, lr: float, steps: int, seed: int, eval_every: int, n_test: int, batch=16, n=8, policy_target=None):
    """One arm from the cached task checkpoints: a GRPO step per step, greedy held-out accuracy every eval_every.
    policy_target: a policy stopped at this validation accuracy (its own cache next to the default one)."""
    cache = None if policy_target is None else default_cache_dir().with_name(f"task_models_policy_{policy_target:g}")
    task = load_task_models(cache, policy_cfg=policy_config(policy_target), progress=False)  # fresh copies
    policy, teacher, tok = task.policy.float(), task.teacher.float(), task.tokenizer
    stops = tuple(stop_token_ids(tok))
    samplers = tuple(
        DualSampler(policy, teacher, c.replace(stop_token_ids=stops), tokenizer=tok, teacher_tokenizer=tok)
        for c in (ARMS[arm], POLICY_ONLY)
    )
    optimizer = torch.optim.AdamW(policy.parameters(), lr=lr, weight_decay=0.01)
    train = make_problems(batch * steps, seed=seed, split="train")
    test = make_problems(n_test, seed=0, split="test")
    test_prompts = [policy_prompt(p.question) for p in test]
    log, start = [], time.perf_counter()
    for step in range(steps + 1):
        row = {"arm": arm, "lr": lr, "seed": seed, "step": step, "batch": batch, "n": n}
        if policy_target is not None:
            row["policy_target"] = policy_target
        if step:
            problems = train[batch * (step - 1) : batch * step]
            row |= grpo_step(policy, optimizer, samplers, tok, problems, n, seed * 10_000 + step, 2.0, MIXED.get(arm))
        if step % eval_every == 0:
            row["val_acc"] = greedy_accuracy(policy, tok, test_prompts, test)
        row["seconds"] = round(time.perf_counter() - start, 2)
        log.append(row)
    return log


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arms", default=",".join(ARMS))
    parser.add_argument("--lrs", default="1e-4,2e-4")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--eval-every", type=int, default=5)
    parser.add_argument("--n-test", type=int, default=512)
    parser.add_argument("--batch", type=int, default=16, help="prompts per step")
    parser.add_argument("--n", type=int, default=8, help="responses per prompt")
    parser.add_argument("--out", default="pilot_cpu.jsonl")
    parser.add_argument(
        "--policy-target-accuracy", type=float, default=None, help="a weaker start: the policy stopped at this accuracy"
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    with open(args.out, "a") as f:
        for lr in (float(x) for x in args.lrs.split(",")):
            for arm in args.arms.split(","):
                log = run(
                    arm, lr, args.steps, args.seed, args.eval_every, args.n_test, args.batch, args.n,
                    args.policy_target_accuracy,
                )  # fmt: skip
                f.writelines(json.dumps(row) + "\n" for row in log)
                f.flush()
                curve = " ".join(f"{r['step']}:{r['val_acc']:.3f}" for r in log if "val_acc" in r)
                print(f"{arm:<16} lr={lr:g} {curve}  ({log[-1]['seconds']:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
