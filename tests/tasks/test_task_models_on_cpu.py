"""Tiny task models: configs, a short training run, greedy evaluation, the on-disk cache.

Training here is a few dozen steps on tiny batches (seconds). The full-size targets (teacher >= 90%,
policy in [5%, 30%]) are checked by the last test, which only runs with OPTIMAL_SAMPLING_SLOW_TESTS=1.
"""

import dataclasses
import os
import re
from types import SimpleNamespace

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from recipe.optimal_sampling.tasks import (
    CACHE_ENV,
    Problem,
    TrainConfig,
    build_tokenizer,
    completion_text,
    default_cache_dir,
    greedy_accuracy,
    greedy_generate,
    load_task_models,
    make_problems,
    policy_prompt,
    prompt,
    stop_token_ids,
    teacher_prompt,
    tiny_qwen3_config,
    train_model,
)
from recipe.optimal_sampling.tasks import cache as task_cache
from recipe.optimal_sampling.tasks import models as task_models
from recipe.optimal_sampling.tasks.models import DEFAULT_TRAIN_CONFIGS, encode_examples, new_model, policy_config

TINY = TrainConfig(steps=30, batch_size=16, lr=5e-3, warmup_steps=5, eval_every=10, n_eval=8)


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


@pytest.fixture(scope="module")
def tiny_cache(tmp_path_factory):
    """A tiny pair trained once into a fresh cache directory."""
    cache_dir = tmp_path_factory.mktemp("cache") / "task_models"
    task = load_task_models(cache_dir, teacher_cfg=TINY, policy_cfg=TINY, progress=False)
    return cache_dir, task


def n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# --- configs ---------------------------------------------------------------------------------------------


def test_tiny_configs_are_sized_by_role(tok):
    teacher, policy = tiny_qwen3_config(len(tok), "teacher"), tiny_qwen3_config(len(tok), "policy")
    for cfg in (teacher, policy):
        assert (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.max_position_embeddings) == (4, 2, 128)
        assert cfg.tie_word_embeddings and cfg.vocab_size == len(tok)
    assert n_params(new_model("teacher", tok, 0)) > 2 * n_params(new_model("policy", tok, 0))


def test_bad_role_vocab_and_train_config_are_rejected(tok):
    with pytest.raises(ValueError, match="role"):
        tiny_qwen3_config(len(tok), "student")
    with pytest.raises(ValueError, match="vocab_size"):
        tiny_qwen3_config(1, "teacher")
    with pytest.raises(ValueError, match="steps"):
        TrainConfig(steps=0)
    with pytest.raises(ValueError, match="lr"):
        TrainConfig(steps=1, lr=0.0)
    with pytest.raises(ValueError, match="target_accuracy"):
        TrainConfig(steps=1, target_accuracy=1.5)
    with pytest.raises(ValueError, match="role"):
        train_model("student", tok, TINY)


@pytest.mark.parametrize("role", ["policy", "teacher"])
def test_encode_examples_puts_the_loss_on_the_completion_only(tok, role):
    problems = make_problems(4, seed=0)
    input_ids, labels = encode_examples(problems, role, tok)
    assert input_ids.shape == labels.shape
    for row, problem in enumerate(problems):
        completion = tok.encode(completion_text(problem))
        n_prompt = len(tok.encode(prompt(role, problem.question, tok)))
        assert (labels[row, :n_prompt] == -100).all()
        assert labels[row, n_prompt : n_prompt + len(completion)].tolist() == completion
        assert input_ids[row, : n_prompt + len(completion)].tolist() == tok.encode(
            prompt(role, problem.question, tok) + completion_text(problem)
        )


# --- training --------------------------------------------------------------------------------------------


def test_short_training_lowers_the_loss_is_deterministic_and_saves(tok, tmp_path):
    cfg = TrainConfig(steps=40, batch_size=32, lr=5e-3, warmup_steps=5, eval_every=40, n_eval=8)
    first = train_model("policy", tok, cfg, progress=False)
    again = train_model("policy", tok, cfg, progress=False)
    assert first.steps == len(first.losses) == 40
    assert sum(first.losses[-5:]) / 5 < 0.7 * sum(first.losses[:5]) / 5
    assert first.losses == again.losses
    first.model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    ids = tok(policy_prompt("12+34"), return_tensors="pt")["input_ids"]  # (1, T)
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, first.model(ids).logits)


