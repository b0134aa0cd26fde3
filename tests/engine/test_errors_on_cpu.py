"""What the engine does with bad models, bad logits and bad arguments: non-finite logits stop generation at once
with an error naming the model and the step; prompts that overflow the models' positions and malformed arguments
are one-line ValueErrors before any forward pass; a tokenizer's EOS ends a row."""

import pytest

from recipe.optimal_sampling import DualSampler, SamplerConfig
from recipe.optimal_sampling.tasks.tokenizer import build_tokenizer
from tests.tiny_models import tiny_qwen3

V = 32


def _corrupt_logits_from(model, call: int, how: str):
    """Forward hook: from the `call`-th forward on (0 = prefill), overwrite the logits of row 1 with `how`."""
    calls = []

    def hook(module, args, out):
        calls.append(1)
        if len(calls) > call:
            if how == "all_neg_inf":
                out.logits[1] = float("-inf")
            else:
                out.logits[1, -1, 3] = {"nan": float("nan"), "pos_inf": float("inf"), "neg_inf": float("-inf")}[how]
        return out

    return model.register_forward_hook(hook)


@pytest.mark.parametrize("how", ["nan", "pos_inf", "neg_inf", "all_neg_inf"])
@pytest.mark.parametrize("which", ["policy", "teacher"])
def test_non_finite_logits_stop_at_the_step_and_name_the_model(which, how):
    policy, teacher = tiny_qwen3(0, V, 8.0), tiny_qwen3(1, V, 8.0)
    handle = _corrupt_logits_from({"policy": policy, "teacher": teacher}[which], 2, how)
    sampler = DualSampler(policy, teacher, SamplerConfig.preset("balanced"))
    with pytest.raises(FloatingPointError) as info:
        sampler.generate([[1, 2], [3]], [[4], [5, 6]], max_new_tokens=6, seed=0)
    handle.remove()
    msg = str(info.value)
    assert f"the {which} model produced NaN or infinite logits at generated token 2 (rows [1])" in msg
    assert "bfloat16 or float32" in msg and "\n" not in msg


def test_policy_only_sampling_has_the_same_guard():
    policy, teacher = tiny_qwen3(0, V, 8.0), tiny_qwen3(1, V, 8.0)
    handle = _corrupt_logits_from(policy, 0, "pos_inf")
    with pytest.raises(FloatingPointError, match="policy model produced NaN or infinite logits at generated token 0"):
        DualSampler(policy, teacher).generate_policy_only([[1, 2], [3]], 4, seed=0)
    handle.remove()


def _eos_models(tokenizer):
    """Tiny models over the task tokenizer whose logits favour <eos> strongly after the first generated token."""
    models = [tiny_qwen3(s, len(tokenizer), 8.0) for s in (0, 1)]
    eos, calls = tokenizer.eos_token_id, []

    def hook(module, args, out):
        calls.append(1)
        if len(calls) > 2:  # prefill of both models done: from the second generated token on
            out.logits[..., eos] += 50.0
        return out

    for m in models:
        m.register_forward_hook(hook)
    return models


def test_a_given_tokenizer_s_eos_ends_the_row():
    tok = build_tokenizer()
    sampler = DualSampler(*_eos_models(tok), SamplerConfig(), tokenizer=tok)
    out = sampler.generate([[5, 6], [7]], [[8], [9, 10]], max_new_tokens=8, seed=0)
    assert out.finish_reasons == ["stop", "stop"], out.token_ids  # main ran to the length limit through <eos>
    assert all(row[-1] == tok.eos_token_id and tok.eos_token_id not in row[:-1] for row in out.token_ids)
    assert tok.eos_token_id in sampler.config.stop_token_ids
    without = DualSampler(*_eos_models(tok), SamplerConfig()).generate([[5, 6]], [[8]], max_new_tokens=8, seed=0)
    assert without.finish_reasons == ["length"]  # no tokenizer, no stop ids: nothing to stop on


@pytest.mark.parametrize(
    ("policy_len", "teacher_len", "max_new", "match"),
    [
        (250, 3, 10, r"policy_prompt_ids\[1\] has 250 tokens and max_new_tokens=10 needs 260 positions, but the "
                     r"policy model has max_position_embeddings=256: lower max_new_tokens to <= 6"),
        (3, 300, 4, r"teacher_prompt_ids\[1\] has 300 tokens .* shorten it to < 256 tokens"),
    ],
)  # fmt: skip
def test_prompts_longer_than_the_positions_are_refused(policy_len, teacher_len, max_new, match):
    sampler = DualSampler(tiny_qwen3(0, V), tiny_qwen3(1, V))  # max_position_embeddings=256
    with pytest.raises(ValueError, match=match):
        sampler.generate([[1], [1] * policy_len], [[2], [2] * teacher_len], max_new, seed=0)
    sampler.generate([[1], [1] * 250], [[2], [2] * 3], 6, seed=0)  # exactly the positions there are


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda s: s.generate("12+3", "12+3", 4), "policy_prompt_ids must be a list of token-id lists"),
        (lambda s: s.generate(["12", "3"], [[1], [2]], 4), r"policy_prompt_ids\[0\] must be a list of int token ids"),
        (lambda s: s.generate([[1.0, 2.0]], [[1]], 4), r"policy_prompt_ids\[0\] must be a list of int token ids"),
        (lambda s: s.generate([[1]], [[True]], 4), r"teacher_prompt_ids\[0\] must be a list of int token ids"),
        (lambda s: s.generate([[1]], [[1]], 4, seed="0"), "seed must be an int"),
        (lambda s: s.generate([[1]], [[1]], 4.0), "max_new_tokens must be an int"),
        (lambda s: s.generate_policy_only([], 4), "no prompts"),
        (lambda s: s.generate_policy_only([[1, 300]], 4), "outside the shared vocabulary"),
        (lambda s: s.generate_text("1+1=", build_tokenizer(), 4), "prompts must be a non-empty list of strings"),
        (lambda s: s.generate_text([], build_tokenizer(), 4), "prompts must be a non-empty list of strings"),
        (lambda s: s.generate_text(["1+1="], None, 4), "tokenizer must be a Hugging Face tokenizer"),
    ],
)
def test_malformed_arguments_are_one_line_value_errors(call, match):
    sampler = DualSampler(tiny_qwen3(0, V), tiny_qwen3(1, V))
    with pytest.raises(ValueError, match=match) as info:
        call(sampler)
    assert "\n" not in str(info.value)


def test_constructor_checks_its_arguments():
    model = tiny_qwen3(0, V)
    with pytest.raises(ValueError, match="teacher_model must be a causal LM"):
        DualSampler(model, "Qwen/Qwen3-14B")
    with pytest.raises(ValueError, match="config must be a SamplerConfig"):
        DualSampler(model, tiny_qwen3(1, V), {"alpha_method": "fixed"})
    with pytest.raises(ValueError, match="stop_token_ids must be"):
        SamplerConfig(stop_token_ids=7)
    with pytest.raises(ValueError, match="stop_token_ids must be"):
        SamplerConfig(stop_token_ids="12")
