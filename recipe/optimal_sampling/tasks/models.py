"""Tiny Qwen3 models trained from scratch on a task: a strong teacher and a weak policy.

Owns: each task's two model sizes and train configs (`TASK_MODELS`: "addition", the demo's pair, and "carry", the
guided testbed) and the training recipe (`TrainConfig`, `train_model`); the on-disk cache of the trained pairs
(`load_task_models`, one folder per task) is `cache.py`. The teacher learns from chat-template prompts, the policy
from the plain prompt; both learn the same completion (the task's answer + `<eos>`, see `addition.py` and
`carry.py`), with the loss on the completion tokens only. The rest of this docstring describes the addition pair;
the carry pair is described next to `CARRY_TRAIN_CONFIGS`.

Training is portable (`portable.py`: float64 arithmetic, PCG64 initialisation, weights and optimizer moments
snapped to a grid after every step): the same configs give bit-identical weights on any machine, whatever its CPU,
thread count, torch or transformers version. A check on `n_eval` held-aside *train-split* problems runs every
`eval_every` steps (the test split is never looked at); with a `target_accuracy`, training stops at the first check
at or past the target and keeps the check closest to it. Tiny models learn addition in sudden jumps after
plateaus, so the first check past the target can overshoot it by tens of points (13% -> 69% between two checks 25
steps apart was seen): the policy is checked every 5 steps on 400 problems and the check before a jump is kept
when it is closer. The teacher trains until it is right (~98%), the policy until it is weak (~15%). The policy is
also small (2 layers of width 32): before its jump it sits on a plateau (most digits right, not the carries).

Measured with the default configs (test = make_problems(200, seed=0, split="test"), greedy decoding), identical on
both machines below, weights included (meta.json's `weights_sha256`):
    teacher  3 layers x 48, 86k params: 1,100 steps, keeps step 1,000 (check 97.5%), test accuracy 96.5%
    policy   2 layers x 32, 27k params: 1,505 steps, keeps step 1,475, test accuracy 10.0%
    - the project's 2-core CPU machine (torch 2.13 CPU, transformers 5.10), shared with other jobs: 578 s;
    - the GPU host's CPU (Intel Xeon, torch 2.11+cu130, transformers 5.17): 257 s of training, 277 s for the
      whole `optimal-sampling demo` (one core each).
One torch thread per model: tiny steps lose time to intra-op threading (the thread count does not change the
weights). Command: `python -m recipe.optimal_sampling.tasks --retrain` (trains, saves and evaluates; prints
meta.json).

Knows nothing about the sampler, the mixture or verl.
"""

import contextlib
import math
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace

import torch
from torch import Tensor
from tqdm.auto import tqdm
from transformers import (
    PreTrainedTokenizerBase,
    Qwen3Config,
    Qwen3ForCausalLM,
)

from recipe.optimal_sampling.tasks.addition import ROLES, Problem, make_problems, prompt
from recipe.optimal_sampling.tasks.evaluate import role_accuracy
from recipe.optimal_sampling.tasks.portable import PortableQwen3
from recipe.optimal_sampling.tasks.registry import ADDITION, TaskFormat, get_task

# Per-role sizes: the teacher has 3 layers of width 48, the policy 2 layers of width 32.
MODEL_SIZES: dict[str, dict[str, int]] = {
    "teacher": dict(hidden_size=48, intermediate_size=144, num_hidden_layers=3, head_dim=12),
    "policy": dict(hidden_size=32, intermediate_size=96, num_hidden_layers=2, head_dim=8),
}
VAL_SEED_OFFSET = 10**12  # validation problems use seed VAL_SEED_OFFSET + cfg.seed, far from any batch seed


def check_role(role: str) -> None:
    """Raise a ValueError unless `role` is "policy" or "teacher"."""
    if role not in ROLES:
        raise ValueError(f"role must be one of {ROLES}, got {role=!r}")


