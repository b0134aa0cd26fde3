"""The on-disk cache of each task's trained teacher/policy pair: `load_task_models` reads a cache folder, or trains
the pair (`models.train_model`, one process per role with `jobs=2`) into a temporary sibling folder and renames it
into place, so that an interrupted run never leaves half a cache. A folder's meta.json records what it was trained
with (`cache_key`: version, task, model sizes, train configs), how training went, the test accuracy and each role's
`weights_sha256`; a cache trained with other settings is an error, never silently reused.
`python -m recipe.optimal_sampling.tasks` is `main` here.
"""

import argparse
import json
import multiprocessing
import os
import shutil
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from recipe.optimal_sampling.tasks.addition import ROLES, make_problems
from recipe.optimal_sampling.tasks.evaluate import role_accuracy
from recipe.optimal_sampling.tasks.models import TASK_MODELS, TrainConfig, task_models_spec, torch_threads, train_model
from recipe.optimal_sampling.tasks.portable import weights_sha256
from recipe.optimal_sampling.tasks.tokenizer import build_tokenizer

CACHE_ENV = "OPTIMAL_SAMPLING_CACHE"
CACHE_VERSION = 2
N_TEST = 200  # held-out test problems evaluated after training (recorded in meta.json)


def default_cache_dir(task: str = "addition") -> Path:
    """`$OPTIMAL_SAMPLING_CACHE/<folder>` when the variable is set, else `~/.cache/optimal_sampling/<folder>`, the
    folder being the task's (`task_models_v2` for addition, `carry_models_v1` for carry)."""
    root = os.environ.get(CACHE_ENV)
    name = task_models_spec(task).cache_name
    return (Path(root).expanduser() if root else Path.home() / ".cache" / "optimal_sampling") / name


@dataclass
class TaskModels:
    """The trained pair, loaded from the cache (eval mode), with where it lives."""

    policy: PreTrainedModel
    teacher: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    policy_path: Path  # a `save_pretrained` directory: model + tokenizer
    teacher_path: Path
    n_digits: int  # digits per operand the pair was trained on
    trained: bool  # True when this call trained the pair, False when it came from the cache
    meta: dict = field(default_factory=dict)  # the cache's meta.json: configs, steps, seconds, test accuracy
    task: str = "addition"  # the task the pair was trained on (see TASK_MODELS)


def cache_key(configs: dict[str, TrainConfig], task: str = "addition") -> dict:
    """What a cache must have been trained with to be reused: version, task, model sizes, train configs."""
    return {
        "version": CACHE_VERSION,
        "task": task,
        "model_sizes": task_models_spec(task).sizes,
        "train_configs": {role: asdict(cfg) for role, cfg in configs.items()},
    }


def train_role(out_dir: Path, role: str, cfg: TrainConfig, task: str, progress: bool, device: str = "cpu") -> dict:
    """Train `role`, save it to `out_dir/<role>` (model + tokenizer), evaluate it on N_TEST test problems and return
    its meta.json entry. A top-level function, so that a process pool can run the two roles side by side."""
    tokenizer = build_tokenizer()
    result = train_model(role, tokenizer, cfg, progress=progress, task=task, device=device)
    result.model.save_pretrained(out_dir / role)
    tokenizer.save_pretrained(out_dir / role)
    test = make_problems(N_TEST, 0, cfg.n_digits, "test")
    with torch_threads(cfg.num_threads):
        test_accuracy = role_accuracy(result.model, tokenizer, role, test, task_models_spec(task).format)
    return {
        "steps": result.steps,
        "train_seconds": round(result.seconds, 2),
        "final_loss": round(sum(result.losses[-20:]) / len(result.losses[-20:]), 5),
        "val_accuracy": [list(check) for check in result.val_accuracy],
        "selected_step": result.selected_step,
        "selected_accuracy": result.selected_accuracy,
        "test_accuracy": test_accuracy,
        "weights_sha256": weights_sha256(result.model),
    }


def train_and_save(
    out_dir: Path,
    configs: dict[str, TrainConfig],
    progress: bool = True,
    task: str = "addition",
    jobs: int = 1,
    device: str = "cpu",
) -> dict:
    """Train both roles on `device`, save each to `out_dir/<role>` (model + tokenizer), write and return meta.json.
    jobs: 2 trains the two roles in two processes at once (the same weights: training is deterministic)."""
    roles = ("teacher", "policy")
    args = ([out_dir] * 2, roles, [configs[r] for r in roles], [task] * 2, [progress] * 2, [str(device)] * 2)
    if jobs > 1:
        with ProcessPoolExecutor(2, mp_context=multiprocessing.get_context("spawn")) as pool:
            entries = list(pool.map(train_role, *args))
    else:
        entries = list(map(train_role, *args))
    meta = {**cache_key(configs, task), "results": dict(zip(roles, entries, strict=True))}
    meta["train_seconds_total"] = round(sum(r["train_seconds"] for r in meta["results"].values()), 2)
    (out_dir / "meta.json").write_text(json.dumps(meta, indent=2))
    return meta


