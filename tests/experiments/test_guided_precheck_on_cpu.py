"""scripts/experiments/guided_precheck.py: group statistics against a loop, response log-probs against one full
forward per row, the losses' filtering and zero-gradient cases, and one seeded end-to-end run of every arm on a
tiny cache."""

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from recipe.optimal_sampling.tasks import CARRY, TrainConfig, build_tokenizer, load_task_models, make_problems
from recipe.optimal_sampling.tasks.models import new_model

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "experiments" / "guided_precheck.py"
spec = importlib.util.spec_from_file_location("guided_precheck", SCRIPT)
precheck = importlib.util.module_from_spec(spec)
spec.loader.exec_module(precheck)

TINY5 = TrainConfig(steps=6, batch_size=8, warmup_steps=2, eval_every=6, n_eval=4, n_digits=5)


@pytest.fixture(scope="module")
def bed():
    tok = build_tokenizer()
    policy, teacher = new_model("policy", tok, 0, task="carry"), new_model("teacher", tok, 1, task="carry")
    return precheck.Testbed(CARRY, policy, teacher, tok, 5, make_problems(4, seed=0, n_digits=5, split="test"))


def test_group_stats_match_a_loop():
    rewards = torch.tensor([[0.0, 0, 0, 0], [0, 1, 0, 1], [1, 1, 1, 1]])  # (P, n)
    stats = precheck.group_stats(rewards)
    assert stats["sample_acc"] == pytest.approx(6 / 12)
    assert stats["pass_at_n"] == pytest.approx(sum(any(r == 1 for r in row) for row in rewards.tolist()) / 3)
    assert stats["all_zero_frac"] == pytest.approx(1 / 3)


def test_response_logprobs_match_one_forward_per_row(bed):
    prompts = bed.prompt_ids("policy", bed.test[:3])
    responses = [[10, 11, 1], [12], [13, 14, 15, 16]]
    with torch.no_grad():
        logp, mask = precheck.response_logprobs(bed.policy, prompts, responses)  # (3, 4)
    for i, (p, r) in enumerate(zip(prompts, responses, strict=True)):
        with torch.no_grad():
            full = bed.policy(torch.tensor([p + r])).logits[0].double().log_softmax(-1)  # (L, V)
        expected = torch.stack([full[len(p) - 1 + t, tok] for t, tok in enumerate(r)])
        torch.testing.assert_close(logp[i, : len(r)].double(), expected, atol=1e-5, rtol=0)
        assert mask[i].tolist() == [1.0] * len(r) + [0.0] * (4 - len(r))


def test_grpo_gives_no_loss_when_every_group_is_all_equal(bed):
    """A random policy never writes a right worked answer: every group is all-zero, so there is no gradient."""
    loss, stats = precheck.grpo_loss(bed, bed.test, n=2, seed=0)
    assert loss is None and stats["all_zero_frac"] == 1.0 and stats["train_reward"] == 0.0


def test_imitation_learns_only_the_correct_samples(bed, monkeypatch):
    """The kept rows' NLL under the policy's prompt, and nothing from the wrong one."""
    problems = bed.test[:2]
    right = [bed.tokenizer.encode(CARRY.completion_text(p)) for p in problems]
    wrong = bed.tokenizer.encode("11<eos>")
    monkeypatch.setattr(precheck, "sample", lambda *a, **k: ([right[0], wrong, right[1], right[1]],
                                                             torch.tensor([[1.0, 0.0], [1.0, 1.0]])))  # fmt: skip
    loss, stats = precheck.imitation_loss(bed, problems, n=2, seed=0)
    kept = [problems[0], problems[1], problems[1]]
    logp, mask = precheck.response_logprobs(bed.policy, bed.prompt_ids("policy", kept), [right[0], right[1], right[1]])
    torch.testing.assert_close(loss, -(logp * mask).sum() / mask.sum())
    assert stats == {"teacher_sample_acc": 0.75, "kept": 3}


def test_every_arm_runs_seeded_from_a_tiny_cache(tmp_path):
    cache = tmp_path / "carry"
    load_task_models(cache, teacher_cfg=TINY5, policy_cfg=TINY5, progress=False, task="carry")
    argv = ["--models", str(cache), "--steps", "2", "--eval-every", "2", "--n-test", "4", "--batch", "2", "--n", "2"]
    for out in ("a.jsonl", "b.jsonl"):
        precheck.main([*argv, "--out", str(tmp_path / out)])
    rows = [json.loads(line) for line in (tmp_path / "a.jsonl").read_text().splitlines()]
    assert [r["arm"] for r in rows] == ["start"] + ["imitation"] * 3 + ["grpo"] * 3 + ["supervised"] * 3
    assert {r["task"] for r in rows} == {"carry"} and all(0 <= r["greedy_acc"] <= 1 for r in rows if "greedy_acc" in r)
    strip = [{k: v for k, v in r.items() if k != "seconds"} for r in rows]
    again = [json.loads(line) for line in (tmp_path / "b.jsonl").read_text().splitlines()]
    assert strip == [{k: v for k, v in r.items() if k != "seconds"} for r in again]  # seeded: the same run twice


def test_bad_arms_are_refused():
    with pytest.raises(ValueError, match="--arms"):
        precheck.main(["--arms", "start,ppo"])


def test_imitation_without_a_teacher_is_refused(bed):
    no_teacher = precheck.Testbed(CARRY, bed.policy, None, bed.tokenizer, 5, bed.test)
    with pytest.raises(ValueError, match="teacher"):
        precheck.imitation_loss(no_teacher, bed.test, n=2, seed=0)
