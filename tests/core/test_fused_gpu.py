"""The fused q* step (core.fused) against the reference maths on the full 151,936-token vocabulary (CUDA)."""

import pytest
import torch

from recipe.optimal_sampling.core import mix_logprobs, solve_alpha, teacher_top_p_support
from recipe.optimal_sampling.core.fused import fused_alpha, fused_sample, support_from_threshold
from tests.core.test_fused_on_cpu import check_record

pytestmark = pytest.mark.gpu
V = 151_936


def random_logits(seed: int, B: int, sharpness: float, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator("cuda").manual_seed(seed)
    lp = torch.randn(B, V, device="cuda", generator=g) * sharpness
    lt = 0.6 * lp + torch.randn(B, V, device="cuda", generator=g) * sharpness  # related, like two LMs
    return lp.to(dtype), lt.to(dtype)


# The top-p boundary is only defined up to float32 summation error: on a near-uniform row of 151,936 tokens one
# token's mass (~7e-6) is below the error of a float32 cumsum, so the fused cut and teacher_top_p_support may differ
# by a boundary token. Both are checked against the definition in float64, within this tolerance.
TOP_P_TOL = 1e-5


def reference_support(logits_t: torch.Tensor, top_p: float, thr: torch.Tensor, temperature: float) -> torch.Tensor:
    """The fused support, checked in float64: a top set of the teacher's logits (every token at or above its cut,
    so ties are kept) whose mass reaches top_p, and whose mass without the tokens at the cut falls short of top_p:
    the smallest such set, up to TOP_P_TOL."""
    support = support_from_threshold(logits_t, thr)
    z = logits_t.double()
    p = (z / temperature).log_softmax(-1).exp()  # (B, V)
    cut = torch.where(support, z, float("inf")).amin(-1, keepdim=True)  # (B, 1)
    assert (support == (z >= cut)).all(), "the fused support is not a top set of the teacher's logits"
    mass = (p * support).sum(-1)  # (B,)
    inner = (p * (support & (z > cut))).sum(-1)  # (B,) without the tokens at the cut
    assert (mass >= top_p - TOP_P_TOL).all(), ("mass below top_p", mass.min().item())
    assert (inner < top_p + TOP_P_TOL).all(), ("not the smallest set", inner.max().item())
    return support


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("sharpness", [0.5, 3.0, 20.0])
@pytest.mark.parametrize("top_p", [None, 0.95, 0.5])
def test_fused_alpha_matches_solve_alpha(dtype, sharpness, top_p):
    lg_p, lg_t = random_logits(int(sharpness * 10), 16, sharpness, dtype)
    alpha, thr = fused_alpha(lg_p, lg_t, temperature=0.9, top_p=top_p)
    lp, lt = (lg_p.float() / 0.9).log_softmax(-1), (lg_t.float() / 0.9).log_softmax(-1)
    support = None if top_p is None else reference_support(lg_t, top_p, thr, 0.9)
    torch.testing.assert_close(alpha, solve_alpha(lp, lt, support), atol=1e-4, rtol=0)


def test_fused_alpha_on_disjoint_one_hot_rows():
    lg_p = torch.full((2, V), -30.0, device="cuda")
    lg_t = lg_p.clone()
    lg_p[:, 7], lg_t[:, 11] = 30.0, 30.0  # nearly one-hot on different tokens: a steep Delta
    lg_t[1] = lg_p[1]  # identical rows: alpha = 0.5 by convention
    alpha, _ = fused_alpha(lg_p, lg_t)
    ref = solve_alpha(lg_p.log_softmax(-1), lg_t.log_softmax(-1))
    torch.testing.assert_close(alpha, ref, atol=1e-4, rtol=0)
    assert alpha[1].item() == 0.5


def test_fused_alpha_on_a_small_support_far_from_the_policy():
    """2-token teacher top-p sets where the policy's log-mass is ~ -12 (renormalising on the support matters)."""
    g = torch.Generator("cuda").manual_seed(7)
    lg_p, lg_t = torch.randn(2, V, device="cuda", generator=g), torch.randn(2, V, device="cuda", generator=g)
    lg_t[:, :2] = torch.tensor([[20.0, 19.95], [18.0, 17.9]], device="cuda")
    lg_p[:, :2] = torch.tensor([[-5.0, -6.0], [-3.0, -4.5]], device="cuda")
    alpha, thr = fused_alpha(lg_p, lg_t, 1.0, 0.9)
    lp, lt = lg_p.log_softmax(-1), lg_t.log_softmax(-1)
    support = teacher_top_p_support(lt, 0.9)
    assert (support_from_threshold(lg_t, thr) == support).all() and (support.sum(-1) == 2).all()
    torch.testing.assert_close(alpha, solve_alpha(lp, lt, support), atol=1e-4, rtol=0)


@pytest.mark.parametrize("method", ["kl_symmetry", "entropy", "fixed"])
def test_fused_record_matches_reference_maths(method):
    lg_p, lg_t = random_logits(3, 8, 4.0, torch.bfloat16)
    step, seed = torch.tensor(2, device="cuda"), torch.tensor(11, device="cuda")
    kw = {"fixed_alpha": 0.3} if method == "fixed" else {}
    token, rec = fused_sample(lg_p, lg_t, step, seed, temperature=0.7, top_p=0.9, alpha_method=method, **kw)
    check_record(token, rec, lg_p, lg_t, 0.7, 0.9, method, kw.get("fixed_alpha"))


def test_fused_sampling_frequencies_match_q_star():
    n, v = 20000, 50
    g = torch.Generator("cuda").manual_seed(5)
    lg_p = (torch.randn(1, v, device="cuda", generator=g) * 2).expand(n, v).contiguous()
    lg_t = (torch.randn(1, v, device="cuda", generator=g) * 2).expand(n, v).contiguous()
    token, _ = fused_sample(lg_p, lg_t, torch.tensor(0, device="cuda"), torch.tensor(1, device="cuda"), top_p=0.95)
    lp, lt = lg_p[:1].log_softmax(-1), lg_t[:1].log_softmax(-1)
    support = teacher_top_p_support(lt, 0.95)
    q = mix_logprobs(lp, lt, solve_alpha(lp, lt, support), support).exp()[0].double().cpu()  # (v,)
    counts = torch.bincount(token.cpu(), minlength=v).double()
    assert counts[q == 0].sum() == 0
    cells = q * n >= 5
    expected = torch.cat([q[cells] * n, (q[~cells] * n).sum().reshape(1)])
    observed = torch.cat([counts[cells], counts[~cells].sum().reshape(1)])
    keep = expected > 0
    chi2 = ((observed - expected)[keep] ** 2 / expected[keep]).sum().item()
    dof = int(keep.sum()) - 1
    assert dof >= 5 and chi2 < dof + 3.1 * (2 * dof) ** 0.5 + 7, (chi2, dof)


def test_fused_sampling_covers_the_whole_vocabulary():
    """Equal logits: q* is uniform over all 151,936 columns; each of the 4 outputs of a Philox call (column mod 4)
    and each eighth of the row gets its share, and a new step draws new tokens."""
    lg = torch.zeros(4096, V, device="cuda", dtype=torch.bfloat16)
    token, _ = fused_sample(lg, lg, torch.tensor(0, device="cuda"), torch.tensor(3, device="cuda"), top_p=0.95)
    again, _ = fused_sample(lg, lg, torch.tensor(1, device="cuda"), torch.tensor(3, device="cuda"), top_p=0.95)
    assert (token != again).float().mean() > 0.99
    for cells in (torch.bincount(token % 4, minlength=4), torch.bincount(token * 8 // V, minlength=8)):
        expected = 4096 / len(cells)
        assert ((cells - expected).abs() < 5 * expected**0.5).all(), cells.tolist()
