"""Triton kernels behind `core.fused`: one decode step's maths over the full vocabulary in a few passes.

Owns the kernels only (launch code, shapes and fallbacks live in `fused.py`). Knows nothing about models,
caches or configs. Every kernel works on rows of raw logits (bf16, fp16 or fp32) of the two models, split into
`ns` chunks per row so that batch 1 still fills the GPU: program (row, split) reads columns
[split * chunk, (split + 1) * chunk). A multi-pass search keeps its state per row in a small buffer; each pass
first *finalises* the previous one from the partial sums of all splits (every program of the row computes the
same numbers, split 0 writes them down), then accumulates its own partial sums. No atomics, no host sync.

Sums are per lane: every running max / sum is a (BLOCK,) tensor updated element-wise (one exp per element and
sum, `_online`), and reduced across lanes once per split. The next block's logits are loaded before the current
block is processed, so a load is always in flight.

  _stats_kernel   pass 0: online max / sum-exp of both rows at the temperature (-> log Z of each model), NaNs
  _topp_kernel    passes 1..P: the teacher's top-p cut as an order-preserving int32 key of the raw logit,
                  found by a 17-way interval search (16 probe keys per pass, exact after P passes)
  (fused_alpha_kernels) passes 1..A: alpha, from Delta(alpha) = E_q[ell] and Delta' = Var_q[ell] at 3 alphas
                  per pass
  (fused_sample_kernels) last pass: q* = mix at the final alpha on the support, exponential-race sampling with an
                  in-kernel Philox stream, and the sums behind the diagnostics
  (fused_sample_kernels) per row: combine the splits into the token and its trace record
"""

import os

import triton
import triton.language as tl

M_INIT = tl.constexpr(-1.0e30)  # finite "minus infinity" for running maxima: exp(M_INIT - m) is 0, never NaN
FLOOR = tl.constexpr(-1.0e3)  # core.mixture.LOGP_FLOOR
NEG_INF = tl.constexpr(float("-inf"))
# On the GPU, exp and the race's outer log are single PTX approximations (ex2 / lg2.approx.ftz: relative error
# ~2^-22, results below 2^-126 flush to 0) instead of tl.exp (a range fix-up around ex2, +3 instructions) and
# tl.log (a libdevice polynomial, ~20); Triton's interpreter runs no inline PTX, so it keeps tl.exp / tl.log.
FAST_MATH = tl.constexpr(os.environ.get("TRITON_INTERPRET", "0") != "1")
LOG2E = tl.constexpr(1.4426950408889634)
LN2 = tl.constexpr(0.6931471805599453)


@triton.jit
def _exp(x):
    """exp(x) (see FAST_MATH)."""
    if FAST_MATH:
        return tl.inline_asm_elementwise(
            "ex2.approx.ftz.f32 $0, $1;", "=r,r", [x * LOG2E], dtype=tl.float32, is_pure=True, pack=1
        )
    else:
        return tl.exp(x)


@triton.jit
def _log_approx(x):
    """log(x) for x > 0 (see FAST_MATH); used where an absolute error ~1e-7 is harmless."""
    if FAST_MATH:
        return LN2 * tl.inline_asm_elementwise(
            "lg2.approx.ftz.f32 $0, $1;", "=r,r", [x], dtype=tl.float32, is_pure=True, pack=1
        )
    else:
        return tl.log(x)


@triton.jit
def _key(x):
    """fp32 -> int32 with the same order (negative floats have their magnitude bits flipped)."""
    bits = x.to(tl.int32, bitcast=True)
    return tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits)


@triton.jit
def _online(m, s, x):
    """Per-lane online log-sum-exp: (m, s) -> running max and sum exp(x - m); x: -inf where absent. One exp."""
    d = x - m
    e = _exp(tl.abs(d) * -1.0)
    return tl.maximum(m, x), tl.where(d > 0, s * e + 1.0, s + e)


@triton.jit
def _online_xy(m, s0, s1, s2, x, y1, y2):
    """`_online` that also carries sum e * y1 and sum e * y2 (per lane)."""
    d = x - m
    e = _exp(tl.abs(d) * -1.0)  # one FMUL with the |.| modifier, not a negation first
    up = d > 0
    old = tl.where(up, e, 1.0)  # weight of the sums so far, and of the new element
    new = tl.where(up, 1.0, e)
    return tl.maximum(m, x), s0 * old + new, s1 * old + new * y1, s2 * old + new * y2


@triton.jit
def _lane_lse(m, s):
    """Reduce per-lane (max, sum) to one (max, sum) pair; and the weights exp(m - max) of the lanes."""
    mm = tl.max(m, 0)
    w = tl.exp(m - mm)
    return mm, tl.sum(s * w, 0), w


