"""The synthetic tasks of the demo and the experiments: multi-digit addition with a verifiable answer (`addition`,
the demo's) or with a worked answer that writes each carry (`carry`, the guided testbed), a character-level
tokenizer with a chat template, and a tiny Qwen3 teacher/policy pair per task trained on it (cached).

    from recipe.optimal_sampling.tasks import load_task_models, make_problems, policy_prompt, teacher_prompt
    task = load_task_models()                        # trains once (~5 CPU-minutes), then reads the cache
    carry = load_task_models(task="carry")           # the guided testbed's pair (see models.TASK_MODELS)
    problems = make_problems(200, seed=0, split="test")
    policy_ids = task.tokenizer(policy_prompt(problems[0].question))["input_ids"]
    teacher_ids = task.tokenizer(teacher_prompt(problems[0].question, task.tokenizer))["input_ids"]

Knows nothing about the sampler, the mixture or verl.
"""

from recipe.optimal_sampling.tasks.addition import (
    ROLES,
    SPLITS,
    Problem,
    answer_text,
    completion_text,
    extract_answer,
    is_test_pair,
    make_problems,
    policy_prompt,
    prompt,
    reward,
    teacher_messages,
    teacher_prompt,
)
from recipe.optimal_sampling.tasks.cache import CACHE_ENV, TaskModels, default_cache_dir, load_task_models
from recipe.optimal_sampling.tasks.evaluate import greedy_accuracy, greedy_generate, role_accuracy
from recipe.optimal_sampling.tasks.models import (
    DEFAULT_TRAIN_CONFIGS,
    MODEL_SIZES,
    TASK_MODELS,
    TrainConfig,
    TrainResult,
    tiny_qwen3_config,
    train_model,
)
from recipe.optimal_sampling.tasks.registry import ADDITION, CARRY, TASKS, TaskFormat, get_task
from recipe.optimal_sampling.tasks.tokenizer import (
    CHAT_TEMPLATE,
    EOS_TOKEN,
    IM_END_TOKEN,
    IM_START_TOKEN,
    PAD_TOKEN,
    STOP_TOKENS,
    build_tokenizer,
    stop_token_ids,
)

__all__ = [
    "ADDITION",
    "CACHE_ENV",
    "CARRY",
    "CHAT_TEMPLATE",
    "DEFAULT_TRAIN_CONFIGS",
    "EOS_TOKEN",
    "IM_END_TOKEN",
    "IM_START_TOKEN",
    "MODEL_SIZES",
    "PAD_TOKEN",
    "ROLES",
    "SPLITS",
    "STOP_TOKENS",
    "TASKS",
    "TASK_MODELS",
    "Problem",
    "TaskFormat",
    "TaskModels",
    "TrainConfig",
    "TrainResult",
    "answer_text",
    "build_tokenizer",
    "completion_text",
    "default_cache_dir",
    "extract_answer",
    "get_task",
    "greedy_accuracy",
    "greedy_generate",
    "is_test_pair",
    "load_task_models",
    "make_problems",
    "policy_prompt",
    "prompt",
    "reward",
    "role_accuracy",
    "stop_token_ids",
    "teacher_messages",
    "teacher_prompt",
    "tiny_qwen3_config",
    "train_model",
]
