"""Prechecks of a guided testbed (DESIGN.md §8): can teacher guidance matter on this task at all?

(a) start: the policy's greedy accuracy, and n samples at temperature 1 per held-out problem: per-sample accuracy,
    pass@n and the share of all-zero groups (GRPO groups that carry no gradient);
(b) imitation: per step, `batch` train prompts x n samples of the teacher at temperature 1 (on its own chat prompt),
    the correct ones kept and learned by the policy under its plain prompt (token-mean NLL);
(c) GRPO, for contrast: per step, `batch` prompts x n policy samples, GRPO advantages (r - mean) / (std + 1e-6) per
    group, token-mean loss -A log pi (on-policy: importance weights 1, one update per step);
(s) supervised, a reference that needs no teacher: the same NLL as (b) on the batch's true completions (the answers a
    teacher that is always right would give).
The training arms: AdamW (weight decay 0.01), gradient clipping at 1.0, the policy's greedy held-out accuracy every
`eval_every` steps. Sampling goes through the project's `DualSampler` with a policy-only config (the sampled model
alone; the teacher's imitation samples come from a sampler whose "policy" is the teacher). Everything is seeded.
Not verl and not the experiment: a check of the premise, in plain PyTorch on the CPU.

    python scripts/experiments/guided_precheck.py --task carry --steps 200 --out precheck.jsonl
"""

import argparse
import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor
from transformers import AutoModelForCausalLM

from recipe.optimal_sampling.engine import DualSampler
from recipe.optimal_sampling.engine.policy_only import POLICY_ONLY
from recipe.optimal_sampling.engine.scoring import response_logprobs
from recipe.optimal_sampling.tasks import (
    build_tokenizer,
    greedy_accuracy,
    load_task_models,
    make_problems,
    prompt,
    stop_token_ids,
)
from recipe.optimal_sampling.tasks.addition import Problem
from recipe.optimal_sampling.tasks.models import TASK_MODELS
from recipe.optimal_sampling.tasks.registry import TaskFormat, get_task

ARMS = ("start", "imitation", "grpo", "supervised")


@dataclass
class Testbed:
    """A task's trained pair, its format and its held-out problems."""

    form: TaskFormat
    policy: torch.nn.Module
    teacher: torch.nn.Module | None
    tokenizer: object
    n_digits: int
    test: list[Problem]

    @property
    def max_new_tokens(self) -> int:
        return self.form.max_new_tokens(self.n_digits)

    def prompt_ids(self, role: str, problems: list[Problem]) -> list[list[int]]:
        return [self.tokenizer.encode(prompt(role, p.question, self.tokenizer)) for p in problems]

    def accuracy(self) -> float:
        """The policy's greedy accuracy on the held-out problems."""
        prompts = [prompt("policy", p.question, self.tokenizer) for p in self.test]
        return greedy_accuracy(self.policy, self.tokenizer, prompts, self.test, task=self.form)


def load_testbed(task: str, n_test: int, models_dir: str | None = None, policy: str | None = None) -> Testbed:
    """A trained pair of `task` (fresh float32 copies) and `n_test` test problems.
    models_dir: a folder holding policy/ and teacher/ HF checkpoints and meta.json, as `load_task_models` writes it
    (None: the task's default cache, trained first when absent); policy: start from this checkpoint instead."""
    folder = load_task_models(task=task, progress=False).policy_path.parent if models_dir is None else Path(models_dir)
    meta_path = folder / "meta.json"
    meta = json.loads(meta_path.read_text()) if meta_path.exists() else {}
    form = get_task(meta.get("task", task))
    n_digits = meta.get("train_configs", {}).get("policy", {}).get("n_digits", form.n_digits)
    start = AutoModelForCausalLM.from_pretrained(policy or folder / "policy").eval()
    teacher = AutoModelForCausalLM.from_pretrained(folder / "teacher").eval() if (folder / "teacher").exists() else None
    test = make_problems(n_test, seed=0, n_digits=n_digits, split="test")
    return Testbed(form, start, teacher, build_tokenizer(), n_digits, test)


def sample(bed: Testbed, role: str, problems: list[Problem], n: int, seed: int) -> tuple[list[list[int]], Tensor]:
    """n samples at temperature 1 per problem from `role`'s model on its own prompt.
    Returns the token ids of the P * n rows (problem-major) and their rewards (P, n)."""
    model = bed.policy if role == "policy" else bed.teacher
    config = POLICY_ONLY.replace(stop_token_ids=tuple(stop_token_ids(bed.tokenizer)))
    sampler = DualSampler(model, model, config, tokenizer=bed.tokenizer, teacher_tokenizer=bed.tokenizer)
    rows = [p for p in problems for _ in range(n)]
    out = sampler.generate_policy_only(bed.prompt_ids(role, rows), bed.max_new_tokens, seed=seed)
    rewards = [bed.form.reward(p, bed.tokenizer.decode(y)) for p, y in zip(rows, out.token_ids, strict=True)]
    return out.token_ids, torch.tensor(rewards).view(len(problems), n)  # (P, n)


def group_stats(rewards: Tensor) -> dict:
    """rewards (P, n) -> per-sample accuracy, pass@n and the share of all-zero groups."""
    solved = rewards.amax(dim=1)  # (P,)
    return {
        "sample_acc": float(rewards.mean()),
        "pass_at_n": float(solved.mean()),
        "all_zero_frac": float((rewards.sum(dim=1) == 0).float().mean()),
    }


