import pytest
import torch

from recipe.optimal_sampling import DualSampler, SamplerConfig
from recipe.optimal_sampling.core import mix_logprobs, solve_alpha, teacher_top_p_support
from tests.tiny_models import tiny_qwen3

V = 32
POLICY_PROMPTS = [[1, 2, 3], [4, 5, 6, 7, 8, 9], [10]]
TEACHER_PROMPTS = [[11, 12], [13], [14, 15, 16, 17, 18, 19, 20]]


@pytest.fixture(scope="module")
def models():
    return tiny_qwen3(0, V, sharpness=8.0), tiny_qwen3(1, V, sharpness=8.0)


def full_forward_logp(model, prompt: list[int], tokens: list[int], temperature: float = 1.0) -> torch.Tensor:
    """log-probs (T, V) of the next token at each generated position, from one forward pass without a cache."""
    with torch.no_grad():
        logits = model(torch.tensor([prompt + tokens])).logits[0].float()
    return (logits[len(prompt) - 1 : len(prompt) - 1 + len(tokens)] / temperature).log_softmax(-1)


@pytest.mark.parametrize("preset", ["conservative", "balanced", "exploratory"])
def test_traces_equal_a_full_forward_pass_of_each_model(models, preset):
    policy, teacher = models
    cfg = SamplerConfig.preset(preset, temperature=0.8)
    out = DualSampler(policy, teacher, cfg).generate(POLICY_PROMPTS, TEACHER_PROMPTS, max_new_tokens=12, seed=0)
    for i, tokens in enumerate(out.token_ids):
        assert len(tokens) == 12 and out.finish_reasons[i] == "length"
        lp = full_forward_logp(policy, POLICY_PROMPTS[i], tokens, 0.8)  # (T, V)
        lt = full_forward_logp(teacher, TEACHER_PROMPTS[i], tokens, 0.8)  # (T, V)
        idx = torch.tensor(tokens).unsqueeze(-1)
        torch.testing.assert_close(torch.tensor(out.logp_policy[i]), lp.gather(-1, idx).squeeze(-1), atol=1e-4, rtol=0)
        torch.testing.assert_close(torch.tensor(out.logp_teacher[i]), lt.gather(-1, idx).squeeze(-1), atol=1e-4, rtol=0)
        # log q* of the sampled token, rebuilt from the reference log-probs and the recorded alpha
        support = None if cfg.teacher_top_p is None else teacher_top_p_support(lt, cfg.teacher_top_p)
        logq = mix_logprobs(lp, lt, torch.tensor(out.alpha[i]), support)
        torch.testing.assert_close(torch.tensor(out.logp_q[i]), logq.gather(-1, idx).squeeze(-1), atol=1e-4, rtol=0)
        # the recorded alpha is the solver's alpha on the reference log-probs (apart from forced tokens)
        solved = solve_alpha(lp, lt, support)
        free = ~torch.tensor(out.forced[i])
        torch.testing.assert_close(torch.tensor(out.alpha[i])[free], solved[free], atol=1e-4, rtol=0)


def test_forcing_draws_the_first_tokens_from_the_teacher(models):
    cfg = SamplerConfig(force_teacher_tokens=3)
    out = DualSampler(*models, cfg).generate(POLICY_PROMPTS, TEACHER_PROMPTS, max_new_tokens=6, seed=1)
    for i in range(3):
        assert out.forced[i] == [True] * 3 + [False] * 3
        assert out.alpha[i][:3] == [1.0, 1.0, 1.0]
        torch.testing.assert_close(torch.tensor(out.logp_q[i][:3]), torch.tensor(out.logp_teacher[i][:3]))
        assert all(0 <= a < 1 for a in out.alpha[i][3:])


def test_constraint_keeps_every_token_inside_the_teachers_top_p_set(models):
    policy, teacher = models
    cfg = SamplerConfig(teacher_top_p=0.6)
    out = DualSampler(policy, teacher, cfg).generate(POLICY_PROMPTS * 4, TEACHER_PROMPTS * 4, 10, seed=2)
    for i, tokens in enumerate(out.token_ids):
        lt = full_forward_logp(teacher, TEACHER_PROMPTS[i % 3], tokens)
        support = teacher_top_p_support(lt, 0.6)  # (T, V)
        assert support[torch.arange(len(tokens)), torch.tensor(tokens)].all()
        assert out.support_size[i] == support.sum(-1).tolist()
    assert max(max(s) for s in out.support_size) < V  # the constraint was active


def test_empirical_frequencies_match_q_star(models):
    """Chi-square goodness of fit of 6000 first tokens against q* computed from the models' logits."""
    policy, teacher = models
    cfg = SamplerConfig(teacher_top_p=0.95)
    n = 6000
    out = DualSampler(policy, teacher, cfg).generate([[3, 1, 4]] * n, [[2, 7]] * n, max_new_tokens=1, seed=3)
    lp, lt = full_forward_logp(policy, [3, 1, 4], [0]), full_forward_logp(teacher, [2, 7], [0])  # (1, V)
    support = teacher_top_p_support(lt, 0.95)
    q = mix_logprobs(lp, lt, solve_alpha(lp, lt, support), support).exp()[0].double()  # (V,)
    counts = torch.bincount(torch.tensor([t[0] for t in out.token_ids]), minlength=V).double()
    assert counts[q == 0].sum() == 0  # nothing outside the support
    cells = q * n >= 5  # chi-square needs expected counts >= 5 per cell; pool the rest
    expected = torch.cat([q[cells] * n, (q[~cells] * n).sum().reshape(1)])
    observed = torch.cat([counts[cells], counts[~cells].sum().reshape(1)])
    keep = expected > 0
    chi2 = ((observed - expected)[keep] ** 2 / expected[keep]).sum().item()
    dof = int(keep.sum()) - 1
    assert dof >= 3, "q* should spread over several tokens for this test to mean something"
    # 99.9th percentile of chi-square: dof + 3.1 sqrt(2 dof) + 7 bounds it for dof <= 40 (Wilson-Hilferty)
    assert chi2 < dof + 3.1 * (2 * dof) ** 0.5 + 7, (chi2, dof)