@triton.jit
def _store_lse(ptr, m, s):
    """Reduce per-lane (max, sum) across lanes and store the pair."""
    mm, ss, _ = _lane_lse(m, s)
    tl.store(ptr, mm)
    tl.store(ptr + 1, ss)


@triton.jit
def _combine_lse(ptr, row, ns, width, col, NS_PAD: tl.constexpr):
    """log sum exp over the splits of partials (m, s) stored at ptr[(row * ns + split) * width + col + {0, 1}]."""
    i = tl.arange(0, NS_PAD)
    base = ptr + (row * ns + i) * width + col
    m = tl.load(base, mask=i < ns, other=M_INIT)
    s = tl.load(base + 1, mask=i < ns, other=0.0)
    mm = tl.max(m, 0)
    return mm + tl.log(tl.sum(s * tl.exp(m - mm), 0))


@triton.jit
def _load(ptr, row, stride, cols, end):
    """Raw logits of one block, in their own dtype (converted where used); 0 past `end`."""
    return tl.load(ptr + row * stride + cols, mask=cols < end, other=0.0)


@triton.jit
def _logp(raw, inv_temp, lse):
    """Floored log-probs at the temperature from raw logits of any float dtype."""
    return tl.maximum(raw.to(tl.float32) * inv_temp - lse, FLOOR)


@triton.jit
def _stats_kernel(pol_ptr, tea_ptr, out_ptr, V, s_pol, s_tea, chunk, inv_temp, BLOCK: tl.constexpr):
    # out: (B, ns, 6) = max/sumexp of policy, max/sumexp of teacher, non-finite (NaN, +-inf) logit counts of policy
    # and teacher (recorded as nan_policy / nan_teacher: the engine's once-per-step guard reads them)
    row = tl.program_id(0).to(tl.int64)
    split = tl.program_id(1)
    ns = tl.num_programs(1)
    start = split * chunk
    end = tl.minimum(start + chunk, V)
    m_p = tl.zeros((BLOCK,), tl.float32) + M_INIT
    s_p = tl.zeros((BLOCK,), tl.float32)
    m_t = m_p
    s_t = s_p
    nan_p = s_p
    nan_t = s_p
    cols = start + tl.arange(0, BLOCK)
    nxt_p = _load(pol_ptr, row, s_pol, cols, end)
    nxt_t = _load(tea_ptr, row, s_tea, cols, end)
    for _ in range(0, chunk, BLOCK):
        msk = cols < end
        zp = nxt_p.to(tl.float32) * inv_temp
        zt = nxt_t.to(tl.float32) * inv_temp
        cols += BLOCK
        nxt_p = _load(pol_ptr, row, s_pol, cols, end)
        nxt_t = _load(tea_ptr, row, s_tea, cols, end)
        nan_p += ((zp != zp) | (tl.abs(zp) == float("inf"))).to(tl.float32)  # 0 past `end` (see _load)
        nan_t += ((zt != zt) | (tl.abs(zt) == float("inf"))).to(tl.float32)
        m_p, s_p = _online(m_p, s_p, tl.where(msk, zp, NEG_INF))
        m_t, s_t = _online(m_t, s_t, tl.where(msk, zt, NEG_INF))
    mp, sp, _ = _lane_lse(m_p, s_p)
    mt, st, _ = _lane_lse(m_t, s_t)
    base = out_ptr + (row * ns + split) * 6
    tl.store(base + 0, mp)
    tl.store(base + 1, sp)
    tl.store(base + 2, mt)
    tl.store(base + 3, st)
    tl.store(base + 4, tl.sum(nan_p, 0))
    tl.store(base + 5, tl.sum(nan_t, 0))


@triton.jit
def _pick(x, k):
    """x[k] of a small 1-D tensor, as a scalar."""
    return tl.sum(tl.where(tl.arange(0, x.shape[0]) == k, x, tl.zeros_like(x)), 0)


@triton.jit
def _probes4(probes, k):
    return _pick(probes, k), _pick(probes, k + 1), _pick(probes, k + 2), _pick(probes, k + 3)


@triton.jit
def _count4(group, key, p_in, pr):
    """Per lane, add p_in where key >= each of 4 probe keys."""
    return (
        group[0] + tl.where(key >= pr[0], p_in, 0.0),
        group[1] + tl.where(key >= pr[1], p_in, 0.0),
        group[2] + tl.where(key >= pr[2], p_in, 0.0),
        group[3] + tl.where(key >= pr[3], p_in, 0.0),
    )


