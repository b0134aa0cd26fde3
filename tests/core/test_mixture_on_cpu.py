import pytest
import torch

from recipe.optimal_sampling.core import mix_logprobs, teacher_top_p_support, token_diagnostics
from tests.core.reference import kl64, q_alpha64, random_logp, top_p_set64


@pytest.mark.parametrize("seed", range(4))
def test_mixture_matches_the_float64_formula(seed):
    lp, lt = random_logp(seed), random_logp(seed + 1)
    alpha = torch.rand(4, generator=torch.Generator().manual_seed(seed))
    logq = mix_logprobs(lp, lt, alpha)
    torch.testing.assert_close(logq.double(), q_alpha64(lp, lt, alpha), atol=1e-5, rtol=0)
    torch.testing.assert_close(logq.exp().sum(-1), torch.ones(4))


def test_mixture_endpoints_are_the_two_models():
    lp, lt = random_logp(0), random_logp(1)
    torch.testing.assert_close(mix_logprobs(lp, lt, torch.zeros(4)), lp, atol=1e-6, rtol=0)
    torch.testing.assert_close(mix_logprobs(lp, lt, torch.ones(4)), lt, atol=1e-6, rtol=0)


def test_mixture_is_minus_inf_off_the_support_and_renormalised_on_it():
    lp, lt = random_logp(2, V=20), random_logp(3, V=20)
    support = teacher_top_p_support(lt, 0.7)
    logq = mix_logprobs(lp, lt, torch.full((4,), 0.3), support)
    assert torch.isneginf(logq[~support]).all()
    assert torch.isfinite(logq[support]).all()
    torch.testing.assert_close(logq.exp().sum(-1), torch.ones(4))
    torch.testing.assert_close(logq.double(), q_alpha64(lp, lt, torch.full((4,), 0.3), support), atol=1e-5, rtol=0)


def test_mixture_handles_minus_inf_inputs_without_nan():
    lp = torch.tensor([[0.0, float("-inf"), float("-inf")]])
    lt = torch.tensor([[float("-inf"), 0.0, float("-inf")]])
    logq = mix_logprobs(lp, lt, torch.tensor([0.5]))
    assert not logq.isnan().any()
    torch.testing.assert_close(logq.exp().sum(-1), torch.ones(1))


@pytest.mark.parametrize("top_p", [0.05, 0.5, 0.9, 0.95, 0.999])
@pytest.mark.parametrize("seed", range(3))
def test_top_p_support_is_the_smallest_set_reaching_top_p(seed, top_p):
    lt = random_logp(seed, B=4, V=32, scale=2.5)
    support = teacher_top_p_support(lt, top_p)
    assert torch.equal(support, top_p_set64(lt, top_p))
    assert (support.sum(-1) >= 1).all()
    assert ((lt.exp() * support).sum(-1) >= top_p - 1e-6).all()


def test_top_p_one_is_the_full_vocabulary_and_bad_values_raise():
    lt = random_logp(0)
    assert teacher_top_p_support(lt, 1.0).all()
    for bad in (0.0, -0.1, 1.01, float("nan")):
        with pytest.raises(ValueError, match="top_p"):
            teacher_top_p_support(lt, bad)


def test_top_p_keeps_the_argmax_of_a_one_hot_teacher():
    lt = torch.full((2, 10), -1e4).index_fill(1, torch.tensor([4]), 1e4).log_softmax(-1)
    support = teacher_top_p_support(lt, 0.5)
    assert support.sum().item() == 2 and support[:, 4].all()


@pytest.mark.parametrize("seed", range(3))
def test_diagnostics_match_float64_definitions(seed):
    lp, lt = random_logp(seed), random_logp(seed + 3)
    support = teacher_top_p_support(lt, 0.9)
    alpha = torch.full((4,), 0.4)
    logq = mix_logprobs(lp, lt, alpha, support)
    diag = token_diagnostics(lp, lt, logq)
    q64 = q_alpha64(lp, lt, alpha, support)
    torch.testing.assert_close(diag["kl_q_policy"].double(), kl64(q64, lp), atol=1e-5, rtol=0)
    torch.testing.assert_close(diag["kl_q_teacher"].double(), kl64(q64, lt), atol=1e-5, rtol=0)
    q = q64.exp()
    for name, logp in (("ess_policy", lp), ("ess_teacher", lt)):
        p = torch.where(support, logp.double().exp(), torch.zeros_like(q))
        expected = p.sum(-1) ** 2 / torch.where(support, p**2 / q, torch.zeros_like(q)).sum(-1)
        torch.testing.assert_close(diag[name].double(), expected, atol=1e-5, rtol=1e-5)
        assert ((diag[name] > 0) & (diag[name] <= 1 + 1e-6)).all()
    entropy = -torch.where(q > 0, q * q64, torch.zeros_like(q)).sum(-1)
    torch.testing.assert_close(diag["entropy_q"].double(), entropy, atol=1e-5, rtol=0)


def test_ess_is_one_when_q_is_the_model_itself():
    lp, lt = random_logp(0), random_logp(1)
    diag = token_diagnostics(lp, lt, lp)
    torch.testing.assert_close(diag["ess_policy"], torch.ones(4), atol=1e-5, rtol=0)
    torch.testing.assert_close(diag["kl_q_policy"], torch.zeros(4), atol=1e-6, rtol=0)
    assert (diag["ess_teacher"] < 1).all()
