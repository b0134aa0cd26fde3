"""core.fused on CPU through Triton's interpreter. Skipped unless Triton is installed and TRITON_INTERPRET=1 is set
before the run (e.g. `TRITON_INTERPRET=1 pytest tests/core/test_fused_on_cpu.py`); the GPU twin is test_fused_gpu."""

import pytest
import torch

from recipe.optimal_sampling.core import solve_alpha, teacher_top_p_support
from recipe.optimal_sampling.core.fused import fused_alpha, fused_available, support_from_threshold, topp_passes

needs_interpreter = pytest.mark.skipif(not fused_available("cpu"), reason="needs Triton with TRITON_INTERPRET=1")


def test_topp_search_is_exact_for_each_dtype():
    assert (topp_passes(torch.bfloat16), topp_passes(torch.float16), topp_passes(torch.float32)) == (4, 5, 8)


@needs_interpreter
@pytest.mark.parametrize("top_p", [None, 0.9])
@pytest.mark.parametrize("sharpness", [1.0, 20.0])
def test_fused_alpha_matches_solve_alpha(top_p, sharpness):
    g = torch.Generator().manual_seed(0)
    lg_p, lg_t = torch.randn(3, 2500, generator=g) * sharpness, torch.randn(3, 2500, generator=g) * sharpness
    alpha, thr = fused_alpha(lg_p, lg_t, 1.0, top_p)
    lp, lt = lg_p.log_softmax(-1), lg_t.log_softmax(-1)
    support = None if top_p is None else teacher_top_p_support(lt, top_p)
    if support is not None:
        assert (support_from_threshold(lg_t, thr) == support).all()
    torch.testing.assert_close(alpha, solve_alpha(lp, lt, support), atol=1e-4, rtol=0)