def test_training_stops_once_the_target_accuracy_is_reached(tok, monkeypatch):
    monkeypatch.setattr(task_models, "role_accuracy", lambda *args: 1.0)
    cfg = TrainConfig(steps=50, batch_size=8, eval_every=10, n_eval=4, target_accuracy=0.9)
    result = train_model("policy", tok, cfg, progress=False)
    assert result.steps == 10
    assert result.val_accuracy == [(10, 1.0)]


# --- greedy evaluation -----------------------------------------------------------------------------------


class StubLM(torch.nn.Module):
    """Always predicts `next_token(row_text)` for each row (decoded from the unpadded ids)."""

    def __init__(self, tokenizer, next_token):
        super().__init__()
        self.tokenizer, self.next_token = tokenizer, next_token
        self.dummy = torch.nn.Parameter(torch.zeros(1))

    def forward(self, input_ids, attention_mask, position_ids, logits_to_keep):
        logits = torch.zeros(input_ids.shape[0], 1, len(self.tokenizer))  # (B, 1, V)
        for row in range(input_ids.shape[0]):
            text = self.tokenizer.decode(input_ids[row][attention_mask[row].bool()])
            logits[row, 0, self.tokenizer.convert_tokens_to_ids(self.next_token(text))] = 1.0
        return SimpleNamespace(logits=logits)


def oracle_next_token(text: str) -> str:
    """The next token of the right answer, read off the prompt (policy or teacher format)."""
    a, b = re.search(r"(\d+)\+(\d+)", text).groups()
    written = re.split(r"A: |assistant\n", text)[-1]  # the digits generated so far
    answer = completion_text(Problem(f"{a}+{b}", str(int(a) + int(b)))).removesuffix("<eos>")
    return answer[len(written)] if len(written) < len(answer) else "<eos>"


def test_greedy_generate_cuts_at_the_first_stop_and_at_max_new_tokens(tok):
    prompts = [policy_prompt("1+2"), teacher_prompt("347+285", tok)]
    always_eos = StubLM(tok, lambda text: "<eos>")
    assert greedy_generate(always_eos, tok, prompts, stop_token_ids(tok)) == [[tok.eos_token_id]] * 2
    always_five = StubLM(tok, lambda text: "5")
    five = tok.convert_tokens_to_ids("5")
    assert greedy_generate(always_five, tok, prompts, stop_token_ids(tok), max_new_tokens=3) == [[five] * 3] * 2


def test_greedy_accuracy_of_an_oracle_is_one_and_of_a_mute_model_zero(tok):
    problems = make_problems(6, seed=0) + make_problems(3, seed=0, n_digits=1)
    prompts = [policy_prompt(p.question) for p in problems[:5]] + [
        teacher_prompt(p.question, tok) for p in problems[5:]
    ]
    assert greedy_accuracy(StubLM(tok, oracle_next_token), tok, prompts, problems, batch_size=4) == 1.0
    assert greedy_accuracy(StubLM(tok, lambda text: "<eos>"), tok, prompts, problems) == 0.0
    with pytest.raises(ValueError, match="as many prompts"):
        greedy_accuracy(StubLM(tok, oracle_next_token), tok, prompts[:2], problems)


def test_batched_greedy_matches_one_prompt_at_a_time(tok):
    model = new_model("teacher", tok, seed=3).eval()
    prompts = [policy_prompt("1+2"), teacher_prompt("347+285", tok), policy_prompt("4096+1")]
    batched = greedy_generate(model, tok, prompts, stop_token_ids(tok), max_new_tokens=6)
    single = [greedy_generate(model, tok, [p], stop_token_ids(tok), max_new_tokens=6)[0] for p in prompts]
    assert batched == single


# --- cache -----------------------------------------------------------------------------------------------


def test_load_task_models_trains_and_saves_a_loadable_pair(tiny_cache):
    cache_dir, task = tiny_cache
    assert task.trained
    assert (task.policy_path, task.teacher_path) == (cache_dir / "policy", cache_dir / "teacher")
    assert set(task.meta["results"]) == {"teacher", "policy"}
    assert task.n_digits == TINY.n_digits
    for path, model in ((task.policy_path, task.policy), (task.teacher_path, task.teacher)):
        loaded = AutoModelForCausalLM.from_pretrained(path)
        assert n_params(loaded) == n_params(model)
        assert AutoTokenizer.from_pretrained(path)("1+2")["input_ids"] == task.tokenizer("1+2")["input_ids"]
    assert n_params(task.teacher) > n_params(task.policy)
    assert sorted(p.name for p in cache_dir.parent.iterdir()) == [cache_dir.name]  # no temp dirs left


