"""CPU pilot for choosing the experiment's learning rate and step count. NOT the experiment and NOT verl: a minimal
GRPO loop in plain PyTorch with the experiment's settings (16 prompts x 8 responses, 8 tokens, token-mean loss,
w = min(pi_old / q*, C) with pi_old = pi_theta (one update per step), AdamW with weight decay 0.01, grad clip 1.0),
sampling with the real `DualSampler` under each arm's SamplerConfig and scoring the policy alone greedily on the
held-out problems (`mixed_*` arms: k of each prompt's n responses from q*, the rest from the policy alone). Its
numbers say whether a learning rate moves the policy within the planned steps; the reported
results come from the verl runs (run_all.sh) only.

How guided samples enter the loss is the verl estimator's own code: `advantages` calls
`loss.guided_token_advantages` with a `GuidedLossConfig` built from the `--mode`, `--baseline`, `--critic-*` and
`--fade-*` flags (the keys of the trainer config's `guided_loss` block), and policy-only responses are scored by the
teacher with `engine.scoring.teacher_logprobs` when the critic reads them, as the dual server does with
`score_policy_samples`. The `opd` arm is on-policy distillation: policy-only samples, critic_coef 1 unless given.

    python scripts/experiments/pilot_cpu.py --lrs 1e-4,2e-4 --steps 40 --seed 0 --out pilot.jsonl
    python scripts/experiments/pilot_cpu.py --arms balanced --mode imitation --steps 40 --out pilot.jsonl
    python scripts/experiments/pilot_cpu.py --arms mixed_1of8 --baseline policy --critic-coef 0.1 --out pilot.jsonl
"""

import argparse
import json
import time
from types import SimpleNamespace

import torch
from torch import Tensor

from recipe.optimal_sampling.engine import DualSampler, SamplerConfig
from recipe.optimal_sampling.engine.policy_only import POLICY_ONLY, ignores_teacher
from recipe.optimal_sampling.engine.scoring import response_logprobs, teacher_logprobs
from recipe.optimal_sampling.loss import GuidedLossConfig, faded_guided_per_prompt, guidance_scale
from recipe.optimal_sampling.loss import guided_token_advantages as loss_advantages
from recipe.optimal_sampling.tasks import (
    greedy_accuracy,
    load_task_models,
    make_problems,
    policy_prompt,
    stop_token_ids,
    teacher_prompt,
)
from recipe.optimal_sampling.tasks.cache import default_cache_dir
from recipe.optimal_sampling.tasks.models import policy_config
from recipe.optimal_sampling.tasks.registry import ADDITION, TaskFormat, get_task

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
    "opd": POLICY_ONLY,  # + ARM_LOSS: the teacher as a dense critic on the policy's own samples
}
MIXED = {"mixed_1of8": 1, "mixed_4of8": 4}  # guided_per_prompt: the other responses come from pi_theta alone
ARM_LOSS = {"opd": {"critic_coef": 1.0}}  # guided_loss defaults of an arm; the command-line flags win


