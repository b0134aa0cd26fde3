"""Bad input to the public `core` functions: wrong types, dtypes, shapes and devices raise a one-line ValueError at
the call; rows that are not distributions (NaN, +inf, all -inf, an empty support) come out NaN, never a plausible
alpha such as 0.5 (core reads no values on the host, so it cannot raise on them)."""

import pytest
import torch

from recipe.optimal_sampling.core import (
    ALPHA_METHODS,
    mix_logprobs,
    solve_alpha,
    teacher_top_p_support,
    token_diagnostics,
)
from tests.core.reference import random_logp

V = 16


def _bad_rows() -> tuple[torch.Tensor, torch.Tensor]:
    """Row 0 good; row 1 a NaN in the policy; row 2 +inf in the teacher; row 3 an all -inf policy row."""
    lp, lt = random_logp(0, B=4, V=V), random_logp(1, B=4, V=V)
    lp[1, 3] = float("nan")
    lt[2, 5] = float("inf")
    lp[3] = float("-inf")
    return lp, lt


@pytest.mark.parametrize("method", ALPHA_METHODS)
def test_alpha_is_nan_on_rows_that_are_not_distributions(method):
    lp, lt = _bad_rows()
    alpha = solve_alpha(lp, lt, method=method, fixed_alpha=0.3 if method == "fixed" else None)
    assert alpha[1:].isnan().all(), alpha  # main returned 0.5 (a plausible alpha) on these rows
    assert not alpha[0].isnan()
    torch.testing.assert_close(alpha[:1], solve_alpha(lp[:1], lt[:1], method=method,
                                                      fixed_alpha=0.3 if method == "fixed" else None))  # fmt: skip


def test_an_empty_support_gives_nan_and_a_support_keeps_the_nan():
    lp, lt = _bad_rows()
    support = teacher_top_p_support(lt.nan_to_num(posinf=0.0), 0.9)
    support[0] = False  # a caller-built support with nothing in it
    alpha = solve_alpha(lp, lt, support)
    assert alpha.isnan().all(), alpha


def test_mixture_and_diagnostics_are_nan_on_bad_rows_and_exact_on_good_ones():
    lp, lt = _bad_rows()
    alpha = torch.full((4,), 0.5)
    logq = mix_logprobs(lp, lt, alpha)
    assert logq[1:].isnan().all()  # main floored the all -inf row into a uniform distribution
    torch.testing.assert_close(logq[0], mix_logprobs(lp[:1], lt[:1], alpha[:1])[0])
    diag = token_diagnostics(lp, lt, logq)
    for name, value in diag.items():
        assert value[1:].isnan().all() and not value[0].isnan(), (name, value)
    torch.testing.assert_close(mix_logprobs(lp[:1], lt[:1], torch.tensor([float("nan")])).isnan().all(),
                               torch.tensor(True))  # fmt: skip


def _check(fn, match, *args, **kwargs):
    with pytest.raises(ValueError, match=match) as info:
        fn(*args, **kwargs)
    assert "\n" not in str(info.value)


def test_types_dtypes_shapes_and_devices_are_refused_at_the_call():
    lp, lt = random_logp(0, B=2, V=V), random_logp(1, B=2, V=V)
    _check(solve_alpha, "logp_teacher has shape .*vocabulary", lp, lt[:, :-1])
    _check(solve_alpha, "logp_policy must be a torch.Tensor", lp.tolist(), lt)
    _check(solve_alpha, "dtype torch.int64", lp, lt.long())
    _check(solve_alpha, "support must be a bool tensor", lp, lt, support=torch.ones(2, V))
    _check(solve_alpha, "support has shape", lp, lt, support=torch.ones(2, V - 1, dtype=torch.bool))
    _check(solve_alpha, "num_iters", lp, lt, num_iters=0)
    _check(solve_alpha, "fixed_alpha", lp, lt, method="fixed", fixed_alpha=True)
    _check(solve_alpha, "has shape \\(2, 0\\)", lp[:, :0], lt[:, :0])
    _check(mix_logprobs, "alpha has shape", lp, lt, torch.zeros(3))
    _check(mix_logprobs, "alpha must be a float tensor", lp, lt, 0.5)
    _check(mix_logprobs, "logp_teacher has shape", lp, lt[:1], torch.zeros(2))
    _check(token_diagnostics, "logq has shape", lp, lt, lp[:, :-1])
    _check(teacher_top_p_support, "top_p must be in", lt, 1.5)
    _check(teacher_top_p_support, "top_p must be in", lt, True)
    _check(teacher_top_p_support, "dtype torch.bool", lt > 0, 0.9)
    if torch.device("meta") != lp.device:  # a second device that needs no accelerator
        _check(solve_alpha, "is on meta", lp, lt.to("meta"))
