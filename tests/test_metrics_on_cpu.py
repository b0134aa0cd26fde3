import pytest
import torch

from recipe.optimal_sampling import DualSampler, SamplerConfig
from recipe.optimal_sampling.metrics import reduce_metrics
from tests.tiny_models import tiny_qwen3


def test_metrics_from_a_real_sample_have_the_documented_names_and_values():
    policy, teacher = tiny_qwen3(0, 32, 8.0), tiny_qwen3(1, 32, 8.0)
    out = DualSampler(policy, teacher, SamplerConfig.preset("balanced")).generate([[1, 2], [3]], [[4], [5, 6]], 6, 0)
    metrics = reduce_metrics(out.flat_traces())
    rows = zip(out.alpha, out.forced, out.support_size, strict=True)
    alpha_free = [a for seq, f, s in rows for a, x, n in zip(seq, f, s, strict=True) if not x and n > 1]
    assert 0 < len(alpha_free) < 12
    assert metrics["optimal_sampling/alpha_mean"] == pytest.approx(sum(alpha_free) / len(alpha_free))
    assert metrics["optimal_sampling/forced_frac"] == pytest.approx(2 / 12)  # first token of each of 2 rows
    assert metrics["optimal_sampling/num_tokens"] == 12
    assert metrics["optimal_sampling/alpha_p10"] <= metrics["optimal_sampling/alpha_p50"]
    assert metrics["optimal_sampling/alpha_p50"] <= metrics["optimal_sampling/alpha_p90"]
    assert 1 <= metrics["optimal_sampling/support_size_mean"] <= 32
    assert all(isinstance(v, float) for v in metrics.values())


def test_kl_sym_err_is_zero_at_the_unconstrained_kl_symmetry_point_and_not_for_fixed_alpha():
    policy, teacher = tiny_qwen3(0, 32, 8.0), tiny_qwen3(1, 32, 8.0)
    balanced = DualSampler(policy, teacher, SamplerConfig()).generate([[1, 2]] * 4, [[3]] * 4, 5, seed=0)
    fixed = DualSampler(policy, teacher, SamplerConfig(alpha_method="fixed", fixed_alpha=0.9)).generate(
        [[1, 2]] * 4, [[3]] * 4, 5, seed=0
    )
    assert reduce_metrics(balanced.flat_traces())["optimal_sampling/kl_sym_err"] < 1e-4
    assert reduce_metrics(fixed.flat_traces())["optimal_sampling/kl_sym_err"] > 1e-2


def test_importance_weight_is_policy_over_q():
    traces = {
        "alpha": [0.5, 0.5], "forced": [False, False], "support_size": [3, 4], "kl_q_policy": [0.1, 0.2],
        "kl_q_teacher": [0.1, 0.2], "ess_policy": [0.5, 0.5], "ess_teacher": [0.25, 1.0], "entropy_q": [1.0, 1.0],
        "logp_q": [torch.tensor(0.5).log().item(), torch.tensor(0.25).log().item()],
        "logp_policy": [torch.tensor(0.25).log().item(), torch.tensor(0.5).log().item()],
    }  # fmt: skip
    m = reduce_metrics(traces)
    assert m["optimal_sampling/is_weight_mean"] == pytest.approx((0.5 + 2.0) / 2)
    assert m["optimal_sampling/is_weight_max"] == pytest.approx(2.0)
    assert m["optimal_sampling/ess_ratio"] == pytest.approx((2.0 * 0.5) ** 0.5)  # geometric mean of 2 and 0.5


def _traces(alpha, forced, support_size) -> dict:
    n = len(alpha)
    return {
        "alpha": alpha, "forced": forced, "support_size": support_size, "kl_q_policy": [0.2] * n,
        "kl_q_teacher": [0.1] * n, "ess_policy": [0.5] * n, "ess_teacher": [0.5] * n, "entropy_q": [0.0] * n,
        "logp_q": [0.0] * n, "logp_policy": [-0.1] * n,
    }  # fmt: skip


def test_alpha_statistics_are_absent_when_no_token_is_free():
    # every token forced (alpha = 1) or single-support (alpha solved but irrelevant): the statistics are undefined
    m = reduce_metrics(_traces([1.0, 1.0, 0.37, 0.08], [True, True, False, False], [3, 1, 1, 1]))
    undefined = ("alpha_mean", "alpha_std", "alpha_p10", "alpha_p50", "alpha_p90", "kl_sym_err")
    assert not any("optimal_sampling/" + k in m for k in undefined), m  # main: alpha_mean 0.61, p90 1.0
    assert m["optimal_sampling/forced_frac"] == 0.5 and m["optimal_sampling/single_support_frac"] == 0.75
    assert m["optimal_sampling/num_tokens"] == 4


def test_alpha_statistics_cover_only_the_free_tokens():
    alpha, forced, size = [1.0, 0.2, 0.4, 0.9, 0.3], [True, False, False, False, False], [5, 4, 1, 2, 3]
    m = reduce_metrics(_traces(alpha, forced, size), prefix="")
    free = torch.tensor([0.2, 0.9, 0.3], dtype=torch.float64)
    assert m["alpha_mean"] == pytest.approx(float(free.mean()))
    assert m["alpha_p50"] == pytest.approx(0.3) and m["alpha_p90"] == pytest.approx(float(free.quantile(0.9)))
    assert m["kl_sym_err"] == pytest.approx(0.1)
