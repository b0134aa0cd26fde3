"""Fused per-token maths of q* over the full vocabulary: the same numbers as `sample_step` on `core/` functions,
in a fixed number of passes over each row of logits and without materialising any (B, V) float32 tensor.

Owns the launch code of the `fused_*kernels` modules (Triton, CUDA; or Triton's interpreter on CPU tensors with
TRITON_INTERPRET=1) and two torch helpers (`logit_keys`, `support_from_threshold`) that say what the kernels
compute. Knows nothing about models, caches or CUDA graphs; nothing here syncs to the host, so a decode step
calling `fused_sample` can be captured in a CUDA graph.

Per row (B rows, V columns; each pass reads the row's raw logits once):
  1) stats: log Z of each model at the temperature                                     1 pass, both models
  2) support: the teacher's top-p set as {v : key(logit_t[v]) >= thr}, key = the float's order-preserving
     int32 bits (`logit_keys`); thr found by a 17-way interval search                   P passes, teacher only
     (P = 4 for bf16 logits, 5 for fp16, 8 for fp32: exact). Ties at the cut are all kept (the sort in
     `teacher_top_p_support` keeps an arbitrary subset of them).
  3) alpha (kl_symmetry): Delta(alpha) = E_q[ell] and Delta' = Var_q[ell] at 8 points in the first pass (the grid
     j / 9), then at 4 points per pass: the root of the cubic interpolant of Delta, Delta' at the bracket's ends
     (or a safeguarded Newton step) + (-1, -1/3, 1/3, 1) * the radius where its error should lie (a grid of the
     bracket while one end is not evaluated); after the last pass one more such estimate, no pass
     (`fused_alpha_kernels`). Passes after the first use log-probs renormalised on the support, as
     `core.solve_alpha` does                                                          ALPHA_PASSES = 3, both
     (a float32 torch model of the search, on 2,300 Gaussian, Zipf-like, spiky and small-support rows with and
     without top-p, and the GPU tests' rows: <= 1.5e-5 from `core.solve_alpha` where that is itself within 1e-5
     of float64, most rows ~1e-7. fixed: no pass; entropy / ess_balance: `core.solve_alpha` on materialised
     log-probs, not fused)
  4) sample: mixing on the support, exponential race with an in-kernel Philox stream keyed by (seed, step),
     and the sums behind `token_diagnostics`                                            1 pass, both
Bad rows: pass 1 counts each row's non-finite logits (NaN, +-inf; the record's nan_policy / nan_teacher, which the
engine's guard turns into an error); such rows get alpha = NaN, as `core.solve_alpha` gives on rows that are not
distributions (stricter on raw logits: a single -inf logit also counts), never a plausible alpha.
"""

import math
import os

import torch
from torch import Tensor

from .alpha import EQUAL_TOL, solve_alpha

try:  # Triton ships with CUDA builds of torch; CPU-only installs use the reference path instead
    from . import fused_alpha_kernels as _ka
    from . import fused_kernels as _k
    from . import fused_sample_kernels as _ks
except ImportError:  # pragma: no cover - depends on the install
    _k = _ka = _ks = None

RECORD_FIELDS = (
    "logp_q", "logp_policy", "logp_teacher", "alpha", "forced", "support_size",
    "kl_q_policy", "kl_q_teacher", "ess_policy", "ess_teacher", "entropy_q", "nan_policy", "nan_teacher",
)  # fmt: skip
TOPP_PROBES = 16
ALPHA_POINTS = 8  # points of the first alpha pass (fused_alpha_kernels.NP_FIRST; 4 in later passes)
ALPHA_PASSES = 3  # see the module docstring, 3)
SPLIT_BLOCK = 1024  # columns per split are a multiple of this (every kernel's BLOCK divides it)
_KEY_SPACING = {torch.bfloat16: 2**16, torch.float16: 2**13, torch.float32: 1}  # gap between adjacent keys


def fused_available(device: torch.device | str) -> bool:
    """True where the kernels can run: CUDA with Triton, or CPU under TRITON_INTERPRET=1 (slow; for tests)."""
    if _k is None:
        return False
    return torch.device(device).type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"


def logit_keys(logits: Tensor) -> Tensor:
    """Order-preserving int32 keys of float logits: a < b  <=>  key(a) < key(b). (B, V) -> (B, V) int32."""
    bits = logits.float().contiguous().view(torch.int32)  # (B, V)
    return torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits)


def support_from_threshold(logits_teacher: Tensor, thr: Tensor) -> Tensor:
    """The support as a mask: key(logit) >= thr[row]. logits_teacher: (B, V); thr: (B,) int64. -> (B, V) bool."""
    return logit_keys(logits_teacher).long() >= thr.unsqueeze(-1)  # (B, V)