def test_rows_stop_independently_on_any_stop_token(models):
    stop = (5, 17)
    cfg = SamplerConfig(stop_token_ids=stop)
    prompts_p, prompts_t = POLICY_PROMPTS * 5, TEACHER_PROMPTS * 5
    out = DualSampler(*models, cfg).generate(prompts_p, prompts_t, max_new_tokens=10, seed=4)
    assert {"stop", "length"} == set(out.finish_reasons), out.finish_reasons
    for tokens, reason, lq in zip(out.token_ids, out.finish_reasons, out.logp_q, strict=True):
        assert len(lq) == len(tokens)
        if reason == "stop":
            assert tokens[-1] in stop and not set(tokens[:-1]) & set(stop)
        else:
            assert len(tokens) == 10 and not set(tokens) & set(stop)


def test_same_seed_same_samples_other_seed_other_samples(models):
    sampler = DualSampler(*models, SamplerConfig.preset("exploratory"))
    a = sampler.generate(POLICY_PROMPTS, TEACHER_PROMPTS, 8, seed=7)
    b = sampler.generate(POLICY_PROMPTS, TEACHER_PROMPTS, 8, seed=7)
    c = sampler.generate(POLICY_PROMPTS, TEACHER_PROMPTS, 8, seed=8)
    assert a.token_ids == b.token_ids and a.logp_q == b.logp_q
    assert a.token_ids != c.token_ids


def test_fixed_alpha_zero_samples_from_the_policy(models):
    cfg = SamplerConfig(alpha_method="fixed", fixed_alpha=0.0)
    out = DualSampler(*models, cfg).generate(POLICY_PROMPTS, TEACHER_PROMPTS, 5, seed=0)
    for i in range(3):
        torch.testing.assert_close(torch.tensor(out.logp_q[i]), torch.tensor(out.logp_policy[i]))


def test_diagnostics_are_recorded_per_token(models):
    out = DualSampler(*models, SamplerConfig()).generate(POLICY_PROMPTS, TEACHER_PROMPTS, 4, seed=0)
    for name in ("kl_q_policy", "kl_q_teacher", "ess_policy", "ess_teacher", "entropy_q"):
        assert [len(v) for v in out.diagnostics[name]] == [4, 4, 4]
    # at the KL-symmetry point the two KLs agree (no constraint, nothing forced)
    torch.testing.assert_close(
        torch.tensor(out.diagnostics["kl_q_policy"]), torch.tensor(out.diagnostics["kl_q_teacher"]), atol=1e-4, rtol=0
    )
    row = out.row(0)
    assert row["finish_reason"] == "length" and len(row["kl_q_policy"]) == 4


def test_padded_vocabulary_is_cut_to_the_tokenizer_size():
    policy, teacher = tiny_qwen3(0, 40, 8.0), tiny_qwen3(1, 48, 8.0)  # padded embedding tables
    with pytest.raises(ValueError, match="output rows"):
        DualSampler(policy, teacher)
    out = DualSampler(policy, teacher, vocab_size=V).generate(POLICY_PROMPTS, TEACHER_PROMPTS, 10, seed=0)
    assert max(max(t) for t in out.token_ids) < V
    lp = full_forward_logp(policy, POLICY_PROMPTS[0], out.token_ids[0])[:, :V].log_softmax(-1)
    idx = torch.tensor(out.token_ids[0]).unsqueeze(-1)
    torch.testing.assert_close(torch.tensor(out.logp_policy[0]), lp.gather(-1, idx).squeeze(-1), atol=1e-4, rtol=0)
    with pytest.raises(ValueError, match="do not cover"):
        DualSampler(policy, teacher, vocab_size=44)


@pytest.mark.parametrize(
    ("policy_prompts", "teacher_prompts", "max_new", "match"),
    [
        ([[1, 2]], [[1], [2]], 4, "one policy prompt and one teacher prompt"),
        ([], [], 4, "no prompts"),
        ([[1, 2], []], [[1], [2]], 4, r"policy_prompt_ids\[1\] is empty"),
        ([[1, 2]], [[]], 4, r"teacher_prompt_ids\[0\] is empty"),
        ([[1, V]], [[1]], 4, "outside the shared vocabulary"),
        ([[1]], [[1]], 0, "max_new_tokens"),
    ],
)
def test_bad_prompts_raise_clear_errors(models, policy_prompts, teacher_prompts, max_new, match):
    with pytest.raises(ValueError, match=match):
        DualSampler(*models).generate(policy_prompts, teacher_prompts, max_new)


def test_nan_logits_are_an_error_not_a_sample():
    policy, teacher = tiny_qwen3(0, V), tiny_qwen3(1, V)
    with torch.no_grad():
        teacher.lm_head.weight[3, 0] = float("nan")
    with pytest.raises(FloatingPointError, match="teacher model produced NaN"):
        DualSampler(policy, teacher).generate([[1, 2]], [[3]], 3, seed=0)
