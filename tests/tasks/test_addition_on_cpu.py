"""The addition task and its tokenizer: formats, determinism, splits, reward. No models."""

import pytest
from transformers import AutoTokenizer

from recipe.optimal_sampling.tasks import (
    EOS_TOKEN,
    IM_END_TOKEN,
    IM_START_TOKEN,
    Problem,
    build_tokenizer,
    completion_text,
    extract_answer,
    is_test_pair,
    make_problems,
    policy_prompt,
    prompt,
    reward,
    stop_token_ids,
    teacher_messages,
    teacher_prompt,
)
from recipe.optimal_sampling.tasks.tokenizer import CHARACTERS

SAMPLE_TEXTS = ["12+34", "Q: 347+285\nA: 236<eos>", "<|im_start|>user\n9+9<|im_end|>\n", "  a b\n\nc  "]


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


# --- tokenizer -------------------------------------------------------------------------------------------


def test_vocab_is_small_with_the_special_tokens(tok):
    assert len(tok) < 64
    assert (tok.pad_token, tok.eos_token, tok.bos_token) == ("<pad>", "<eos>", None)
    assert tok.pad_token_id != tok.eos_token_id
    for special in (IM_START_TOKEN, IM_END_TOKEN, EOS_TOKEN):
        assert tok.encode(special) == [tok.convert_tokens_to_ids(special)], special


def test_encoding_adds_no_special_tokens(tok):
    assert tok("12+34")["input_ids"] == tok.convert_tokens_to_ids(list("12+34"))
    assert tok.encode("7") == tok.encode("7", add_special_tokens=False) == [tok.convert_tokens_to_ids("7")]


def test_one_token_per_character_and_decode_round_trips(tok):
    ids = tok.encode(CHARACTERS)
    assert len(ids) == len(CHARACTERS)
    assert tok.unk_token_id not in ids
    assert tok.decode(ids) == CHARACTERS
    for text in SAMPLE_TEXTS:
        assert tok.decode(tok.encode(text)) == text


def test_unknown_characters_map_to_unk(tok):
    assert tok.encode("#") == [tok.unk_token_id]


def test_chat_template_gives_a_chatml_prompt(tok):
    text = tok.apply_chat_template([{"role": "user", "content": "12+34"}], tokenize=False, add_generation_prompt=True)
    assert text == "<|im_start|>user\n12+34<|im_end|>\n<|im_start|>assistant\n"
    no_gen = tok.apply_chat_template([{"role": "user", "content": "12+34"}], tokenize=False)
    assert no_gen == "<|im_start|>user\n12+34<|im_end|>\n"


def test_stop_token_ids_are_eos_and_im_end(tok):
    assert stop_token_ids(tok) == [tok.eos_token_id, tok.convert_tokens_to_ids(IM_END_TOKEN)]


def test_tokenizer_round_trips_through_save_pretrained(tok, tmp_path):
    tok.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    assert len(loaded) == len(tok)
    assert loaded.chat_template == tok.chat_template
    assert (loaded.pad_token_id, loaded.eos_token_id) == (tok.pad_token_id, tok.eos_token_id)
    assert stop_token_ids(loaded) == stop_token_ids(tok)
    for text in SAMPLE_TEXTS:
        assert loaded(text)["input_ids"] == tok(text)["input_ids"], text
    messages = teacher_messages("347+285")
    assert loaded.apply_chat_template(messages, add_generation_prompt=True, tokenize=False) == teacher_prompt(
        "347+285", tok
    )


# --- problems --------------------------------------------------------------------------------------------


def test_make_problems_is_deterministic_per_seed():
    assert make_problems(50, seed=3) == make_problems(50, seed=3)
    assert make_problems(50, seed=3) != make_problems(50, seed=4)
    assert make_problems(50, seed=3, split="test") != make_problems(50, seed=3, split="train")


@pytest.mark.parametrize("n_digits", [1, 2, 3, 4])
def test_problems_are_well_formed(n_digits):
    for problem in make_problems(100, seed=0, n_digits=n_digits):
        a, b = problem.question.split("+")
        assert len(a) == len(b) == n_digits
        assert problem.answer == str(int(a) + int(b))


def test_train_and_test_splits_are_disjoint():
    train = {p.question for seed in range(5) for p in make_problems(2000, seed=seed)}
    test = {p.question for p in make_problems(500, seed=0, split="test")}
    assert not train & test
    assert all(is_test_pair(*map(int, q.split("+"))) for q in test)
    assert len(test) == 500  # test problems are distinct


def test_make_problems_rejects_bad_arguments():
    with pytest.raises(ValueError, match="n_digits"):
        make_problems(5, seed=0, n_digits=0)
    with pytest.raises(ValueError, match="split"):
        make_problems(5, seed=0, split="val")
    with pytest.raises(ValueError, match="n="):
        make_problems(-1, seed=0)
    with pytest.raises(ValueError, match="distinct"):  # 1-digit pairs: only about 10 are test pairs
        make_problems(50, seed=0, n_digits=1, split="test")


# --- prompts, completion, reward -------------------------------------------------------------------------


def test_prompts(tok):
    assert policy_prompt("347+285") == "Q: 347+285\nA: "
    assert teacher_prompt("347+285", tok) == "<|im_start|>user\n347+285<|im_end|>\n<|im_start|>assistant\n"
    assert prompt("policy", "1+2", tok) == policy_prompt("1+2")
    assert prompt("teacher", "1+2", tok) == teacher_prompt("1+2", tok)
    with pytest.raises(ValueError, match="role"):
        prompt("student", "1+2", tok)


def test_completion_is_the_reversed_sum_then_eos():
    assert completion_text(Problem("347+285", "632")) == "236<eos>"
    assert completion_text(Problem("999+999", "1998")) == "8991<eos>"


@pytest.mark.parametrize(
    ("completion", "expected"),
    [
        ("236<eos>", "632"),
        ("236", "632"),
        (" 236 ", "632"),
        ("236<|im_end|>", "632"),
        ("236<eos>999", "632"),
        ("8991<eos><pad><pad>", "1998"),
        ("", None),
        ("<eos>", None),
        ("23x<eos>", None),
        ("2 36", None),
        ("-236", None),
    ],
)
def test_extract_answer(completion, expected):
    assert extract_answer(completion) == expected


def test_reward_on_correct_wrong_and_malformed_completions():
    problem = Problem("347+285", "632")
    assert reward(problem, "236<eos>") == 1.0
    assert reward(problem, "236") == 1.0  # cut by the length limit after the last digit: still stated
    assert reward(problem, "237<eos>") == 0.0  # wrong digit
    assert reward(problem, "632<eos>") == 0.0  # right sum, wrong (not reversed) order
    assert reward(problem, "2360<eos>") == 0.0  # trailing zero: a different number
    assert reward(problem, "<eos>") == 0.0
    assert reward(problem, "banana") == 0.0


def test_reward_agrees_with_completion_text():
    problems = make_problems(300, seed=1, n_digits=3) + make_problems(50, seed=1, n_digits=1)
    assert all(reward(p, completion_text(p)) == 1.0 for p in problems)
    shifted = [Problem(p.question, str(int(p.answer) + 1)) for p in problems]
    assert all(reward(s, completion_text(p)) == 0.0 for s, p in zip(shifted, problems, strict=True))
