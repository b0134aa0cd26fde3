"""`optimal-sampling generate` end to end on tiny random Qwen3 checkpoints: rows and traces, resume after an
interruption (byte-identical), and the one-line errors."""

import json
import os
import shutil
import subprocess
import sys
import types

import pytest
import torch
from transformers import Qwen3Config, Qwen3ForCausalLM

from recipe.optimal_sampling import cli
from recipe.optimal_sampling.core import ALPHA_METHODS
from recipe.optimal_sampling.engine import PRESETS
from recipe.optimal_sampling.tasks.tokenizer import build_tokenizer

PROMPTS = ["1+2=", "35+7=", "what is 9+9?", "12+30=", "8+8=", "99+1="]
MAX_NEW_TOKENS = 10
BATCH = 2
SEED = 4  # with these checkpoints, rows 0 and 3 stop early and the others run to the length limit
TRACE_FIELDS = ("logp_q", "logp_policy", "logp_teacher", "alpha", "forced", "support_size", "kl_q_policy")


def _save_checkpoint(path, seed: int, tokenizer) -> str:
    torch.manual_seed(seed)
    config = Qwen3Config(
        vocab_size=64,  # 55 tokens, padded like real checkpoints: the sampler cuts logits to len(tokenizer)
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=16,
        max_position_embeddings=128,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    Qwen3ForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    root = tmp_path_factory.mktemp("checkpoints")
    other = build_tokenizer()
    other.add_tokens(["<extra>"])  # 56 tokens: another vocabulary
    return {
        "policy": _save_checkpoint(root / "policy", 0, build_tokenizer()),
        "teacher": _save_checkpoint(root / "teacher", 1, build_tokenizer()),
        "other_vocab": _save_checkpoint(root / "other_vocab", 2, other),
    }


def _write_jsonl(path, rows) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return str(path)


@pytest.fixture
def prompts_file(tmp_path):
    rows = [{"prompt": p, "id": f"q{i}", "level": i % 3} for i, p in enumerate(PROMPTS)]
    rows[1] = {"prompt": PROMPTS[1]}  # no id, no extra field
    return _write_jsonl(tmp_path / "prompts.jsonl", rows)


def _args(ckpt, inp, out, *extra) -> list[str]:
    return [
        "generate",
        *("--policy", ckpt["policy"], "--teacher", ckpt["teacher"], "--input", inp, "--output", out),
        *("--max-new-tokens", str(MAX_NEW_TOKENS), "--batch-size", str(BATCH), "--seed", str(SEED), "--device", "cpu"),
        *extra,
    ]


def _read_rows(path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


@pytest.fixture
def reference(ckpt, prompts_file, tmp_path):
    """An uninterrupted run over all rows."""
    out = str(tmp_path / "reference.jsonl")
    assert cli.main(_args(ckpt, prompts_file, out)) == 0
    return out


def _error(capsys, argv) -> str:
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip().split("\n")[-1]  # after transformers' loading bars, if any
    assert err.startswith("optimal-sampling generate: error: "), err
    return err


def test_generate_writes_one_row_of_traces_per_prompt(reference):
    rows = _read_rows(reference)
    eos = build_tokenizer().eos_token_id  # the sampler stops on both tokenizers' EOS (the same id here)
    assert [r["index"] for r in rows] == list(range(len(PROMPTS)))
    assert [r["prompt"] for r in rows] == PROMPTS
    assert rows[0]["id"] == "q0" and rows[0]["meta"] == {"level": 0}
    assert rows[1]["id"] is None and rows[1]["meta"] == {}
    for r in rows:
        n = len(r["token_ids"])
        assert 1 <= n <= MAX_NEW_TOKENS
        assert all(len(r[name]) == n for name in TRACE_FIELDS), r
        assert r["forced"][0] is True and r["alpha"][0] == 1.0  # balanced preset: the first token is forced
        assert all(lq <= 1e-6 for lq in r["logp_q"])
        assert isinstance(r["text"], str)
        if r["finish_reason"] == "stop":
            assert r["token_ids"][-1] == eos and eos not in r["token_ids"][:-1]
        else:
            assert r["finish_reason"] == "length" and n == MAX_NEW_TOKENS and eos not in r["token_ids"]
    assert [r["finish_reason"] for r in rows] == ["stop", "length", "length", "stop", "length", "length"]  # SEED
    assert all(key in cli.GENERATE_EPILOG for key in rows[0])  # --help documents every output field


def test_teacher_chat_template_from_a_file_reaches_the_teacher(ckpt, prompts_file, reference, tmp_path):
    template = tmp_path / "teacher.jinja"
    template.write_text("{% for m in messages %}Q: {{ m['content'] }}\n{% endfor %}A: ", encoding="utf-8")
    out = str(tmp_path / "out.jsonl")
    assert cli.main(_args(ckpt, prompts_file, out, "--teacher-chat-template", str(template))) == 0
    with open(f"{out}.meta.json", encoding="utf-8") as f:
        assert json.load(f)["teacher_chat_template"] == template.read_text(encoding="utf-8")
    # the same seeds with another teacher context give other samples
    assert [r["token_ids"] for r in _read_rows(out)] != [r["token_ids"] for r in _read_rows(reference)]


def test_sidecar_records_the_settings_and_flags_override_the_preset(ckpt, prompts_file, tmp_path):
    out = str(tmp_path / "out.jsonl")
    extra = ("--preset", "conservative", "--teacher-top-p", "none", "--temperature", "0.7", "--system-prompt", "hi")
    assert cli.main(_args(ckpt, prompts_file, out, *extra)) == 0
    with open(f"{out}.meta.json", encoding="utf-8") as f:
        meta = json.load(f)
    expected = {**PRESETS["conservative"], "teacher_top_p": None, "temperature": 0.7, "fixed_alpha": None}
    assert meta["sampler"] == {**expected, "stop_token_ids": []}
    assert meta["policy"] == os.path.abspath(ckpt["policy"]) and meta["seed"] == SEED and meta["batch_size"] == BATCH
    assert meta["system_prompt"] == "hi" and meta["max_new_tokens"] == MAX_NEW_TOKENS
    assert all(max(r["support_size"]) == 55 for r in _read_rows(out))  # no trust region: the whole vocabulary


@pytest.mark.parametrize("complete_rows", [BATCH, BATCH + 1])
def test_resume_after_a_cut_write_is_byte_identical(ckpt, prompts_file, reference, tmp_path, complete_rows):
    # An interruption mid-write leaves some complete rows and a partial line; complete_rows = BATCH + 1 cuts a batch.
    with open(reference, "rb") as f:
        lines = f.read().splitlines(keepends=True)
    out = tmp_path / "resumed.jsonl"
    out.write_bytes(b"".join(lines[:complete_rows]) + lines[complete_rows][:25])
    shutil.copy(f"{reference}.meta.json", f"{out}.meta.json")
    assert cli.main(_args(ckpt, prompts_file, str(out))) == 0
    assert out.read_bytes() == open(reference, "rb").read()
    assert [r["index"] for r in _read_rows(out)] == list(range(len(PROMPTS)))


def test_interrupted_run_resumes_without_redoing_rows(ckpt, prompts_file, reference, tmp_path, monkeypatch):
    from recipe.optimal_sampling.engine import DualSampler

    real, calls, interrupt_at = DualSampler.generate_text, [], [2]

    def interrupt_second_batch(self, prompts, *args, **kwargs):  # Ctrl-C while the second batch is sampled
        calls.append(prompts)
        if len(calls) in interrupt_at:
            interrupt_at.clear()
            raise KeyboardInterrupt
        return real(self, prompts, *args, **kwargs)

    monkeypatch.setattr(DualSampler, "generate_text", interrupt_second_batch)
    out = str(tmp_path / "out.jsonl")
    assert cli.main(_args(ckpt, prompts_file, out)) == 130
    assert len(_read_rows(out)) == BATCH
    calls.clear()
    assert cli.main(_args(ckpt, prompts_file, out)) == 0
    assert calls[0] == PROMPTS[BATCH : 2 * BATCH]  # the first batch was not generated again
    assert open(out, "rb").read() == open(reference, "rb").read()
    calls.clear()
    assert cli.main(_args(ckpt, prompts_file, out)) == 0 and calls == []  # complete: nothing to do


def test_missing_input_and_model_directory_are_one_line_errors(ckpt, tmp_path, capsys):
    out = str(tmp_path / "out.jsonl")
    assert "does not exist" in _error(capsys, _args(ckpt, str(tmp_path / "nope.jsonl"), out))
    prompts = _write_jsonl(tmp_path / "p.jsonl", [{"prompt": "1+1="}])
    bad = {**ckpt, "teacher": str(tmp_path / "no_model")}
    assert "--teacher" in _error(capsys, _args(bad, prompts, out)) and not os.path.exists(out)


@pytest.mark.parametrize(
    "lines, message",
    [
        (['{"prompt": "1+1="}', '{"prompt": "2+2=",}'], "line 2 is not valid JSON"),
        (['{"prompt": "1+1="}', '{"prompt": "  "}'], 'line 2: "prompt" must be a non-empty string'),
        (['{"id": 1}'], 'line 1 has no "prompt" field'),
        (['{"prompt": "1+1="}', "", '{"prompt": "2+2="}'], "line 2 is blank"),
        (['["1+1="]'], "line 1 is a JSON array"),
    ],
)
def test_bad_input_lines_are_named(ckpt, tmp_path, capsys, lines, message):
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    err = _error(capsys, _args(ckpt, str(path), str(tmp_path / "out.jsonl")))
    assert f"{path} {message}" in err


def test_trailing_blank_lines_are_allowed(ckpt, tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text('{"prompt": "1+1="}\n\n\n', encoding="utf-8")
    out = tmp_path / "out.jsonl"
    assert cli.main(_args(ckpt, str(path), str(out))) == 0
    assert len(_read_rows(out)) == 1


def test_teacher_with_another_vocabulary_is_refused(ckpt, prompts_file, tmp_path, capsys):
    bad = {**ckpt, "teacher": ckpt["other_vocab"]}
    err = _error(capsys, _args(bad, prompts_file, str(tmp_path / "out.jsonl")))
    assert "vocabular" in err


def test_output_of_another_input_is_refused_and_kept(ckpt, reference, tmp_path, capsys):
    other = _write_jsonl(tmp_path / "other.jsonl", [{"prompt": p, "id": f"q{i}"} for i, p in enumerate(PROMPTS[::-1])])
    before = open(reference, "rb").read()
    err = _error(capsys, _args(ckpt, other, reference))
    assert "line 1 does not match" in err and "--output" in err
    assert open(reference, "rb").read() == before


def test_resume_with_other_settings_lists_the_differing_keys(ckpt, prompts_file, reference, capsys):
    err = _error(capsys, _args(ckpt, prompts_file, reference, "--seed", "5", "--temperature", "0.5"))
    assert "seed: 4 -> 5" in err and "sampler.temperature: 1.0 -> 0.5" in err and "batch_size" not in err


def test_output_without_sidecar_is_not_touched(ckpt, prompts_file, tmp_path, capsys):
    out = tmp_path / "notes.txt"
    out.write_text("someone's notes, no newline")
    assert "meta.json does not" in _error(capsys, _args(ckpt, prompts_file, str(out)))
    assert out.read_text() == "someone's notes, no newline"


@pytest.mark.parametrize(
    "extra, message",
    [
        (("--temperature", "-1"), "temperature must be"),
        (("--fixed-alpha", "0.3"), "fixed_alpha=0.3 is only used with alpha_method='fixed'"),
        (("--alpha-method", "fixed", "--fixed-alpha", "2"), "fixed_alpha must be a number in [0, 1]"),
        (("--preset", "bold"), "unknown sampler preset 'bold'"),
        (("--policy-template", "Q: {question}"), "--policy-template"),
        (("--teacher-chat-template", "no_such_file.jinja"), "neither a file nor a Jinja template"),
    ],
)
def test_bad_flag_values_are_clean_errors(ckpt, prompts_file, tmp_path, capsys, extra, message):
    assert message in _error(capsys, _args(ckpt, prompts_file, str(tmp_path / "out.jsonl"), *extra))


def test_help_lists_the_presets_and_alpha_methods_of_the_engine():
    assert set(cli.PRESET_NAMES) == set(PRESETS)
    assert set(cli.ALPHA_METHOD_NAMES) == set(ALPHA_METHODS)


def test_console_script_help_runs():
    script = shutil.which("optimal-sampling") or pytest.fail("the console script is not installed (pip install -e .)")
    top = subprocess.run([script, "--help"], capture_output=True, text=True, timeout=60)
    assert top.returncode == 0 and "generate" in top.stdout and "demo" in top.stdout, top.stderr
    sub = subprocess.run([script, "generate", "--help"], capture_output=True, text=True, timeout=60)
    assert sub.returncode == 0 and "--teacher-top-p" in sub.stdout and "--batch-size" in sub.stdout, sub.stderr


def test_demo_passes_its_options_to_run_demo(monkeypatch):
    calls = []
    fake = types.ModuleType("recipe.optimal_sampling.demo")
    fake.run_demo = lambda **kwargs: calls.append(kwargs)
    monkeypatch.setitem(sys.modules, "recipe.optimal_sampling.demo", fake)
    assert cli.main(["demo", "--out", "d", "--retrain", "--seed", "5", "--num-problems", "7"]) == 0
    assert cli.main(["demo"]) == 0
    assert calls == [
        {"out_dir": "d", "retrain": True, "seed": 5, "num_problems": 7},
        {"out_dir": "demo_out", "retrain": False, "seed": 0},
    ]
