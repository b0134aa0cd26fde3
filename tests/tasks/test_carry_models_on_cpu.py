"""The testbed's task models: shapes the fast engine runs, per-task configs and cache folders (the addition pair
unchanged), a short carry training run, the cache keyed by task, the parallel build."""

import dataclasses
import json

import pytest
import torch
from transformers import Qwen3ForCausalLM

from recipe.optimal_sampling.engine.fast.model import unsupported_reason
from recipe.optimal_sampling.tasks import (
    CACHE_ENV,
    CARRY,
    DEFAULT_TRAIN_CONFIGS,
    MODEL_SIZES,
    TASK_MODELS,
    TrainConfig,
    build_tokenizer,
    default_cache_dir,
    load_task_models,
    make_problems,
    prompt,
    tiny_qwen3_config,
    train_model,
)
from recipe.optimal_sampling.tasks.cache import _read_cache, cache_key, train_and_save
from recipe.optimal_sampling.tasks.models import CARRY_MODEL_SIZES, encode_examples, policy_config

TINY5 = TrainConfig(steps=6, batch_size=8, warmup_steps=2, eval_every=3, n_eval=4, n_digits=5)


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


@pytest.mark.parametrize("role", ["policy", "teacher"])
def test_carry_models_are_shaped_for_the_fast_engine(tok, role):
    cfg = tiny_qwen3_config(len(tok), role, task="carry")
    model = Qwen3ForCausalLM(cfg)
    assert unsupported_reason(model) is None
    assert cfg.head_dim >= 16 and cfg.head_dim & (cfg.head_dim - 1) == 0
    sizes = CARRY_MODEL_SIZES[role]
    assert (cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers) == (
        sizes["hidden_size"], sizes["intermediate_size"], sizes["num_hidden_layers"])  # fmt: skip
    assert model.model.layers[0].self_attn.q_proj.out_features == 4 * cfg.head_dim  # 4 heads x head_dim
    assert "head_dim" in (unsupported_reason(Qwen3ForCausalLM(tiny_qwen3_config(len(tok), role))) or "")  # addition's


def test_carry_teacher_is_much_larger_than_its_policy(tok):
    n = {r: sum(p.numel() for p in Qwen3ForCausalLM(tiny_qwen3_config(len(tok), r, task="carry")).parameters())
         for r in ("policy", "teacher")}  # fmt: skip
    assert n["teacher"] > 4 * n["policy"]


def test_the_addition_pair_keeps_its_sizes_configs_and_cache(monkeypatch, tmp_path):
    assert TASK_MODELS["addition"].sizes is MODEL_SIZES
    assert TASK_MODELS["addition"].train_configs is DEFAULT_TRAIN_CONFIGS
    monkeypatch.setenv(CACHE_ENV, str(tmp_path))
    assert default_cache_dir() == tmp_path / "task_models_v2"
    assert default_cache_dir("carry") == tmp_path / "carry_models_v1"
    assert all(cfg.n_digits == 5 for cfg in TASK_MODELS["carry"].train_configs.values())
    carry_policy = TASK_MODELS["carry"].train_configs["policy"]
    assert carry_policy.eval_every <= 5 and carry_policy.n_eval >= 400  # a frequent check on a large set
    assert policy_config(0.05, "carry") == dataclasses.replace(carry_policy, target_accuracy=0.05)
    with pytest.raises(ValueError, match="task"):
        default_cache_dir("mul")


def test_encode_examples_teaches_the_worked_answer(tok):
    problems = make_problems(3, seed=0, n_digits=5)
    input_ids, labels = encode_examples(problems, "policy", tok, CARRY)
    for row, p in enumerate(problems):
        completion = tok.encode(CARRY.completion_text(p))
        n_prompt = len(tok.encode(prompt("policy", p.question, tok)))
        assert labels[row, n_prompt : n_prompt + 11].tolist() == completion
        assert input_ids[row, : n_prompt + 11].tolist() == tok.encode(prompt("policy", p.question, tok)) + completion


def test_short_carry_training_is_deterministic_and_lowers_the_loss(tok):
    cfg = dataclasses.replace(TINY5, steps=20, batch_size=16, lr=5e-3, eval_every=20)
    first, again = (train_model("policy", tok, cfg, progress=False, task="carry") for _ in range(2))
    assert first.losses == again.losses
    assert sum(first.losses[-3:]) < 0.8 * sum(first.losses[:3])
    assert first.model.config.head_dim == 16


def test_carry_cache_is_keyed_by_task_and_reused(tmp_path):
    cache = tmp_path / "carry"
    first = load_task_models(cache, teacher_cfg=TINY5, policy_cfg=TINY5, progress=False, task="carry")
    assert first.trained and first.task == "carry" and first.meta["task"] == "carry"
    assert first.teacher.config.hidden_size == CARRY_MODEL_SIZES["teacher"]["hidden_size"]
    assert {"selected_step", "selected_accuracy"} <= set(first.meta["results"]["policy"])
    again = load_task_models(cache, teacher_cfg=TINY5, policy_cfg=TINY5, progress=False, task="carry")
    assert not again.trained
    with pytest.raises(ValueError, match="retrain=True"):  # the same configs, another task
        load_task_models(cache, teacher_cfg=TINY5, policy_cfg=TINY5, progress=False, task="addition")


def test_a_cache_written_before_tasks_had_names_reads_as_addition(tmp_path):
    configs = {"teacher": TINY5, "policy": TINY5}
    key = cache_key(configs, "addition")
    del key["task"]
    tmp_path.joinpath("meta.json").write_text(json.dumps(key))
    assert _read_cache(tmp_path, configs, "addition") is not None
    with pytest.raises(ValueError, match="retrain=True"):
        _read_cache(tmp_path, configs, "carry")


def test_two_jobs_train_the_same_weights_as_one(tmp_path):
    configs = {"teacher": TINY5, "policy": dataclasses.replace(TINY5, seed=1)}
    (tmp_path / "one").mkdir(), (tmp_path / "two").mkdir()
    one = train_and_save(tmp_path / "one", configs, progress=False, task="carry", jobs=1)
    two = train_and_save(tmp_path / "two", configs, progress=False, task="carry", jobs=2)
    strip = {r: {k: v for k, v in one["results"][r].items() if k != "train_seconds"} for r in one["results"]}
    assert strip == {r: {k: v for k, v in two["results"][r].items() if k != "train_seconds"} for r in two["results"]}
    for role in ("policy", "teacher"):
        a = Qwen3ForCausalLM.from_pretrained(tmp_path / "one" / role).state_dict()
        b = Qwen3ForCausalLM.from_pretrained(tmp_path / "two" / role).state_dict()
        assert all(torch.equal(a[k], b[k]) for k in a)


def test_unknown_task_is_refused_before_training(tok):
    with pytest.raises(ValueError, match="task"):
        load_task_models(task="mul")
    with pytest.raises(ValueError, match="task"):
        train_model("policy", tok, TINY5, task="mul")
