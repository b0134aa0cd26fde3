import pytest
import torch

from recipe.optimal_sampling.core import mix_logprobs, solve_alpha, teacher_top_p_support, token_diagnostics
from tests.core.reference import bisect_root64, delta64, q_alpha64, random_logp, restrict64

V_FULL = 151_936  # Qwen3's vocabulary


@pytest.mark.parametrize("seed", range(5))
def test_kl_symmetry_balances_the_two_kls(seed):
    lp, lt = random_logp(seed), random_logp(seed + 100)
    alpha = solve_alpha(lp, lt)
    logq = mix_logprobs(lp, lt, alpha)
    diag = token_diagnostics(lp, lt, logq)
    assert ((alpha > 0) & (alpha < 1)).all(), alpha
    torch.testing.assert_close(diag["kl_q_policy"], diag["kl_q_teacher"], atol=1e-5, rtol=0)
    torch.testing.assert_close(delta64(lp, lt, alpha), torch.zeros(4, dtype=torch.float64), atol=1e-5, rtol=0)


@pytest.mark.parametrize("seed", range(3))
def test_delta_is_monotone_with_the_documented_endpoints(seed):
    lp, lt = random_logp(seed, B=3), random_logp(seed + 7, B=3)
    grid = [torch.full((3,), a) for a in torch.linspace(0, 1, 21).tolist()]
    deltas = torch.stack([delta64(lp, lt, a) for a in grid])  # (21, B)
    assert (deltas.diff(dim=0) >= -1e-12).all()
    kl = lambda a, b: (a.double().exp() * (a.double() - b.double())).sum(-1)  # noqa: E731
    torch.testing.assert_close(deltas[0], -kl(lp, lt))  # Delta(0) = -KL(pi_theta || pi_t)
    torch.testing.assert_close(deltas[-1], kl(lt, lp))  # Delta(1) = KL(pi_t || pi_theta)


@pytest.mark.parametrize("scale", [1.0, 10.0, 100.0])
def test_kl_symmetry_matches_float64_bisection_on_the_full_vocabulary(scale):
    g = torch.Generator().manual_seed(int(scale))
    lp = (torch.randn(3, V_FULL, generator=g) * scale).log_softmax(-1)
    lt = (torch.randn(3, V_FULL, generator=g) * scale).log_softmax(-1)
    alpha = solve_alpha(lp, lt)
    assert alpha.dtype == torch.float32
    expected = bisect_root64(lambda a: delta64(lp, lt, a), B=3)
    assert (alpha.double() - expected).abs().max() < 1e-4


def _one_hot_logp(B: int, V: int, token: int) -> torch.Tensor:
    return torch.full((B, V), -1e4).index_fill(1, torch.tensor([token]), 1e4).log_softmax(-1)


@pytest.mark.parametrize(
    "case",
    ["one_hot_pair", "one_hot_vs_smooth", "smooth_vs_one_hot", "extreme_logits"],
)
def test_sharp_and_extreme_rows_are_nan_free_and_converged(case):
    g = torch.Generator().manual_seed(0)
    B, V = 3, 4096
    smooth = torch.randn(B, V, generator=g).log_softmax(-1)
    extreme = lambda: ((torch.randint(0, 2, (B, V), generator=g) * 2 - 1) * 1e4).float().log_softmax(-1)  # noqa: E731
    lp, lt = {
        "one_hot_pair": (_one_hot_logp(B, V, 3), _one_hot_logp(B, V, 7)),
        "one_hot_vs_smooth": (_one_hot_logp(B, V, 3), smooth),
        "smooth_vs_one_hot": (smooth, _one_hot_logp(B, V, 3)),
        "extreme_logits": (extreme(), extreme()),
    }[case]
    for method in ("kl_symmetry", "ess_balance", "entropy"):
        alpha = solve_alpha(lp, lt, method=method)
        logq = mix_logprobs(lp, lt, alpha)
        diag = token_diagnostics(lp, lt, logq)
        assert torch.isfinite(alpha).all() and ((alpha >= 0) & (alpha <= 1)).all(), (method, alpha)
        assert not logq.isnan().any(), method
        assert all(torch.isfinite(v).all() for v in diag.values()), (method, diag)
    expected = bisect_root64(lambda a: delta64(lp, lt, a), B=B)
    assert (solve_alpha(lp, lt).double() - expected).abs().max() < 1e-4


