"""The real-shape workload (`tasks.real_shape`, `verl/real_shape.py`): the tiny build end to end on CPU (checkpoints the
server loads, datasets whose caps pass the start-up check, a rerun that keeps the checkpoints), the full-size tokenizer,
the public shapes (counted on the meta device) and the cap distribution."""

import asyncio
import json
import random
import statistics

import pandas as pd
import pytest
import torch
from safetensors import safe_open
from transformers import AutoConfig, AutoTokenizer, Qwen3ForCausalLM

from recipe.optimal_sampling.tasks import real_shape as shapes
from recipe.optimal_sampling.tasks.real_shape import VOCAB, build_tokenizer, qwen3_config
from recipe.optimal_sampling.verl import real_shape
from recipe.optimal_sampling.verl.response_caps import CAP_FIELD, check_dataset_caps, response_cap
from tests.verl.test_server_engine_on_cpu import SAMPLING, make_server

ARGS = ["--tiny", "--n-train", "6", "--n-test", "2", "--n", "4", "--prompt-min", "5", "--prompt-max", "9",
        "--median-response", "6", "--max-response", "12", "--device", "cpu"]  # fmt: skip


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    out = tmp_path_factory.mktemp("real_shape")
    return out, real_shape.main(["--out", str(out), *ARGS])


def test_tiny_build_writes_checkpoints_of_one_vocabulary_with_the_chat_template(built):
    out, record = built
    tok = AutoTokenizer.from_pretrained(out / "teacher")
    assert len(tok) == 256 and tok.get_vocab() == AutoTokenizer.from_pretrained(out / "policy").get_vocab()
    assert tok.chat_template and tok.eos_token == "<|im_end|>" and tok.pad_token_id == 0
    for role in ("policy", "teacher"):
        config = AutoConfig.from_pretrained(out / role)
        assert (config.vocab_size, config.head_dim, config.eos_token_id) == (256, 16, tok.eos_token_id)
        with safe_open(out / role / "model.safetensors", "pt") as f:
            assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.bfloat16}
        assert json.loads((out / role / "build.json").read_text()) == record[role]
    assert (record["policy"]["seed"], record["teacher"]["seed"]) == (0, 1)


def test_datasets_have_prompts_of_the_asked_lengths_and_one_cap_per_response(built):
    out, _ = built
    tok = AutoTokenizer.from_pretrained(out / "policy")
    train = pd.read_parquet(out / "train.parquet").to_dict("records")
    assert len(train) == 6 and len(pd.read_parquet(out / "test.parquet")) == 2
    for row in train:
        text = row["prompt"][0]["content"]
        assert 5 <= len(tok.encode(text, add_special_tokens=False)) <= 9
        assert len(tok.encode(real_shape.POLICY_TEMPLATE.format(prompt=text), add_special_tokens=False)) == len(
            text) + 7  # fmt: skip
        caps = row["extra_info"][CAP_FIELD]
        assert len(caps) == 4 and all(1 <= c <= 12 for c in caps)
        assert row["data_source"] == real_shape.DATA_SOURCE
    check_dataset_caps([str(out / "train.parquet"), str(out / "test.parquet")], n=4, max_response_length=12)


def test_the_dual_server_serves_a_row_of_the_build_through_the_slots(built):
    """The checkpoints load in the dual server; a row's prompts (plain template, chat template) stream through the fast
    engine's slots (its CPU twins) with the row's first response cap."""
    out, _ = built
    server = make_server({"policy": str(out / "policy"), "teacher": str(out / "teacher")})
    server.batcher = server.sampler.continuous(2, server.slot_len)
    tok = AutoTokenizer.from_pretrained(out / "policy")
    row = pd.read_parquet(out / "train.parquet").iloc[0]
    messages = list(row["prompt"])
    policy_ids = tok.encode(real_shape.POLICY_TEMPLATE.format(prompt=messages[0]["content"]), add_special_tokens=False)
    teacher_ids = tok.encode(tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True))
    cap = min(response_cap(row["extra_info"], 0, 12), 8)  # 8: the server's response_length here
    request = server.generate(policy_ids, dict(SAMPLING, max_tokens=cap), "r", teacher_prompt_ids=teacher_ids)
    result = asyncio.run(request)
    assert 1 <= len(result.token_ids) <= cap and server.batcher.prefilled == 1


def test_a_rebuild_keeps_matching_checkpoints_and_replaces_others(built, capsys):
    out, record = built
    again = real_shape.main(["--out", str(out), *ARGS])
    assert again["policy"] == record["policy"] and "kept" in capsys.readouterr().out
    (out / "policy" / "build.json").write_text(json.dumps({**record["policy"], "seed": 5}))
    assert real_shape.main(["--out", str(out), *ARGS])["policy"]["seed"] == 0  # rebuilt with the asked seed


def test_the_full_tokenizer_has_the_qwen3_vocabulary_size_one_character_per_token():
    tok = build_tokenizer()
    assert len(tok) == VOCAB == 151_936
    ids = random.Random(0).sample(range(3, VOCAB), 2000)
    text = tok.decode(ids)
    assert len(text) == len(ids) and tok.encode(text, add_special_tokens=False) == ids
    chat = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert chat == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


@pytest.mark.parametrize(("name", "billions"), [("4b", 4.022), ("14b", 14.768)])
def test_the_shapes_are_the_public_qwen3_ones(name, billions):
    with torch.device("meta"):
        model = Qwen3ForCausalLM(qwen3_config(name, VOCAB))
    assert round(sum(p.numel() for p in model.parameters()) / 1e9, 3) == billions


def test_caps_are_long_tailed_around_the_median_and_bounded():
    rng = random.Random(0)
    caps = [shapes.response_cap(rng, 300, 0.8, 1024) for _ in range(4000)]
    assert 280 <= statistics.median(caps) <= 320 and min(caps) >= 1 and max(caps) == 1024
    assert 0.03 < sum(c == 1024 for c in caps) / len(caps) < 0.1  # P(lognormal > 1024) = 6%


def test_the_reward_is_a_coin_read_off_the_response():
    assert real_shape.compute_score(real_shape.DATA_SOURCE, "b...", "") == 1.0  # ord("b") = 98
    assert real_shape.compute_score(real_shape.DATA_SOURCE, "a...", "") == 0.0
    assert real_shape.compute_score(real_shape.DATA_SOURCE, "", "") == 0.0
