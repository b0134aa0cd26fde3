"""`optimal-sampling generate` on bad models, bad files and concurrent runs (tiny random Qwen3 checkpoints): each
case is an exit status 2 with one line naming the input and the fix, raised before any model is loaded where the
case allows it, and nothing non-standard or duplicated is ever written."""

import json
import os
import shutil

import pytest
import torch
import transformers
from transformers import Qwen3ForCausalLM

from recipe.optimal_sampling import cli
from recipe.optimal_sampling.io import CliError, InputRow, output_line
from recipe.optimal_sampling.tasks.tokenizer import build_tokenizer
from tests.cli.test_generate_on_cpu import BATCH, PROMPTS, _args, _error, _read_rows, _save_checkpoint, _write_jsonl


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    root = tmp_path_factory.mktemp("checkpoints")
    paths = {role: _save_checkpoint(root / role, seed, build_tokenizer()) for role, seed in (("policy", 0),
             ("teacher", 1), ("retrained", 5))}  # fmt: skip
    overflow = Qwen3ForCausalLM.from_pretrained(paths["teacher"])
    with torch.no_grad():  # logits of +-3e5: finite in float32, +-inf in float16 (max 65504)
        overflow.lm_head.weight.copy_(overflow.lm_head.weight.sign() * 6e4)
    overflow.save_pretrained(root / "overflow")
    build_tokenizer().save_pretrained(root / "overflow")
    return {**paths, "overflow": str(root / "overflow")}


@pytest.fixture
def prompts_file(tmp_path):
    return _write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": p, "id": i} for i, p in enumerate(PROMPTS)])


@pytest.fixture
def no_model_loads(monkeypatch):
    """Fail the test if the command gets as far as loading model weights."""

    def boom(*args, **kwargs):
        raise AssertionError("a model was loaded before the error")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", boom)


def test_float16_overflow_is_an_error_naming_the_teacher_and_the_step(ckpt, prompts_file, tmp_path, capsys):
    out = tmp_path / "out.jsonl"
    err = _error(capsys, _args({**ckpt, "teacher": ckpt["overflow"]}, prompts_file, str(out), "--dtype", "float16"))
    assert "the teacher model produced NaN or infinite logits at generated token 0" in err, err
    assert "--dtype bfloat16" in err and "rows 0 onwards were not written" in err
    assert not out.exists() or out.read_bytes() == b""  # main: exit 0, pad-token rows with NaN literals
    assert cli.main(_args({**ckpt, "teacher": ckpt["overflow"]}, prompts_file, str(out), "--dtype", "float32")) == 0
    rows = [json.loads(line, parse_constant=pytest.fail) for line in out.read_text().splitlines()]  # strict JSON
    assert len(rows) == len(PROMPTS)


def test_output_rows_never_hold_nan_or_infinity_literals():
    row = InputRow(index=4, id="x", prompt="1+1=", meta={})
    with pytest.raises(CliError, match=r"input line 5 holds NaN or infinite values in \['logp_q'\]"):
        output_line(row, {"logp_q": [-0.5, float("nan")], "alpha": [0.5, 0.5]})
    with pytest.raises(CliError, match=r"\['kl_q_teacher'\]"):
        output_line(row, {"kl_q_teacher": [float("inf")]})
    assert json.loads(output_line(row, {"alpha": [0.5]}))["alpha"] == [0.5]


def test_a_second_writer_of_the_same_output_is_refused(ckpt, prompts_file, tmp_path, capsys, monkeypatch):
    from recipe.optimal_sampling.engine import DualSampler

    out = str(tmp_path / "out.jsonl")
    real, second = DualSampler.generate_text, []

    def start_a_second_run(self, *args, **kwargs):  # while the first run samples its second batch
        if not second and os.path.getsize(out) > 0:
            second.append("running")  # the second run's own batches do not start a third
            second[0] = cli.main(_args(ckpt, prompts_file, out))
            second.append(capsys.readouterr().err.strip().split("\n")[-1])
        return real(self, *args, **kwargs)

    monkeypatch.setattr(DualSampler, "generate_text", start_a_second_run)
    assert cli.main(_args(ckpt, prompts_file, out)) == 0
    assert second[0] == 2, second  # main: 0, and the file ended with duplicated, reordered rows
    assert f"{out} is being written by another run (pid {os.getpid()} on " in second[1]
    assert "choose another --output" in second[1]
    assert [r["index"] for r in _read_rows(out)] == list(range(len(PROMPTS)))
    assert not os.path.exists(f"{out}.lock")  # released and removed at the end