def _publish(tmp: Path, final: Path) -> None:
    """Move the finished `tmp` cache to `final` by renames (atomic on one filesystem)."""
    if final.exists():  # retrain: set the old cache aside, then swap
        old = Path(tempfile.mkdtemp(prefix=f".{final.name}.old-", dir=final.parent))
        final.rename(old / final.name)
        tmp.rename(final)
        shutil.rmtree(old, ignore_errors=True)
        return
    try:
        tmp.rename(final)
    except OSError:  # another process published a cache first: keep theirs
        if not (final / "meta.json").exists():
            raise


def _read_cache(final: Path, configs: dict[str, TrainConfig], task: str = "addition") -> dict | None:
    """The cache's meta.json when `final` holds a complete cache trained with `configs` on `task`, else None."""
    if not (final / "meta.json").exists():
        return None
    meta = json.loads((final / "meta.json").read_text())
    meta.setdefault("task", "addition")  # caches written before tasks had names hold the addition pair
    key = json.loads(json.dumps(cache_key(configs, task)))  # JSON-normalised, as stored
    if {k: meta.get(k) for k in key} != key:
        raise ValueError(
            f"the cache at {final} was trained with other settings ({meta.get('train_configs')}); "
            f"pass retrain=True to overwrite it, or another cache_dir"
        )
    return meta


def load_task_models(
    cache_dir: str | Path | None = None,
    device: str | torch.device = "cpu",
    retrain: bool = False,
    teacher_cfg: TrainConfig | None = None,
    policy_cfg: TrainConfig | None = None,
    progress: bool = True,
    task: str = "addition",
    jobs: int = 1,
    train_device: str = "cpu",
) -> TaskModels:
    """The trained teacher/policy pair of `task`: read from `cache_dir`, or trained and cached there first.

    cache_dir: None means `default_cache_dir(task)`. Training writes into a temporary sibling directory that
    is renamed into place when complete, so an interrupted run never leaves a half-written cache.
    teacher_cfg / policy_cfg: None means the task's configs (TASK_MODELS; DEFAULT_TRAIN_CONFIGS for addition); a
    cache trained otherwise is an error. jobs: 2 trains the two roles side by side (see `train_and_save`).
    train_device: where training runs ("cuda" on a GPU host is faster; the weights are the same, see `portable.py`)."""
    # 1) settings and where the cache lives
    spec = task_models_spec(task)
    configs = {
        "teacher": teacher_cfg or spec.train_configs["teacher"],
        "policy": policy_cfg or spec.train_configs["policy"],
    }
    if configs["teacher"].n_digits != configs["policy"].n_digits:
        raise ValueError(
            f"teacher and policy must share n_digits, got {configs['teacher'].n_digits} and "
            f"{configs['policy'].n_digits}"
        )
    final = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir(task)
    meta = None if retrain else _read_cache(final, configs, task)
    # 2) train into a temporary directory and publish it, unless a matching cache exists
    trained = meta is None
    if trained:
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
        try:
            meta = train_and_save(tmp, configs, progress, task, jobs, train_device)
            _publish(tmp, final)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    # 3) load both from disk onto `device`
    paths = {role: final / role for role in ROLES}
    models = {role: AutoModelForCausalLM.from_pretrained(paths[role]).to(device).eval() for role in ROLES}
    tokenizer = AutoTokenizer.from_pretrained(paths["teacher"])
    return TaskModels(
        models["policy"],
        models["teacher"],
        tokenizer,
        paths["policy"],
        paths["teacher"],
        configs["teacher"].n_digits,
        trained,
        meta,
        task,
    )


def main() -> None:
    """Train (or load) the task models and print how training went: `python -m recipe.optimal_sampling.tasks`."""
    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--cache-dir", default=None, help="default: $OPTIMAL_SAMPLING_CACHE or ~/.cache/...")
    parser.add_argument("--retrain", action="store_true", help="train even when a cache exists")
    parser.add_argument(
        "--task", default="addition", choices=sorted(TASK_MODELS), help="which pair (default: the demo's)"
    )
    parser.add_argument("--jobs", type=int, default=1, choices=(1, 2), help="2: train teacher and policy side by side")
    parser.add_argument("--train-device", default="cpu", help="cpu or cuda: where training runs (same weights)")
    args = parser.parse_args()
    start = time.perf_counter()
    task = load_task_models(
        args.cache_dir, retrain=args.retrain, task=args.task, jobs=args.jobs, train_device=args.train_device
    )
    print(json.dumps({role: task.meta["results"][role] for role in ("teacher", "policy")}, indent=1))
    print(
        f"trained={task.trained} train_seconds_total={task.meta['train_seconds_total']} "
        f"wall_seconds={time.perf_counter() - start:.1f} path={task.teacher_path.parent}"
    )


if __name__ == "__main__":
    main()
