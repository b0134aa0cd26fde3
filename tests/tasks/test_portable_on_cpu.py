"""Portable task-model training: the float64 forward equals transformers' Qwen3, the weights do not depend on the
thread count or the machine, and the stop rule keeps the check closest to the target."""

import pytest
import torch

from recipe.optimal_sampling.tasks import TrainConfig, build_tokenizer, make_problems, train_model
from recipe.optimal_sampling.tasks import models as task_models
from recipe.optimal_sampling.tasks.models import encode_examples, new_portable_model
from recipe.optimal_sampling.tasks.portable import PARAM_BITS, snap_, weights_sha256

SHORT = TrainConfig(steps=24, batch_size=16, lr=5e-3, warmup_steps=4, eval_every=12, n_eval=8)
# sha256 of the float32 weights after `SHORT` for the policy. Produced on the project's CPU machine (torch 2.13 CPU,
# transformers 5.10, x86_64) and reproduced on the GPU host's CPU (torch 2.11+cu130, transformers 5.17): if this
# fails on another machine, training there is not portable and the README's tables will not reproduce.
SHORT_POLICY_SHA256 = "6726a2fcb4cad43f44b89ac63ffd6d3848c9296d6d13afa4524346fe8c22ae6b"


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


@pytest.mark.parametrize("role", ["policy", "teacher"])
def test_portable_forward_and_loss_equal_transformers_qwen3(tok, role):
    portable = new_portable_model(role, tok, seed=5)
    hf = portable.to_hf()
    ids = torch.randint(0, len(tok), (3, 11), generator=torch.Generator().manual_seed(0))  # (B, T)
    mask = torch.ones_like(ids)
    mask[0, :4], mask[1, :2] = 0, 0  # left padding, as greedy_generate uses
    positions = (mask.cumsum(-1) - 1).clamp_min(0)
    with torch.no_grad():
        ours = portable(input_ids=ids, attention_mask=mask, position_ids=positions).logits
        theirs = hf(input_ids=ids, attention_mask=mask, position_ids=positions).logits
    real = mask.bool()
    torch.testing.assert_close(ours[real].float(), theirs[real], atol=1e-5, rtol=0)
    input_ids, labels = encode_examples(make_problems(4, seed=1), role, tok)
    with torch.no_grad():
        torch.testing.assert_close(
            portable(input_ids=input_ids, labels=labels).loss.float(), hf(input_ids=input_ids, labels=labels).loss,
            atol=1e-5, rtol=0,
        )


def test_snap_keeps_the_given_mantissa_bits_and_is_idempotent():
    x = torch.randn(1000, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) * 10.0 ** torch.arange(
        -4, 4
    ).repeat_interleave(125).double()
    snapped = snap_(x.clone(), PARAM_BITS)
    assert ((snapped - x).abs() <= x.abs() * 2.0 ** -PARAM_BITS).all()
    mantissa, _ = torch.frexp(snapped)
    assert torch.equal(mantissa * 2.0**PARAM_BITS, torch.round(mantissa * 2.0**PARAM_BITS))
    assert torch.equal(snap_(snapped.clone(), PARAM_BITS), snapped)
    assert torch.equal(snapped.float().double(), snapped)  # exact in float32: what the checkpoint stores


def test_weights_do_not_depend_on_the_thread_count(tok):
    one = train_model("policy", tok, SHORT, progress=False)
    two = train_model("policy", tok, TrainConfig(**{**SHORT.__dict__, "num_threads": 2}), progress=False)
    assert one.losses == two.losses
    assert weights_sha256(one.model) == weights_sha256(two.model)


def test_weights_are_the_same_on_every_machine(tok):
    result = train_model("policy", tok, SHORT, progress=False)
    assert weights_sha256(result.model) == SHORT_POLICY_SHA256


def scripted_accuracy(monkeypatch, values):
    """Make the validation checks return `values` in order."""
    calls = iter(values)
    monkeypatch.setattr(task_models, "role_accuracy", lambda *args: next(calls))


def test_the_check_closest_to_the_target_is_kept_not_the_first_past_it(tok, monkeypatch):
    cfg = TrainConfig(steps=40, batch_size=8, eval_every=5, n_eval=4, target_accuracy=0.15)
    scripted_accuracy(monkeypatch, [0.02, 0.13, 0.69])  # a jump over the target between two checks
    jumped = train_model("policy", tok, cfg, progress=False)
    assert jumped.steps == 15 and (jumped.selected_step, jumped.selected_accuracy) == (10, 0.13)
    scripted_accuracy(monkeypatch, [0.02, 0.15])  # the same run, stopped at step 10
    at_ten = train_model("policy", tok, cfg, progress=False)
    assert at_ten.steps == 10
    assert weights_sha256(jumped.model) == weights_sha256(at_ten.model)
    scripted_accuracy(monkeypatch, [0.02, 0.10, 0.16])  # past the target but closer than the check before
    assert train_model("policy", tok, cfg, progress=False).selected_step == 15


def test_without_a_target_the_last_check_is_kept(tok, monkeypatch):
    cfg = TrainConfig(steps=10, batch_size=8, eval_every=5, n_eval=4)
    scripted_accuracy(monkeypatch, [0.5, 0.1])
    result = train_model("policy", tok, cfg, progress=False)
    assert (result.steps, result.selected_step, result.selected_accuracy) == (10, 10, 0.1)
