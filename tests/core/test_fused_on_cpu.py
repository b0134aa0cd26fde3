"""core.fused on CPU through Triton's interpreter. Skipped unless Triton is installed and TRITON_INTERPRET=1 is set
before the run (e.g. `TRITON_INTERPRET=1 pytest tests/core/test_fused_on_cpu.py`); the GPU twin is test_fused_gpu."""

import pytest
import torch

from recipe.optimal_sampling.core import mix_logprobs, solve_alpha, teacher_top_p_support, token_diagnostics
from recipe.optimal_sampling.core.fused import (
    RECORD_FIELDS,
    fused_alpha,
    fused_available,
    fused_sample,
    support_from_threshold,
    topp_passes,
)

needs_interpreter = pytest.mark.skipif(not fused_available("cpu"), reason="needs Triton with TRITON_INTERPRET=1")


def small_support_rows(V: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Teacher top-0.9 set = 2 tokens the policy finds unlikely (log-mass ~ -12): log-probs that are not
    renormalised on the support carry float32 noise ~ ulp(12) = 1e-6 into Delta, whose slope is ~0.2 here."""
    g = torch.Generator().manual_seed(7)
    lg_p, lg_t = torch.randn(2, V, generator=g), torch.randn(2, V, generator=g)
    lg_t[:, :2] = torch.tensor([[20.0, 19.95], [18.0, 17.9]])
    lg_p[:, :2] = torch.tensor([[-5.0, -6.0], [-3.0, -4.5]])
    return lg_p, lg_t


def test_topp_search_is_exact_for_each_dtype():
    assert (topp_passes(torch.bfloat16), topp_passes(torch.float16), topp_passes(torch.float32)) == (4, 5, 8)


@needs_interpreter
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("top_p", [None, 0.9])
@pytest.mark.parametrize("sharpness", [1.0, 20.0])
def test_fused_alpha_matches_solve_alpha(dtype, top_p, sharpness):
    g = torch.Generator().manual_seed(0)
    lg_p, lg_t = torch.randn(3, 2500, generator=g) * sharpness, torch.randn(3, 2500, generator=g) * sharpness
    lg_p, lg_t = lg_p.to(dtype), lg_t.to(dtype)
    alpha, thr = fused_alpha(lg_p, lg_t, 1.0, top_p)
    lp, lt = lg_p.float().log_softmax(-1), lg_t.float().log_softmax(-1)
    support = None if top_p is None else teacher_top_p_support(lt, top_p)
    if support is not None and dtype == torch.float32:  # bf16 rows have ties at the cut: the fused set keeps all
        assert (support_from_threshold(lg_t, thr) == support).all()
    if support is not None:
        support = support_from_threshold(lg_t, thr)
    torch.testing.assert_close(alpha, solve_alpha(lp, lt, support), atol=1e-4, rtol=0)


@needs_interpreter
def test_fused_alpha_on_a_small_support_far_from_the_policy():
    lg_p, lg_t = small_support_rows(2500)
    alpha, thr = fused_alpha(lg_p, lg_t, 1.0, 0.9)
    lp, lt = lg_p.log_softmax(-1), lg_t.log_softmax(-1)
    support = teacher_top_p_support(lt, 0.9)
    assert (support_from_threshold(lg_t, thr) == support).all() and (support.sum(-1) == 2).all()
    torch.testing.assert_close(alpha, solve_alpha(lp, lt, support), atol=1e-4, rtol=0)


@needs_interpreter
def test_fused_record_matches_reference_maths():
    g = torch.Generator().manual_seed(3)
    lg_p, lg_t = (torch.randn(3, 2500, generator=g) * 4).bfloat16(), (torch.randn(3, 2500, generator=g) * 4).bfloat16()
    token, rec = fused_sample(lg_p, lg_t, torch.tensor(2), torch.tensor(11), temperature=0.7, top_p=0.9)
    check_record(token, rec, lg_p, lg_t, temperature=0.7, top_p=0.9)


def check_record(token, rec, lg_p, lg_t, temperature: float, top_p: float, method="kl_symmetry", fixed_alpha=None):
    """fused_sample's record at the sampled tokens against the reference maths of `core` on the fused support."""
    lp, lt = (lg_p.float() / temperature).log_softmax(-1), (lg_t.float() / temperature).log_softmax(-1)
    support = support_from_threshold(lg_t, fused_alpha(lg_p, lg_t, temperature, top_p)[1])
    alpha = solve_alpha(lp, lt, support, method, fixed_alpha)
    logq = mix_logprobs(lp, lt, alpha, support)
    pick = lambda x: x.gather(-1, token[:, None])[:, 0]  # noqa: E731
    ref = {"logp_q": pick(logq), "logp_policy": pick(lp), "logp_teacher": pick(lt), "alpha": alpha,
           "support_size": support.sum(-1).float(), **token_diagnostics(lp, lt, logq)}  # fmt: skip
    assert support.gather(-1, token[:, None]).all()
    for name, value in ref.items():
        torch.testing.assert_close(rec[RECORD_FIELDS.index(name)], value.float(), atol=2e-4, rtol=1e-4, msg=name)


@needs_interpreter
def test_fused_sampling_covers_every_column_uniformly():
    """Equal logits: q* is uniform, so tokens spread over all columns, each of the 4 outputs of a Philox call
    (column mod 4) alike; rows are independent streams and a new step gives new tokens."""
    lg = torch.zeros(128, 2048)
    kw = {"alpha_method": "fixed", "fixed_alpha": 0.5}  # no alpha passes: the interpreter is slow
    token, _ = fused_sample(lg, lg, torch.tensor(0), torch.tensor(5), **kw)
    again, _ = fused_sample(lg[:32], lg[:32], torch.tensor(1), torch.tensor(5), **kw)
    assert token.unique().numel() > 110 and (token[:32] != again).float().mean() > 0.9
    assert torch.bincount(token % 4, minlength=4).min() >= 16  # 32 expected
    assert torch.bincount(token // 1024, minlength=2).min() >= 44  # 64 expected


@needs_interpreter
@pytest.mark.parametrize("top_p", [None, 0.9])
def test_rows_with_non_finite_logits_get_nan_alpha_and_are_counted(top_p):
    """As core.solve_alpha on rows that are not distributions: NaN, never a plausible alpha (before: 0.0, 1.0,
    0.515); the record counts every non-finite logit for the engine's guard."""
    g = torch.Generator().manual_seed(0)
    lg_p, lg_t = torch.randn(5, 1024, generator=g), torch.randn(5, 1024, generator=g)
    lg_p[1, 3], lg_t[2, 5], lg_p[3], lg_t[4, 7] = float("nan"), float("inf"), float("-inf"), float("-inf")
    alpha, _ = fused_alpha(lg_p, lg_t, 1.0, top_p)
    assert alpha[1:].isnan().all() and not alpha[0].isnan(), alpha
    _, rec = fused_sample(lg_p, lg_t, torch.tensor(0), torch.tensor(1), top_p=top_p, alpha_method="fixed",
                          fixed_alpha=0.5)  # fmt: skip
    counts = rec[RECORD_FIELDS.index("nan_policy")] + rec[RECORD_FIELDS.index("nan_teacher")]
    assert counts.tolist() == [0.0, 1.0, 1.0, 1024.0, 1.0]
    assert rec[RECORD_FIELDS.index("alpha"), 1:].isnan().all()