@triton.jit
def _count16(acc, key, p_in, pr):
    return (
        _count4(acc[0], key, p_in, pr[0]),
        _count4(acc[1], key, p_in, pr[1]),
        _count4(acc[2], key, p_in, pr[2]),
        _count4(acc[3], key, p_in, pr[3]),
    )


@triton.jit
def _topp_probes(lo, hi, K: tl.constexpr):
    j = tl.arange(0, K).to(tl.int64)
    return lo + ((hi - lo) * (j + 1)) // (K + 1)  # (K,) int64 keys strictly inside (lo, hi) while hi - lo > K


@triton.jit
def _topp_kernel(
    tea_ptr,
    s_tea,
    V,
    chunk,
    inv_temp,
    stats_ptr,
    part_in,
    part_out,
    state_in,
    state_out,
    thr_ptr,
    top_p,
    FIRST: tl.constexpr,
    LAST: tl.constexpr,
    K: tl.constexpr,
    NS_PAD: tl.constexpr,
    BLOCK: tl.constexpr,
):
    # Invariant per row: mass(key >= lo) >= top_p > mass(key >= hi). state: (2, B, 2) int64 (lo, hi), double-buffered.
    # part: (2, B, ns, K) teacher mass at or above each probe key. thr: (B,) int64, the final lo.
    row = tl.program_id(0).to(tl.int64)
    split = tl.program_id(1)
    ns = tl.num_programs(1)
    lse_t = _combine_lse(stats_ptr, row, ns, 6, 2, NS_PAD)
    if FIRST:  # the whole key range; written down for the next pass
        lo = tl.full((), -(2**31), tl.int64)
        hi = tl.full((), 2**31, tl.int64)
        if split == 0:
            tl.store(state_out + row * 2, lo)
            tl.store(state_out + row * 2 + 1, hi)
    else:
        lo = tl.load(state_in + row * 2)
        hi = tl.load(state_in + row * 2 + 1)
        i = tl.arange(0, NS_PAD)
        j = tl.arange(0, K)
        mass = tl.sum(tl.load(part_in + (row * ns + i[:, None]) * K + j[None, :], mask=(i < ns)[:, None], other=0.0), 0)
        probes = _topp_probes(lo, hi, K)
        enough = mass >= top_p
        lo = tl.maximum(lo, tl.max(tl.where(enough, probes, lo), 0))
        hi = tl.minimum(hi, tl.min(tl.where(enough, hi, probes), 0))
        if split == 0:
            tl.store(state_out + row * 2, lo)
            tl.store(state_out + row * 2 + 1, hi)
    if LAST:
        if split == 0:
            tl.store(thr_ptr + row, lo)
    else:
        # per lane: mass at or above hi (`above`), and per probe the mass in [probe, hi) (`acc`); a block with no
        # mass in [lo, hi) skips the probes (after the first pass most blocks do)
        tl.static_assert(K == 16)  # 4 groups of 4 per-lane sums (1-D: no layout shuffles in the loop)
        probes = _topp_probes(lo, hi, K).to(tl.int32)  # (K,) inside (lo, hi), so within int32
        pr = (_probes4(probes, 0), _probes4(probes, 4), _probes4(probes, 8), _probes4(probes, 12))
        lo32 = tl.maximum(lo, -(2**31)).to(tl.int32)
        hi32 = tl.minimum(hi, 2**31 - 1).to(tl.int32)  # hi = 2^31 only while nothing is above it
        above = tl.zeros((BLOCK,), tl.float32)
        group = (above, above, above, above)
        acc = (group, group, group, group)
        start = split * chunk
        end = tl.minimum(start + chunk, V)
        cols = start + tl.arange(0, BLOCK)
        nxt = _load(tea_ptr, row, s_tea, cols, end)
        for _ in range(0, chunk, BLOCK):
            msk = cols < end
            raw = nxt.to(tl.float32)
            cols += BLOCK
            nxt = _load(tea_ptr, row, s_tea, cols, end)
            p = tl.where(msk, _exp(raw * inv_temp - lse_t), 0.0)
            key = _key(raw)
            top = (key >= hi32) & (hi < 2**31)
            above += tl.where(top, p, 0.0)
            p_in = tl.where((key >= lo32) & ~top, p, 0.0)
            if FIRST:
                acc = _count16(acc, key, p_in, pr)
            elif tl.max(p_in, 0) > 0:
                acc = _count16(acc, key, p_in, pr)
        base = part_out + (row * ns + split) * K
        total_above = tl.sum(above, 0)
        for g in tl.static_range(4):
            for k in tl.static_range(4):
                tl.store(base + 4 * g + k, tl.sum(acc[g][k], 0) + total_above)