def test_identical_distributions_give_one_half():
    lp = random_logp(0)
    for method in ("kl_symmetry", "ess_balance", "entropy"):
        torch.testing.assert_close(solve_alpha(lp, lp.clone(), method=method), torch.full((4,), 0.5))


def test_fixed_alpha_and_its_validation():
    lp, lt = random_logp(0), random_logp(1)
    torch.testing.assert_close(solve_alpha(lp, lt, method="fixed", fixed_alpha=0.25), torch.full((4,), 0.25))
    with pytest.raises(ValueError, match="fixed_alpha"):
        solve_alpha(lp, lt, method="fixed")
    with pytest.raises(ValueError, match="fixed_alpha"):
        solve_alpha(lp, lt, method="fixed", fixed_alpha=1.5)
    with pytest.raises(ValueError, match="alpha method"):
        solve_alpha(lp, lt, method="chernoff")


@pytest.mark.parametrize("seed", range(4))
def test_ess_balance_equalises_the_effective_sample_sizes(seed):
    lp, lt = random_logp(seed, scale=3.0), random_logp(seed + 50, scale=3.0)
    alpha = solve_alpha(lp, lt, method="ess_balance")
    diag = token_diagnostics(lp, lt, mix_logprobs(lp, lt, alpha))
    torch.testing.assert_close(diag["ess_policy"], diag["ess_teacher"], atol=1e-4, rtol=1e-4)


def test_entropy_alpha_trusts_the_more_confident_model():
    sharp, flat = random_logp(0, scale=8.0), random_logp(1, scale=0.1)
    alpha = solve_alpha(flat, sharp, method="entropy")  # uncertain policy, confident teacher
    h = lambda lp: -(lp.exp() * lp).sum(-1)  # noqa: E731
    torch.testing.assert_close(alpha, h(flat) / (h(flat) + h(sharp)))
    assert (alpha > 0.5).all()


def ess_gap64(lp, lt, alpha, support=None):
    """log sum pi_theta^2 / q - log sum pi_t^2 / q in float64, restricted to the support (off it: no terms)."""
    lp_s, lt_s = restrict64(lp, support), restrict64(lt, support)
    logq = q_alpha64(lp_s, lt_s, alpha, support)
    on = logq > float("-inf")
    log_sum = lambda x: torch.where(on, x, torch.full_like(x, float("-inf"))).logsumexp(-1)  # noqa: E731
    return log_sum(2 * lp_s - logq) - log_sum(2 * lt_s - logq)


@pytest.mark.parametrize("seed", range(4))
def test_ess_balance_on_a_support_matches_float64_bisection(seed):
    """With a top-p support (the presets' setting), off-support terms must not turn the ESS gap into NaN."""
    lp, lt = random_logp(seed, V=16, scale=3.0), random_logp(seed + 9, V=16, scale=3.0)
    support = teacher_top_p_support(lt, 0.9)
    alpha = solve_alpha(lp, lt, support=support, method="ess_balance")
    expected = bisect_root64(lambda a: ess_gap64(lp, lt, a, support), B=4)
    single = support.sum(-1) == 1  # one token: both restrictions are the same one-hot, alpha = 0.5
    assert (~single).any(), "the test needs rows with a support of several tokens"
    expected = torch.where(single, torch.full_like(expected, 0.5), expected)
    assert ((expected > 1e-3) & (expected < 1 - 1e-3) | single).all(), expected  # interior roots: a real check
    assert (alpha.double() - expected).abs().max() < 1e-5, (alpha, expected)


@pytest.mark.parametrize("seed", range(3))
def test_support_restricts_both_distributions_before_solving(seed):
    lp, lt = random_logp(seed, V=16), random_logp(seed + 9, V=16)
    support = teacher_top_p_support(lt, 0.8)
    alpha = solve_alpha(lp, lt, support=support)
    expected = bisect_root64(lambda a: delta64(lp, lt, a, support), B=4)
    single = support.sum(-1) == 1  # both restrict to the same one-hot: equal distributions, alpha = 0.5
    expected = torch.where(single, torch.full_like(expected, 0.5), expected)
    assert (alpha.double() - expected).abs().max() < 1e-5
    # the restricted solve differs from the unrestricted one: the support really entered the equation
    assert (alpha - solve_alpha(lp, lt)).abs().max() > 1e-3