def test_second_load_reuses_the_cache(tiny_cache):
    cache_dir, first = tiny_cache
    weights = cache_dir / "teacher" / "model.safetensors"
    mtime = os.stat(weights).st_mtime_ns
    second = load_task_models(cache_dir, teacher_cfg=TINY, policy_cfg=TINY, progress=False)
    assert not second.trained
    assert os.stat(weights).st_mtime_ns == mtime
    assert second.meta == first.meta
    for a, b in zip(first.teacher.parameters(), second.teacher.parameters(), strict=True):
        assert torch.equal(a, b)


def test_a_cache_trained_otherwise_is_an_error(tiny_cache):
    cache_dir, _ = tiny_cache
    other = TrainConfig(steps=31, batch_size=16, eval_every=10, n_eval=8)
    with pytest.raises(ValueError, match="retrain=True"):
        load_task_models(cache_dir, teacher_cfg=other, policy_cfg=TINY, progress=False)
    with pytest.raises(ValueError, match="n_digits"):
        load_task_models(cache_dir, teacher_cfg=TINY, policy_cfg=TrainConfig(steps=30, n_digits=2), progress=False)


def test_retrain_replaces_the_cache(tmp_path):
    cfg = TrainConfig(steps=5, batch_size=8, eval_every=5, n_eval=4)
    load_task_models(tmp_path / "c", teacher_cfg=cfg, policy_cfg=cfg, progress=False)
    inode = os.stat(tmp_path / "c" / "policy" / "model.safetensors").st_ino
    again = load_task_models(tmp_path / "c", retrain=True, teacher_cfg=cfg, policy_cfg=cfg, progress=False)
    assert again.trained
    assert os.stat(tmp_path / "c" / "policy" / "model.safetensors").st_ino != inode
    assert [p.name for p in tmp_path.iterdir()] == ["c"]


def test_interrupted_training_leaves_no_cache(tmp_path, monkeypatch):
    def fail(role, *args, **kwargs):
        raise KeyboardInterrupt(role)

    monkeypatch.setattr(task_cache, "train_model", fail)
    with pytest.raises(KeyboardInterrupt):
        load_task_models(tmp_path / "c", teacher_cfg=TINY, policy_cfg=TINY, progress=False)
    assert list(tmp_path.iterdir()) == []


def test_default_cache_dir_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv(CACHE_ENV, str(tmp_path))
    assert default_cache_dir() == tmp_path / "task_models_v2"
    monkeypatch.delenv(CACHE_ENV)
    assert default_cache_dir().parts[-3:] == (".cache", "optimal_sampling", "task_models_v2")


# --- full-size targets (slow: ~5 CPU-minutes of training unless the default cache exists) ----------------


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("OPTIMAL_SAMPLING_SLOW_TESTS") != "1", reason="set OPTIMAL_SAMPLING_SLOW_TESTS=1")
def test_default_pair_meets_the_accuracy_targets():
    task = load_task_models(progress=False)
    test = make_problems(200, seed=123, split="test")
    teacher = greedy_accuracy(
        task.teacher, task.tokenizer, [teacher_prompt(p.question, task.tokenizer) for p in test], test
    )
    policy = greedy_accuracy(task.policy, task.tokenizer, [policy_prompt(p.question) for p in test], test)
    assert teacher >= 0.9
    assert 0.05 <= policy <= 0.3


def test_policy_config_changes_only_the_early_stopping_accuracy():
    assert policy_config(None) is None  # load_task_models' default
    weak = policy_config(0.03)
    assert weak.target_accuracy == 0.03
    assert (
        dataclasses.replace(weak, target_accuracy=DEFAULT_TRAIN_CONFIGS["policy"].target_accuracy)
        == (DEFAULT_TRAIN_CONFIGS["policy"])
    )
    with pytest.raises(ValueError, match="target_accuracy"):
        policy_config(1.5)
