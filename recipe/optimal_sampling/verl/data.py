"""A synthetic task in verl's formats: parquet datasets (chat `prompt`, `reward_model.ground_truth`) and the task's
tiny teacher/policy HF checkpoints, for the end-to-end runs.

`python -m recipe.optimal_sampling.verl.data --out DIR [--task addition|carry]` writes DIR/{train,test}.parquet and,
unless they exist, trains and saves DIR/models/{policy,teacher} (minutes on a CPU). The task (default: addition,
the demo's) sets the operands' digits, the `data_source` (which the reward function reads to pick the answer format,
`verl/reward.py`) and the models. Knows nothing about verl's internals.
"""

import argparse
import os

import pandas as pd

from recipe.optimal_sampling.tasks.addition import make_problems, teacher_messages
from recipe.optimal_sampling.tasks.registry import TASKS, get_task

DATA_SOURCE = "optimal_sampling/addition"  # the addition task's; see `TaskFormat.data_source`
POLICY_TEMPLATE = "Q: {prompt}\nA: "  # = tasks.addition.policy_prompt (every task); the teacher uses its chat template


def write_datasets(
    out_dir: str, n_train: int = 512, n_test: int = 64, n_digits: int | None = None, seed: int = 0, task="addition"
) -> dict:
    """DIR/train.parquet and DIR/test.parquet in verl's RLHFDataset layout. Returns their paths.
    n_digits: None means the task's own (3 for addition, 5 for carry)."""
    form = get_task(task)
    n_digits = form.n_digits if n_digits is None else n_digits
    os.makedirs(out_dir, exist_ok=True)
    paths = {}
    for split, n in (("train", n_train), ("test", n_test)):
        rows = [
            {
                "data_source": form.data_source,
                "prompt": teacher_messages(p.question),  # one user turn: "347+285"
                "ability": "arithmetic",
                "reward_model": {"style": "rule", "ground_truth": p.answer},
                "extra_info": {"split": split, "index": i, "task": form.name},
            }
            for i, p in enumerate(make_problems(n, seed=seed, n_digits=n_digits, split=split))
        ]
        paths[split] = os.path.join(out_dir, f"{split}.parquet")
        pd.DataFrame(rows).to_parquet(paths[split])
    return paths


def write_checkpoints(out_dir: str, policy_target_accuracy: float | None = None, task: str = "addition") -> dict:
    """The task's trained tiny teacher/policy pair as HF checkpoints (model + tokenizer), cached under
    DIR/models by `tasks.load_task_models` (trained on the CPU when absent). Returns their paths.
    policy_target_accuracy: stop the policy's training at this validation accuracy instead of the task's default
    (e.g. 0.03 for a policy that almost never answers right)."""
    from recipe.optimal_sampling.tasks import load_task_models
    from recipe.optimal_sampling.tasks.models import policy_config

    policy_cfg = policy_config(policy_target_accuracy, task)
    models = load_task_models(cache_dir=os.path.join(out_dir, "models"), policy_cfg=policy_cfg, task=task)
    return {"policy": str(models.policy_path), "teacher": str(models.teacher_path), "meta": models.meta.get("results")}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--task", default="addition", choices=sorted(TASKS), help="carry: the guided testbed")
    parser.add_argument("--n-train", type=int, default=512)
    parser.add_argument("--n-test", type=int, default=64)
    parser.add_argument("--skip-models", action="store_true", help="write the datasets only")
    parser.add_argument(
        "--policy-target-accuracy",
        type=float,
        default=None,
        help="train the policy only up to this validation accuracy (default: the task's, 0.15 addition, 0.03 carry)",
    )
    args = parser.parse_args(argv)
    print(write_datasets(args.out, args.n_train, args.n_test, task=args.task))
    if not args.skip_models:
        print(write_checkpoints(args.out, args.policy_target_accuracy, args.task))


if __name__ == "__main__":
    main()