def tiny_qwen3_config(
    vocab_size: int, role: str, pad_token_id: int = 0, eos_token_id: int = 1, task: str = "addition"
) -> Qwen3Config:
    """A tiny `Qwen3Config` for `role` of `task` (see TASK_MODELS): 4 heads, 2 KV heads, 128 positions, tied
    embeddings."""
    check_role(role)
    sizes = task_models_spec(task).sizes[role]
    if vocab_size < 2:
        raise ValueError(f"vocab_size must be >= 2, got {vocab_size=}")
    return Qwen3Config(
        vocab_size=vocab_size,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        tie_word_embeddings=True,
        pad_token_id=pad_token_id,
        eos_token_id=eos_token_id,
        bos_token_id=None,
        # Pinned rather than left to the transformers version's defaults (the portable trainer reads the same values).
        hidden_act="silu",
        attention_bias=False,
        rms_norm_eps=1e-6,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        **sizes,
    )


@dataclass(frozen=True)
class TrainConfig:
    """How one model is trained: AdamW, linear warmup then cosine decay to 10% of `lr` over `steps`."""

    steps: int = field(metadata={"help": "maximum optimizer steps (fewer when target_accuracy is reached)"})
    seed: int = field(default=0, metadata={"help": "seeds the weights and the training problems"})
    batch_size: int = field(default=64, metadata={"help": "problems per step (fresh train-split draws)"})
    lr: float = field(default=5e-3, metadata={"help": "peak learning rate"})
    weight_decay: float = field(default=0.01, metadata={"help": "AdamW weight decay"})
    warmup_steps: int = field(default=50, metadata={"help": "linear warmup steps"})
    n_digits: int = field(default=3, metadata={"help": "digits per operand"})
    target_accuracy: float | None = field(default=None, metadata={"help": "stop once validation acc >= this"})
    eval_every: int = field(default=100, metadata={"help": "steps between validation checks"})
    n_eval: int = field(default=200, metadata={"help": "validation problems (train split, own seed stream)"})
    num_threads: int = field(default=1, metadata={"help": "torch threads; tiny models lose time to threading"})

    def __post_init__(self):
        for name in ("steps", "batch_size", "n_digits", "eval_every", "n_eval", "num_threads"):
            if getattr(self, name) < 1:
                raise ValueError(f"TrainConfig.{name} must be >= 1, got {getattr(self, name)}")
        if not self.lr > 0:
            raise ValueError(f"TrainConfig.lr must be > 0, got {self.lr}")
        if self.warmup_steps < 0:
            raise ValueError(f"TrainConfig.warmup_steps must be >= 0, got {self.warmup_steps}")
        if self.target_accuracy is not None and not 0 < self.target_accuracy <= 1:
            raise ValueError(f"TrainConfig.target_accuracy must be in (0, 1] or None, got {self.target_accuracy}")


DEFAULT_TRAIN_CONFIGS: dict[str, TrainConfig] = {
    "teacher": TrainConfig(steps=2000, seed=0, lr=5e-3, target_accuracy=0.98, eval_every=100),
    "policy": TrainConfig(steps=3000, seed=1, lr=3e-3, target_accuracy=0.15, eval_every=5, n_eval=400),
}


# The carry testbed (`carry.py`, 5-digit operands, 11-token worked answers): every head 16 or 32 wide, so the fast
# CUDA-graph engine runs both (`engine.fast.model.unsupported_reason`). The teacher trains until it is right; the
# policy stops at the validation check closest to 3%, checked every 5 steps on 500 problems: this shape learns the
# worked format in one sharp jump, and the check just before it is a policy that rarely succeeds. Measured (portable
# trainer, docs/experiments/guided/README.md): 0% until step 205, 2.0/2.4/5.2% at steps 370/375/380, kept step 375;
# 1.6% greedy and pass@8 6.6% on held-out problems; learning the true answers gains only ~10 points in 200 steps.
CARRY_MODEL_SIZES: dict[str, dict[str, int]] = {
    "teacher": dict(hidden_size=128, intermediate_size=384, num_hidden_layers=3, head_dim=32),
    "policy": dict(hidden_size=64, intermediate_size=192, num_hidden_layers=2, head_dim=16),
}
CARRY_TRAIN_CONFIGS: dict[str, TrainConfig] = {
    "teacher": TrainConfig(steps=3000, seed=0, lr=3e-3, n_digits=5, target_accuracy=0.97, eval_every=50, n_eval=400),
    "policy": TrainConfig(steps=4000, seed=1, lr=3e-3, n_digits=5, target_accuracy=0.03, eval_every=5, n_eval=500),
}