def test_resume_refuses_a_checkpoint_replaced_at_the_same_path(ckpt, prompts_file, tmp_path, capsys):
    teacher = tmp_path / "teacher"
    shutil.copytree(ckpt["teacher"], teacher)
    args = {**ckpt, "teacher": str(teacher)}
    out = tmp_path / "out.jsonl"
    assert cli.main(_args(args, prompts_file, str(out))) == 0
    with open(out, "rb") as f:
        first_batch = b"".join(f.readlines()[:BATCH])
    out.write_bytes(first_batch)  # an interrupted run
    shutil.copy(os.path.join(ckpt["retrained"], "model.safetensors"), teacher / "model.safetensors")
    err = _error(capsys, _args(args, prompts_file, str(out)))
    assert "was written with other settings (teacher_files.model.safetensors: " in err, err
    assert "choose another --output, or delete" in err
    assert out.read_bytes() == first_batch
    shutil.copy(os.path.join(ckpt["teacher"], "model.safetensors"), teacher / "model.safetensors")
    assert cli.main(_args(args, prompts_file, str(out))) == 0  # the same weights again: resumes
    assert len(_read_rows(out)) == len(PROMPTS)


@pytest.mark.parametrize(
    ("prompt", "max_new", "message"),
    [
        ("1" * 200, 4, "the policy prompt has 200 tokens and --max-new-tokens 4 needs 204 positions, but --policy "),
        ("1" * 120, 10, "has max_position_embeddings=128: lower --max-new-tokens to 8"),
    ],
)
def test_prompts_longer_than_the_positions_are_refused_before_loading(
    ckpt, tmp_path, capsys, no_model_loads, prompt, max_new, message
):
    inp = _write_jsonl(tmp_path / "p.jsonl", [{"prompt": "1+1="}, {"prompt": prompt}])
    err = _error(capsys, _args(ckpt, inp, str(tmp_path / "out.jsonl"), "--max-new-tokens", str(max_new)))
    assert "p.jsonl line 2: " in err and message in err, err


def test_a_broken_teacher_chat_template_is_one_line_before_loading(
    ckpt, prompts_file, tmp_path, capsys, no_model_loads
):
    broken = "{% for m in messages %}{{ m['content'] }"
    err = _error(capsys, _args(ckpt, prompts_file, str(tmp_path / "o.jsonl"), "--teacher-chat-template", broken))
    assert "cannot build the prompts of input line 1: the teacher chat template does not render" in err, err
    assert "TemplateSyntaxError" in err


def test_an_unwritable_output_is_refused_before_loading(ckpt, prompts_file, tmp_path, capsys, no_model_loads):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    err = _error(capsys, _args(ckpt, prompts_file, str(blocker / "out.jsonl")))
    assert f"--output {blocker}/out.jsonl: cannot create its directory {blocker}" in err, err


def test_a_model_folder_without_tokenizer_files_is_named(ckpt, prompts_file, tmp_path, capsys, no_model_loads):
    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(os.path.join(ckpt["policy"], name), bare / name)
    err = _error(capsys, _args({**ckpt, "policy": str(bare)}, prompts_file, str(tmp_path / "o.jsonl")))
    assert f"--policy {bare} has no tokenizer files" in err and "tokenizer.save_pretrained" in err, err
    assert "sentencepiece" not in err


def test_unwritable_demo_folders_are_one_line_errors_before_training(tmp_path, capsys, monkeypatch):
    from recipe.optimal_sampling import demo

    monkeypatch.setattr(demo, "load_task_models", lambda **kw: pytest.fail("trained or loaded before the check"))
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    assert cli.main(["demo", "--out", str(blocker / "demo")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"optimal-sampling demo: error: --out {blocker}/demo is not writable") and "\n" not in err
    monkeypatch.setenv("OPTIMAL_SAMPLING_CACHE", str(blocker / "cache"))
    assert cli.main(["demo", "--out", str(tmp_path / "demo"), "--retrain"]) == 2
    err = capsys.readouterr().err.strip()
    assert "the task-model cache" in err and "set OPTIMAL_SAMPLING_CACHE to a writable directory" in err, err