def topp_passes(dtype: torch.dtype) -> int:
    """Passes of the 17-way search until the interval holds at most one distinct key of this dtype."""
    width, passes = 2**32, 0
    while width > _KEY_SPACING.get(dtype, 1):
        width, passes = -(-width // (TOPP_PROBES + 1)), passes + 1
    return passes


class _Plan:
    """How rows are split across programs: ns splits of `chunk` columns (a multiple of SPLIT_BLOCK)."""

    def __init__(self, logits: Tensor, num_splits: int | None = None):
        B, V = logits.shape
        if num_splits is None:
            sms = torch.cuda.get_device_properties(logits.device).multi_processor_count if logits.is_cuda else 4
            num_splits = min(64, max(1, math.ceil(2 * sms / B)))
        self.B, self.V = B, V
        self.chunk = math.ceil(math.ceil(V / num_splits) / SPLIT_BLOCK) * SPLIT_BLOCK
        self.ns = math.ceil(V / self.chunk)
        self.ns_pad = max(2, triton_next_pow2(self.ns))
        self.grid = (B, self.ns)


def triton_next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def _check(logits_policy: Tensor, logits_teacher: Tensor) -> None:
    if _k is None:
        raise RuntimeError("the fused sampler needs Triton: install torch with CUDA (it ships Triton)")
    assert logits_policy.shape == logits_teacher.shape and logits_policy.dim() == 2, f"{logits_policy.shape=}"
    assert logits_policy.stride(-1) == 1 and logits_teacher.stride(-1) == 1, "rows must be contiguous"


def fused_stats(logits_policy: Tensor, logits_teacher: Tensor, temperature: float, plan: _Plan) -> Tensor:
    """Partial log-sum-exps per split. Returns (B, ns, 6) float32 (see `_stats_kernel`)."""
    stats = torch.empty(plan.B, plan.ns, 6, dtype=torch.float32, device=logits_policy.device)  # (B, ns, 6)
    _k._stats_kernel[plan.grid](
        logits_policy, logits_teacher, stats, plan.V, logits_policy.stride(0), logits_teacher.stride(0),
        plan.chunk, 1.0 / temperature, BLOCK=1024, num_warps=8,
    )  # fmt: skip
    return stats


def fused_top_p_threshold(logits_teacher: Tensor, top_p: float, temperature: float, stats: Tensor, plan: _Plan):
    """The teacher's top-p set as a key threshold. Returns thr: (B,) int64 (see `support_from_threshold`)."""
    dev = logits_teacher.device
    state = torch.empty(2, plan.B, 2, dtype=torch.int64, device=dev)  # (2, B, 2) double-buffered (lo, hi)
    part = torch.empty(2, plan.B, plan.ns, TOPP_PROBES, dtype=torch.float32, device=dev)  # (2, B, ns, K)
    thr = torch.empty(plan.B, dtype=torch.int64, device=dev)  # (B,)
    passes = topp_passes(logits_teacher.dtype)
    for n in range(passes + 1):  # the last launch only finalises
        last = n == passes
        _k._topp_kernel[plan.grid](
            logits_teacher, logits_teacher.stride(0), plan.V, plan.chunk, 1.0 / temperature, stats,
            part[(n - 1) % 2], part[n % 2], state[(n - 1) % 2], state[n % 2], thr, float(top_p), FIRST=n == 0,
            LAST=last, K=TOPP_PROBES, NS_PAD=plan.ns_pad, BLOCK=1024, num_warps=8,
        )  # fmt: skip
    return thr


def fused_solve_alpha(
    logits_policy: Tensor, logits_teacher: Tensor, thr: Tensor | None, temperature: float, stats: Tensor, plan: _Plan
) -> Tensor:
    """kl_symmetry alpha on the support {key >= thr} (None = full vocabulary). Returns (B,) float32."""
    dev = logits_policy.device
    state = torch.empty(2, plan.B, 8, dtype=torch.float32, device=dev)  # (2, B, 8) see _alpha_kernel
    part = torch.empty(2, plan.B, plan.ns, ALPHA_POINTS, 4, dtype=torch.float32, device=dev)  # (2, B, ns, 8, 4)
    extra = torch.empty(plan.B, plan.ns, 6, dtype=torch.float32, device=dev)  # (B, ns, 6)
    alpha = torch.empty(plan.B, dtype=torch.float32, device=dev)  # (B,)
    for n in range(ALPHA_PASSES + 1):  # the first launch also writes the initial state, the last only finalises
        _ka._alpha_kernel[plan.grid](
            logits_policy, logits_teacher, logits_policy.stride(0), logits_teacher.stride(0), plan.V, plan.chunk,
            1.0 / temperature, stats, alpha if thr is None else thr, extra, part[(n - 1) % 2], part[n % 2],
            state[(n - 1) % 2], state[n % 2], alpha, EQUAL_TOL, FIRST=n == 0, PREV_FIRST=n == 1,
            LAST=n == ALPHA_PASSES, HAS_SUPPORT=thr is not None, NS_PAD=plan.ns_pad, BLOCK=512 if n == 0 else 1024,
            num_warps=8,
        )  # fmt: skip
    return alpha


def fused_alpha(
    logits_policy: Tensor, logits_teacher: Tensor, temperature: float = 1.0, top_p: float | None = None
) -> tuple[Tensor, Tensor | None]:
    """alpha (kl_symmetry) and the support threshold, as `solve_alpha(log_softmax(.), ., teacher_top_p_support)`
    would give them. logits_*: (B, V). Returns (B,) float32 and (B,) int64 or None."""
    _check(logits_policy, logits_teacher)
    plan = _Plan(logits_policy)
    stats = fused_stats(logits_policy, logits_teacher, temperature, plan)
    thr = (
        None
        if top_p is None or top_p >= 1.0
        else fused_top_p_threshold(logits_teacher, top_p, temperature, stats, plan)
    )
    return _nan_where_non_finite(
        fused_solve_alpha(logits_policy, logits_teacher, thr, temperature, stats, plan), stats
    ), thr


def _nan_where_non_finite(alpha: Tensor, stats: Tensor) -> Tensor:
    """alpha (B,) with NaN on rows whose logits hold a NaN or +-inf (stats: (B, ns, 6), counts in 4 and 5)."""
    bad = stats[..., 4:6].sum(dim=(-2, -1)) > 0  # (B,)
    return torch.where(bad, torch.full_like(alpha, float("nan")), alpha)


def fused_sample(
    logits_policy: Tensor,
    logits_teacher: Tensor,
    step: Tensor,
    seed: Tensor,
    *,
    temperature: float = 1.0,
    top_p: float | None = None,
    alpha_method: str = "kl_symmetry",
    fixed_alpha: float | None = None,
    force_teacher_tokens: int = 0,
    diagnostics: bool = True,
) -> tuple[Tensor, Tensor]:
    """One token per row from q*, with its record. logits_*: (B, V) raw logits (bf16/fp16/fp32, rows contiguous);
    step, seed: () int64 device tensors (forcing applies while step < force_teacher_tokens; the random stream is
    keyed by seed + step, the row in its counter), or both (B,) for per-row streams (row b keyed by seed[b] +
    step[b] alone: its draws equal those of a batch of one with that seed and step, whichever row it is in).
    Returns token (B,) int64 and record (len(RECORD_FIELDS), B) float32. With diagnostics=False the five
    diagnostic rows are left unwritten (garbage)."""
    _check(logits_policy, logits_teacher)
    row_streams = step.dim() == 1
    assert seed.dim() == step.dim() and (not row_streams or step.shape == seed.shape == logits_policy.shape[:1])
    plan = _Plan(logits_policy)
    dev = logits_policy.device
    # 1) stats, 2) support
    stats = fused_stats(logits_policy, logits_teacher, temperature, plan)
    has_support = top_p is not None and top_p < 1.0
    thr = fused_top_p_threshold(logits_teacher, top_p, temperature, stats, plan) if has_support else None
    # 3) alpha
    if alpha_method == "kl_symmetry":
        alpha = fused_solve_alpha(logits_policy, logits_teacher, thr, temperature, stats, plan)
    elif alpha_method == "fixed":
        alpha = torch.full((plan.B,), float(fixed_alpha), dtype=torch.float32, device=dev)  # (B,)
    else:  # not fused: materialise both rows of log-probs (B, V) and use the reference solver
        lp = (logits_policy.float() / temperature).log_softmax(-1)  # (B, V)
        lt = (logits_teacher.float() / temperature).log_softmax(-1)  # (B, V)
        support = support_from_threshold(logits_teacher, thr) if has_support else None
        alpha = solve_alpha(lp, lt, support, alpha_method, fixed_alpha)
    alpha = _nan_where_non_finite(alpha, stats)  # (B,)
    # 4) sample and record
    part = torch.empty(plan.B, plan.ns, 16, dtype=torch.float32, device=dev)  # (B, ns, 16)
    record = torch.empty(len(RECORD_FIELDS), plan.B, dtype=torch.float32, device=dev)  # (13, B)
    token = torch.empty(plan.B, dtype=torch.int64, device=dev)  # (B,)
    inv_t = 1.0 / temperature
    s_p, s_t = logits_policy.stride(0), logits_teacher.stride(0)
    _ks._sample_kernel[plan.grid](
        logits_policy, logits_teacher, s_p, s_t, plan.V, plan.chunk, inv_t, stats, alpha if thr is None else thr,
        alpha, step, seed, int(force_teacher_tokens), part, HAS_SUPPORT=has_support, DIAG=diagnostics,
        NS_PAD=plan.ns_pad, BLOCK=1024, ROW_STREAMS=row_streams, num_warps=8,
    )  # fmt: skip
    _ks._epilogue_kernel[(plan.B,)](
        logits_policy, logits_teacher, s_p, s_t, inv_t, stats, alpha, step, int(force_teacher_tokens), part, record,
        token, plan.ns, NS_PAD=plan.ns_pad, ROW_STREAMS=row_streams, num_warps=1,
    )  # fmt: skip
    return token, record