@dataclass(frozen=True)
class TaskModelsSpec:
    """What a task's pair is: its completion format, per-role model sizes and train configs, its cache folder."""

    format: TaskFormat
    sizes: dict[str, dict[str, int]]
    train_configs: dict[str, TrainConfig]
    cache_name: str  # the folder under the cache root


CACHE_NAME = "task_models_v2"  # the addition pair's cache folder
TASK_MODELS: dict[str, TaskModelsSpec] = {
    "addition": TaskModelsSpec(ADDITION, MODEL_SIZES, DEFAULT_TRAIN_CONFIGS, CACHE_NAME),
    "carry": TaskModelsSpec(get_task("carry"), CARRY_MODEL_SIZES, CARRY_TRAIN_CONFIGS, "carry_models_v1"),
}


def task_models_spec(task: str) -> TaskModelsSpec:
    """The pair of `task` ("addition" or "carry"); a ValueError naming the known tasks otherwise."""
    get_task(task)  # raises on an unknown name
    if task not in TASK_MODELS:
        raise ValueError(f"task {task!r} has no trained models: use one of {sorted(TASK_MODELS)}")
    return TASK_MODELS[task]


def policy_config(target_accuracy: float | None = None, task: str = "addition") -> TrainConfig | None:
    """`task`'s policy training settings with another early-stopping accuracy (None: the defaults, as `None` means
    to `load_task_models`). A weaker policy makes a harder RL start: e.g. 0.03."""
    if target_accuracy is None:
        return None
    return replace(task_models_spec(task).train_configs["policy"], target_accuracy=target_accuracy)


@dataclass
class TrainResult:
    """What `train_model` returns: the model (eval mode, CPU, float32) and how training went."""

    model: Qwen3ForCausalLM
    losses: list[float]  # one per step
    val_accuracy: list[tuple[int, float]]  # (step, accuracy) at every validation check
    steps: int  # steps run (< cfg.steps when the target was reached)
    seconds: float  # wall time of training, validation checks included
    selected_step: int  # the step whose weights `model` holds: the check closest to the target
    selected_accuracy: float  # its validation accuracy


