"""bench/exchange_bytes.py: the byte counts equal the sizes of the tensors a teacher would send, and the top-p payload
(ids and logits of the teacher's top-p set + log Z) is exact: q*, alpha and every diagnostic rebuilt from it equal
those from the teacher's full row, as docs/scaling.md states."""

import importlib.util
from pathlib import Path

import pytest
import torch

from recipe.optimal_sampling.core import mix_logprobs, solve_alpha, teacher_top_p_support, token_diagnostics

SCRIPT = Path(__file__).resolve().parents[2] / "bench" / "exchange_bytes.py"
spec = importlib.util.spec_from_file_location("exchange_bytes", SCRIPT)
ex = importlib.util.module_from_spec(spec)
spec.loader.exec_module(ex)


def top_p_payload(logits: torch.Tensor, temperature: float, top_p: float, k: int) -> list[torch.Tensor]:
    """What the teacher's GPU sends for (B, V) bf16 logits: K (id, logit) slots, log Z and |S| per row."""
    logp = (logits.float() / temperature).log_softmax(-1)  # (B, V)
    support = teacher_top_p_support(logp, top_p)  # (B, V)
    count = support.sum(-1).to(torch.int32)  # (B,)
    assert int(count.max()) <= k, "the test's K must hold every row's set"
    score = torch.where(support, logp, torch.full_like(logp, float("-inf")))  # (B, V)
    ids = score.topk(k, dim=-1).indices.to(torch.int32)  # (B, K): the set first, then padding
    log_z = (logits.float() / temperature).logsumexp(-1)  # (B,) fp32
    return [ids, logits.gather(-1, ids.long()), log_z, count]  # (B, K) int32, (B, K) bf16, (B,) fp32, (B,) int32


def rebuild(payload: list[torch.Tensor], vocab: int, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The policy side: the teacher's full-vocabulary log-probs on S (-inf elsewhere) and the support mask."""
    ids, logits, log_z, count = payload
    keep = torch.arange(ids.shape[1])[None, :] < count[:, None].long()  # (B, K)
    logp = torch.full((ids.shape[0], vocab), float("-inf"))  # (B, V)
    value = logits.float() / temperature - log_z[:, None]  # (B, K)
    logp.scatter_(-1, ids.long(), torch.where(keep, value, torch.full_like(value, float("-inf"))))
    return logp, logp > float("-inf")


@pytest.mark.parametrize(("top_p", "seed"), [(0.9, 0), (0.95, 1), (0.5, 2)])
def test_top_p_payload_is_exact(top_p, seed):
    torch.manual_seed(seed)
    B, V, T = 6, 64, 0.8
    logits_t = (torch.randn(B, V) * 3).bfloat16()  # (B, V) the teacher model's dtype
    logp_p = (torch.randn(B, V) * 2 / T).log_softmax(-1)  # (B, V)
    logp_t = (logits_t.float() / T).log_softmax(-1)  # (B, V) what the co-located engine has
    support = teacher_top_p_support(logp_t, top_p)
    payload = top_p_payload(logits_t, T, top_p, k=V)
    got_t, got_support = rebuild(payload, V, T)
    assert torch.equal(got_support, support)
    torch.testing.assert_close(got_t[support], logp_t[support], atol=1e-6, rtol=0)
    alpha, got_alpha = solve_alpha(logp_p, logp_t, support), solve_alpha(logp_p, got_t, got_support)
    torch.testing.assert_close(got_alpha, alpha, atol=1e-5, rtol=0)
    logq, got_q = mix_logprobs(logp_p, logp_t, alpha, support), mix_logprobs(logp_p, got_t, got_alpha, got_support)
    torch.testing.assert_close(got_q, logq, atol=1e-5, rtol=0)
    want, got = token_diagnostics(logp_p, logp_t, logq), token_diagnostics(logp_p, got_t, got_q)
    for name in want:
        torch.testing.assert_close(got[name], want[name], atol=1e-5, rtol=0, msg=name)
    sizes = [t.numel() * t.element_size() for t in top_p_payload(logits_t, T, top_p, k=16 if top_p < 0.95 else V)]
    assert sum(sizes) == B * ex.row_bytes(f"top_p_{16 if top_p < 0.95 else V}", V)


def test_full_row_bytes_equal_the_tensors():
    V, B = ex.QWEN3_VOCAB, 64
    for payload, dtype in (("full_fp32", torch.float32), ("full_bf16", torch.bfloat16)):
        rows = torch.empty(B, V, dtype=dtype)
        got = ex.exchange(payload, V, B)
        assert got["to_policy"] == rows.numel() * rows.element_size()
        assert got["to_teacher"] == torch.empty(B, dtype=torch.int32).nbytes
    assert ex.exchange("full_bf16", V, 256)["to_policy"] == 77_791_232  # 256 x 151,936 x 2, as docs/scaling.md says


def test_split_step_is_bounded_by_the_slower_model_plus_the_exchange():
    m = {"policy_ms": 7.0, "teacher_ms": 15.0, "qstar_ms": 0.5}
    step = ex.exchange("full_bf16", ex.QWEN3_VOCAB, 64)
    fast, slow = ex.split_step_ms(m, step, 450.0, 0.0), ex.split_step_ms(m, step, 50.0, 20.0)
    assert 15.5 < fast < slow
    assert slow == pytest.approx(15.0 + 0.5 + (step["to_policy"] + step["to_teacher"]) / 50e9 * 1e3 + 0.04)


def test_the_committed_results_are_the_scripts_output(capsys):
    ex.main([])
    assert capsys.readouterr().out == (SCRIPT.parent / "results" / "exchange_bytes.md").read_text()