def grpo_loss(bed: Testbed, problems: list[Problem], n: int, seed: int) -> tuple[Tensor | None, dict]:
    """On-policy GRPO: -A log pi(y_t), token mean; None when every group is all-equal (no gradient)."""
    tokens, rewards = sample(bed, "policy", problems, n, seed)  # (P, n)
    adv = ((rewards - rewards.mean(1, keepdim=True)) / (rewards.std(1, keepdim=True) + 1e-6)).view(-1)  # (B,)
    stats = {"train_reward": float(rewards.mean()), **group_stats(rewards)}
    if not adv.any():
        return None, stats
    prompts = bed.prompt_ids("policy", [p for p in problems for _ in range(n)])
    logp, mask = response_logprobs(bed.policy, prompts, tokens)  # (B, T), (B, T)
    return -(adv.unsqueeze(-1) * logp * mask).sum() / mask.sum(), stats


def imitation_loss(bed: Testbed, problems: list[Problem], n: int, seed: int) -> tuple[Tensor | None, dict]:
    """Reward-filtered imitation: the teacher's correct samples, learned under the policy's prompt (token-mean NLL)."""
    if bed.teacher is None:
        raise ValueError(
            "the imitation arm needs a teacher: --models must hold teacher/ (or drop imitation from --arms)"
        )
    tokens, rewards = sample(bed, "teacher", problems, n, seed)  # (P, n)
    rows = [p for p in problems for _ in range(n)]
    keep = [i for i, r in enumerate(rewards.view(-1).tolist()) if r == 1.0]
    stats = {"teacher_sample_acc": float(rewards.mean()), "kept": len(keep)}
    if not keep:
        return None, stats
    prompts = bed.prompt_ids("policy", [rows[i] for i in keep])
    logp, mask = response_logprobs(bed.policy, prompts, [tokens[i] for i in keep])  # (K, T)
    return -(logp * mask).sum() / mask.sum(), stats


def supervised_loss(bed: Testbed, problems: list[Problem], n: int, seed: int) -> tuple[Tensor, dict]:
    """NLL of the true completions under the policy's prompt (token mean; n copies of a row weigh as one)."""
    responses = [bed.tokenizer.encode(bed.form.completion_text(p)) for p in problems]
    logp, mask = response_logprobs(bed.policy, bed.prompt_ids("policy", problems), responses)  # (P, T), (P, T)
    return -(logp * mask).sum() / mask.sum(), {}


LOSSES = {"imitation": imitation_loss, "grpo": grpo_loss, "supervised": supervised_loss}


def train_arm(bed: Testbed, arm: str, lr: float, steps: int, seed: int, eval_every: int, batch: int, n: int):
    """`steps` updates of `arm` (a key of LOSSES) from the start policy; yields one log row per step."""
    loss_fn = LOSSES[arm]
    optimizer = torch.optim.AdamW(bed.policy.parameters(), lr=lr, weight_decay=0.01)
    train = make_problems(batch * steps, seed=seed, n_digits=bed.n_digits, split="train")
    start = time.perf_counter()
    for step in range(steps + 1):
        row = {"arm": arm, "lr": lr, "seed": seed, "step": step, "batch": batch, "n": n}
        if step:
            bed.policy.train()
            loss, stats = loss_fn(bed, train[batch * (step - 1) : batch * step], n, seed * 100_003 + step)
            if loss is not None:
                optimizer.zero_grad()
                loss.backward()
                torch.nn.utils.clip_grad_norm_(bed.policy.parameters(), 1.0)
                optimizer.step()
            bed.policy.eval()
            row |= stats
        if step % eval_every == 0 or step == steps:
            row["greedy_acc"] = bed.accuracy()
        row["seconds"] = round(time.perf_counter() - start, 2)
        yield row


def start_check(bed: Testbed, n: int, seed: int) -> dict:
    """(a): greedy accuracy and the group statistics of n temperature-1 samples per held-out problem."""
    _, rewards = sample(bed, "policy", bed.test, n, seed)  # (P, n)
    return {"arm": "start", "seed": seed, "n": n, "n_test": len(bed.test), "greedy_acc": bed.accuracy(),
            **group_stats(rewards)}  # fmt: skip


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", default="carry", choices=sorted(TASK_MODELS))
    parser.add_argument("--models", default=None, help="a folder with policy/, teacher/ (default: the task's cache)")
    parser.add_argument("--policy", default=None, help="start from this HF checkpoint instead of the folder's policy")
    parser.add_argument("--arms", default=",".join(ARMS), help=f"comma-separated, from {ARMS}")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--lr-imitation", type=float, default=3e-4)
    parser.add_argument("--lr-grpo", type=float, default=1e-4)
    parser.add_argument("--lr-supervised", type=float, default=3e-4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--eval-every", type=int, default=25)
    parser.add_argument("--n-test", type=int, default=256)
    parser.add_argument("--batch", type=int, default=16, help="prompts per step")
    parser.add_argument("--n", type=int, default=8, help="samples per prompt")
    parser.add_argument("--out", default="guided_precheck.jsonl")
    args = parser.parse_args(argv)
    arms = args.arms.split(",")
    if unknown := sorted(set(arms) - set(ARMS)):
        raise ValueError(f"--arms must name arms from {ARMS}, got {unknown}")
    torch.set_num_threads(1)
    torch.manual_seed(args.seed)
    lrs = {"imitation": args.lr_imitation, "grpo": args.lr_grpo, "supervised": args.lr_supervised}
    with open(args.out, "a") as f:
        for arm in arms:
            bed = load_testbed(args.task, args.n_test, args.models, args.policy)  # every arm from the same start
            rows = [start_check(bed, args.n, args.seed)] if arm == "start" else train_arm(
                bed, arm, lrs[arm], args.steps, args.seed, args.eval_every, args.batch, args.n)  # fmt: skip
            for row in rows:
                f.write(json.dumps({"task": args.task, **row}) + "\n")
                f.flush()
                if "greedy_acc" in row:
                    print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