@contextlib.contextmanager
def torch_threads(num_threads: int) -> Iterator[None]:
    """Run the block under `torch.set_num_threads(num_threads)`, then restore the previous count."""
    previous = torch.get_num_threads()
    torch.set_num_threads(num_threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def encode_examples(
    problems: Sequence[Problem], role: str, tokenizer: PreTrainedTokenizerBase, task: TaskFormat = ADDITION
) -> tuple[Tensor, Tensor]:
    """Prompt + completion ids (`task`'s completion), right-padded, and labels that are -100 except on the completion.

    Returns input_ids (B, T) int64 and labels (B, T) int64. Right padding needs no attention mask in a
    causal model: pads only follow the real tokens, and their labels are ignored."""
    rows, labels = [], []
    for problem in problems:
        prompt_ids = tokenizer.encode(prompt(role, problem.question, tokenizer), add_special_tokens=False)
        completion_ids = tokenizer.encode(task.completion_text(problem), add_special_tokens=False)
        rows.append(prompt_ids + completion_ids)
        labels.append([-100] * len(prompt_ids) + completion_ids)
    width = max(len(r) for r in rows)
    input_ids = torch.tensor([r + [tokenizer.pad_token_id] * (width - len(r)) for r in rows])  # (B, T)
    label_ids = torch.tensor([r + [-100] * (width - len(r)) for r in labels])  # (B, T)
    return input_ids, label_ids


def lr_factor(step: int, cfg: TrainConfig) -> float:
    """Multiplier of the peak lr at `step`: linear warmup over `warmup_steps`, then cosine down to 0.1."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps))
    return 0.1 + 0.45 * (1 + math.cos(math.pi * progress))


def batch_seed(seed: int, step: int) -> int:
    """The `make_problems` seed of training step `step` (1-based) of a run seeded `seed`."""
    return seed * 1_000_003 + step - 1


def new_model(role: str, tokenizer: PreTrainedTokenizerBase, seed: int, task: str = "addition") -> Qwen3ForCausalLM:
    """A freshly initialised (seeded, portable: see `portable.py`) tiny float32 Qwen3 for `role` of `task`, sized for
    `tokenizer`."""
    return new_portable_model(role, tokenizer, seed, task).to_hf()


def new_portable_model(
    role: str, tokenizer: PreTrainedTokenizerBase, seed: int, task: str = "addition"
) -> PortableQwen3:
    """The float64 training form of `new_model`."""
    check_role(role)
    config = tiny_qwen3_config(len(tokenizer), role, tokenizer.pad_token_id, tokenizer.eos_token_id, task)
    return PortableQwen3(config, seed)


@dataclass
class _Checkpoint:
    """The training state kept by the stop rule: the check closest to the target accuracy so far."""

    step: int
    accuracy: float
    weights: list[Tensor]


def closer_to_target(accuracy: float, best: "_Checkpoint | None", target: float | None) -> bool:
    """Whether a check at `accuracy` beats `best`: closer to `target` (ties: the earlier check wins); with no
    target every later check wins (the last one is kept)."""
    if best is None or target is None:
        return True
    return abs(accuracy - target) < abs(best.accuracy - target)


def train_model(
    role: str,
    tokenizer: PreTrainedTokenizerBase,
    cfg: TrainConfig,
    progress: bool = True,
    task: str = "addition",
    device: str | torch.device = "cpu",
) -> TrainResult:
    """Train a fresh tiny Qwen3 for `role` on `task` ("addition" or "carry": its model sizes and completion format);
    the same weights for the same `cfg` on any machine.

    Training runs in float64 with portable arithmetic (`portable.py`) on `device` (a CUDA GPU gives the CPU's
    weights, faster); `cfg.num_threads` changes the speed, not the weights. With a target, training stops at the
    first check at or above it and returns the checked model closest to it (the check before a jump may be closer
    than the first check past it)."""
    check_role(role)
    form = task_models_spec(task).format
    start = time.perf_counter()
    with torch_threads(cfg.num_threads):
        # 1) model, optimizer, schedule, validation problems
        model = new_portable_model(role, tokenizer, cfg.seed, task).to(device).train()
        optimizer = torch.optim.AdamW(
            model.parameters(), lr=cfg.lr, betas=(0.9, 0.98), weight_decay=cfg.weight_decay, foreach=False
        )
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, cfg))
        val_problems = make_problems(cfg.n_eval, seed=VAL_SEED_OFFSET + cfg.seed, n_digits=cfg.n_digits)
        # 2) steps on fresh train-split problems, a validation check every `eval_every` steps
        losses: list[float] = []
        val_accuracy: list[tuple[int, float]] = []
        best: _Checkpoint | None = None
        bar = tqdm(range(1, cfg.steps + 1), desc=f"train {role}", disable=not progress, mininterval=1.0)
        for step in bar:
            problems = make_problems(cfg.batch_size, seed=batch_seed(cfg.seed, step), n_digits=cfg.n_digits)
            input_ids, labels = encode_examples(problems, role, tokenizer, form)  # (B, T), (B, T)
            loss = model(input_ids=input_ids.to(device), labels=labels.to(device)).loss
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0, foreach=False)
            optimizer.step()
            schedule.step()
            model.snap_(optimizer)
            losses.append(loss.item())
            if step % cfg.eval_every == 0 or step == cfg.steps:
                accuracy = role_accuracy(model, tokenizer, role, val_problems, form)
                val_accuracy.append((step, accuracy))
                bar.set_postfix(loss=f"{losses[-1]:.3f}", val_acc=f"{accuracy:.3f}")
                # 3) keep the check closest to the target; stop at the first check at or past it
                if closer_to_target(accuracy, best, cfg.target_accuracy):
                    best = _Checkpoint(step, accuracy, model.state_copy())
                if cfg.target_accuracy is not None and accuracy >= cfg.target_accuracy:
                    break
        bar.close()
        assert best is not None, "the last step is always checked"
        model.load_copy(best.weights)
    return TrainResult(
        model.to_hf(), losses, val_accuracy, len(losses), time.perf_counter() - start, best.step, best.accuracy
    )