def advantages(
    r: Tensor,
    n: int,
    guided: Tensor,
    mask: Tensor,
    logp_teacher: Tensor,
    logp_policy: Tensor,
    loss,
    step: int,
    guidance: float = 1.0,
) -> Tensor:
    """Per-token advantages (B, T) of one step's responses, prompt-major (n per prompt), by the verl estimator's
    function (`optimal_sampling_guided`, verl's norm_adv_by_std_in_grpo=true). r, guided: (B,); the rest (B, T)."""
    group = torch.arange(len(r) // n, device=r.device).repeat_interleave(n)  # (B,)
    return loss_advantages(r, group, guided, mask, loss, step, logp_teacher, logp_policy, guidance)  # (B, T)


def padded(rows: list[list[float]], T: int, fill: float = 0.0, device="cpu") -> Tensor:
    out = torch.full((len(rows), T), fill, device=device)  # (B, T)
    for i, row in enumerate(rows):
        out[i, : len(row)] = torch.tensor(row, dtype=torch.float32)
    return out


def grpo_step(
    policy, optimizer, samplers, tok, problems, n: int, seed: int, threshold: float, guided=None, loss=None, step=1,
    guidance=1.0, form: TaskFormat = ADDITION, max_new_tokens: int = 8,
) -> dict:  # fmt: skip
    """One GRPO step with token-level truncated IS; returns the training reward, the mean IS weight and the policy's
    own mean reward. samplers: (q* sampler, policy-only sampler); guided: None (all n responses from q*) or k (the
    first k of each prompt's n from q*, the rest from the policy: mixed groups); loss: a GuidedLossConfig (None =
    verl's GRPO); guidance: the fade's scale (fewer guided members, and a lower critic with fade_critic)."""
    loss = loss or GuidedLossConfig()
    k = n if guided is None else guided
    k = faded_guided_per_prompt(k, guidance) if loss.fades else k
    # 1) n responses per prompt from q* (or k from q* and n - k from the policy)
    group = [p for p in problems for _ in range(n)]
    policy_ids = [tok(policy_prompt(p.question), add_special_tokens=False)["input_ids"] for p in group]
    teacher_ids = [tok(teacher_prompt(p.question, tok), add_special_tokens=False)["input_ids"] for p in group]
    guided_arm = not ignores_teacher(samplers[0].config)  # on_policy, opd: q* = pi_theta, nothing is guided
    from_q = [guided_arm and i % n < k for i in range(len(group))]
    sample = sample_groups(samplers, policy_ids, teacher_ids, from_q, seed, max_new_tokens)
    if loss.critic_on and loss.critic_rows != "guided":  # the server's score_policy_samples: one teacher prefill
        score_policy_rows(samplers[0].teacher, teacher_ids, sample, from_q)
    # 2) advantages by the verl estimator's function
    logp, mask = response_logprobs(policy, policy_ids, sample.token_ids)  # (B, T) each
    T, device = logp.shape[1], logp.device
    rewards = [form.reward(p, tok.decode(y)) for p, y in zip(group, sample.token_ids, strict=True)]
    r = torch.tensor(rewards, device=device)  # (B,)
    logq = padded(sample.logp_q, T, device=device)  # (B, T)
    guided_rows = torch.tensor(from_q, device=device)  # (B,)
    logp_teacher = padded(sample.logp_teacher, T, float("nan"), device)  # (B, T)
    adv = advantages(r, n, guided_rows, mask, logp_teacher, logp.detach(), loss, step, guidance)  # (B, T)
    # 3) token-mean loss -A_t w ratio, ratio = pi_theta / pi_old = 1 with the gradient of log pi_theta
    w = (logp.detach() - logq).exp().clamp(max=threshold) * mask  # (B, T)
    ratio = (logp - logp.detach()).exp()  # (B, T)
    objective = -(adv * w * ratio * mask).sum() / mask.sum()
    optimizer.zero_grad()
    objective.backward()
    torch.nn.utils.clip_grad_norm_(policy.parameters(), 1.0)
    optimizer.step()
    own = r[~guided_rows]
    return {
        "train_reward": float(r.mean()),
        "is_weight_mean": float(w.sum() / mask.sum()),
        "policy_reward": float(own.mean()) if own.numel() else None,
        "guided_per_prompt": k if guided_arm else 0,
    }


def score_policy_rows(teacher, teacher_ids: list[list[int]], sample: SimpleNamespace, from_q: list[bool]) -> None:
    """log pi_t(y_t) of the policy-only responses by one teacher prefill (`engine.scoring`, as the dual server)."""
    rows = [i for i, q in enumerate(from_q) if not q]
    if rows:
        scores = teacher_logprobs(teacher, [teacher_ids[i] for i in rows], [sample.token_ids[i] for i in rows])
        for i, row in zip(rows, scores, strict=True):
            sample.logp_teacher[i] = row


def sample_groups(
    samplers, policy_ids, teacher_ids, from_q: list[bool], seed: int, max_new_tokens: int = 8
) -> SimpleNamespace:
    """Responses from q* where `from_q`, else from the policy alone; lists of token ids, log q* and log pi_t."""
    token_ids, logp_q, logp_teacher = ([None] * len(from_q) for _ in range(3))
    for sampler, want in zip(samplers, (True, False), strict=True):
        rows = [i for i, q in enumerate(from_q) if q == want]
        if rows:
            prompts = [policy_ids[i] for i in rows], [teacher_ids[i] for i in rows]
            part = sampler.generate(*prompts, max_new_tokens, seed=seed)
            for j, i in enumerate(rows):
                token_ids[i], logp_q[i] = part.token_ids[j], part.logp_q[j]
                logp_teacher[i] = part.logp_teacher[j] if want else [float("nan")] * len(part.token_ids[j])
    return SimpleNamespace(token_ids=token_ids, logp_q=logp_q, logp_teacher=logp_teacher)


def arm_loss(arm: str, overrides: dict | None = None) -> GuidedLossConfig:
    """The arm's GuidedLossConfig (ARM_LOSS, then `overrides`), refused early when it contradicts the arm's sampling
    (the pilot's counterpart of verl/guided.py:check_guided_loss)."""
    loss = GuidedLossConfig.from_mapping({**ARM_LOSS.get(arm, {}), **(overrides or {})})
    if ignores_teacher(ARMS[arm]) and (loss.mode != "grpo" or loss.baseline != "group" or loss.critic_rows == "guided"):
        raise ValueError(
            f"arm {arm} samples nothing with the teacher: --mode {loss.mode} / --baseline {loss.baseline} / "
            f"--critic-rows {loss.critic_rows} would act on no response; use an arm with guided responses"
        )
    if loss.baseline == "policy" and arm not in MIXED:
        raise ValueError(f"--baseline policy needs the policy's own members in a group: use a mixed_* arm, not {arm}")
    return loss


def run(
    arm: str, lr: float, steps: int, seed: int, eval_every: int, n_test: int, batch=16, n=8, policy_target=None,
    loss_overrides: dict | None = None, task: str = "addition", device: str = "cpu", sink=None,
):  # fmt: skip
    """One arm from the cached task checkpoints: a GRPO step per step, greedy held-out accuracy every eval_every.
    policy_target: a policy stopped at this validation accuracy (its own cache next to the default one);
    loss_overrides: keys of the `guided_loss` block (see GuidedLossConfig); task: "addition" or "carry" (the guided
    testbed); device: where the models run (the samplers use the reference HF loop, which reads the policy's
    weights as they train); sink: a file each row is written to (and flushed) as soon as it exists."""
    loss = arm_loss(arm, loss_overrides)  # before loading anything
    form = get_task(task)
    cache = None if policy_target is None else default_cache_dir(task).with_name(f"{task}_policy_{policy_target:g}")
    models = load_task_models(cache, policy_cfg=policy_config(policy_target, task), progress=False, task=task)
    policy, teacher, tok = models.policy.float().to(device), models.teacher.float().to(device), models.tokenizer
    stops = tuple(stop_token_ids(tok))
    samplers = tuple(
        DualSampler(
            policy, teacher, c.replace(stop_token_ids=stops), tokenizer=tok, teacher_tokenizer=tok, backend="reference"
        )
        for c in (ARMS[arm], POLICY_ONLY)
    )
    optimizer = torch.optim.AdamW(policy.parameters(), lr=lr, weight_decay=0.01)
    max_new_tokens = form.max_new_tokens(models.n_digits)
    train = make_problems(batch * steps, seed=seed, n_digits=models.n_digits, split="train")
    test = make_problems(n_test, seed=0, n_digits=models.n_digits, split="test")
    test_prompts = [policy_prompt(p.question) for p in test]
    log, start, own_reward = [], time.perf_counter(), None
    changed = loss.changed()
    for step in range(steps + 1):
        row = {"arm": arm, "lr": lr, "seed": seed, "step": step, "batch": batch, "n": n, "task": task}
        if policy_target is not None:
            row["policy_target"] = policy_target
        if changed:
            row["guided_loss"] = changed
        if step:
            problems = train[batch * (step - 1) : batch * step]
            guidance = guidance_scale(own_reward, step, loss.fade_reward_threshold, loss.fade_end_step)
            row |= grpo_step(
                policy, optimizer, samplers, tok, problems, n, seed * 10_000 + step, 2.0, MIXED.get(arm), loss, step,
                guidance, form, max_new_tokens,
            )  # fmt: skip
            row["guidance"], own_reward = guidance, row["policy_reward"]
        if step % eval_every == 0:
            row["val_acc"] = greedy_accuracy(policy, tok, test_prompts, test, task=form)
        row["seconds"] = round(time.perf_counter() - start, 2)
        log.append(row)
        if sink is not None:
            sink.write(json.dumps(row) + "\n")
            sink.flush()
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
    parser.add_argument("--task", default="addition", help="addition (the demo's pair) or carry (the guided testbed)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (the GPU host runs many pilots side by side)")
    add_loss_flags(parser)
    args = parser.parse_args(argv)
    get_task(args.task)  # an unknown task is refused before any run
    overrides = {k: getattr(args, k) for k in LOSS_FLAGS if getattr(args, k) is not None}
    for arm in args.arms.split(","):
        arm_loss(arm, overrides)  # every arm's settings refused before the first run
    torch.set_num_threads(1)
    with open(args.out, "a") as f:
        for lr in (float(x) for x in args.lrs.split(",")):
            for arm in args.arms.split(","):
                log = run(
                    arm, lr, args.steps, args.seed, args.eval_every, args.n_test, args.batch, args.n,
                    args.policy_target_accuracy, overrides, args.task, args.device, sink=f,
                )  # fmt: skip
                curve = " ".join(f"{r['step']}:{r['val_acc']:.3f}" for r in log if "val_acc" in r)
                print(f"{arm:<16} lr={lr:g} {curve}  ({log[-1]['seconds']:.0f} s)", flush=True)


LOSS_FLAGS = {  # guided_loss key -> (type, help); a flag left out keeps the arm's default (ARM_LOSS, then GRPO's)
    "mode": (str, "grpo | positive_only | imitation: the advantage of guided responses"),
    "baseline": (str, "group | policy: the group baseline over all members or the policy's own"),
    "imitation_value": (float, "mode imitation: A of a correct guided response (default: its reward)"),
    "critic_coef": (float, "beta of the teacher critic A_t += beta (log pi_t - log pi_theta); 0 = off"),
    "critic_schedule": (str, "constant | linear | cosine"),
    "critic_end_step": (int, "linear/cosine: the step where beta reaches 0"),
    "critic_rows": (str, "all | guided | policy: the responses that get the critic"),
    "critic_clip": (float, "clip |log pi_t - log pi_theta| per token"),
    "fade_reward_threshold": (float, "guidance fades to 0 as the policy's own mean reward rises to this"),
    "fade_end_step": (int, "guidance fades linearly to 0 at this step"),
    "fade_critic": (bool, "the fade also scales beta"),
}


def add_loss_flags(parser: argparse.ArgumentParser) -> None:
    """--mode, --baseline, --critic-coef, ...: one flag per key of the trainer config's `guided_loss` block."""
    for key, (kind, help_text) in LOSS_FLAGS.items():
        flag = "--" + key.replace("_", "-")
        if kind is bool:
            parser.add_argument(flag, dest=key, action="store_true", default=None, help=help_text)
        else:
            parser.add_argument(flag, dest=key, type=kind, default=None, help=help_text)


if __name__ == "__main__":
    main()
