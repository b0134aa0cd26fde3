"""core.fused's per-row random streams (ROW_STREAMS) through Triton's interpreter: row b of a batch draws what a
batch of one with seed[b] and step[b] draws, and forcing follows each row's own step. Skipped unless Triton is
installed and TRITON_INTERPRET=1 is set; the GPU twin is in tests/engine/test_continuous_gpu.py."""

import pytest
import torch

from recipe.optimal_sampling.core.fused import RECORD_FIELDS, fused_available, fused_sample

pytestmark = pytest.mark.skipif(not fused_available("cpu"), reason="needs Triton with TRITON_INTERPRET=1")


def test_per_row_streams_equal_a_batch_of_one():
    torch.manual_seed(0)
    lg_p, lg_t = (torch.randn(4, 2048) * 3 for _ in range(2))
    seeds = torch.tensor([11, 2**61 + 5, 7, 123456789])
    steps = torch.tensor([0, 3, 1, 7])
    token, rec = fused_sample(lg_p, lg_t, steps, seeds, top_p=0.9, force_teacher_tokens=1)
    for b in range(4):
        one, one_rec = fused_sample(
            lg_p[b : b + 1], lg_t[b : b + 1], steps[b], seeds[b], top_p=0.9, force_teacher_tokens=1
        )
        assert int(token[b]) == int(one[0]), b
        torch.testing.assert_close(rec[:, b], one_rec[:, 0], atol=0, rtol=0)
    assert rec[RECORD_FIELDS.index("forced")].tolist() == [1.0, 0.0, 0.0, 0.0]
    other, _ = fused_sample(lg_p, lg_t, steps, seeds + 1, top_p=0.9, force_teacher_tokens=1)
    assert other.tolist() != token.tolist()  # the seed matters
