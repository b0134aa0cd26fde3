"""Triton kernels behind `core.fused`: one decode step's maths over the full vocabulary in a few passes.

Owns the kernels only (launch code, shapes and fallbacks live in `fused.py`). Knows nothing about models,
caches or configs. Every kernel works on rows of raw logits (bf16, fp16 or fp32) of the two models, split into
`ns` chunks per row so that batch 1 still fills the GPU: program (row, split) reads columns
[split * chunk, (split + 1) * chunk). A multi-pass search keeps its state per row in a small buffer; each pass
first *finalises* the previous one from the partial sums of all splits (every program of the row computes the
same numbers, split 0 writes them down), then accumulates its own partial sums. No atomics, no host sync.

  _stats_kernel   pass 0: online max / sum-exp of both rows at the temperature (-> log Z of each model), NaNs
  _topp_kernel    passes 1..P: the teacher's top-p cut as an order-preserving integer key of the raw logit,
                  found by a 17-way interval search (16 probe keys per pass, exact after P passes)
  _alpha_kernel   passes 1..A: Delta(alpha) = E_q[ell] at 8 alphas per pass (7 grid points + a regula-falsi
                  estimate): the root bracket shrinks at least 8x per pass, so 5 passes leave < 3.1e-5
  (fused_sample_kernels) last pass: q* = mix at the final alpha on the support, exponential-race sampling with an
                  in-kernel Philox stream, and the sums behind the diagnostics
  (fused_sample_kernels) per row: combine the splits into the token and its trace record
"""

import triton
import triton.language as tl

M_INIT = tl.constexpr(-1.0e30)  # finite "minus infinity" for running maxima: exp(M_INIT - m) is 0, never NaN
FLOOR = tl.constexpr(-1.0e3)  # core.mixture.LOGP_FLOOR
NEG_INF = tl.constexpr(float("-inf"))


@triton.jit
def _key(x):
    """fp32 -> int32 with the same order (negative floats have their magnitude bits flipped)."""
    bits = x.to(tl.int32, bitcast=True)
    return tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits)


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
def _load_logp(ptr, row, stride, cols, msk, inv_temp, lse):
    """Floored log-probs at the temperature; also returns the raw logits (fp32) for keys."""
    raw = tl.load(ptr + row * stride + cols, mask=msk, other=0.0).to(tl.float32)
    return tl.maximum(raw * inv_temp - lse, FLOOR), raw


@triton.jit
def _stats_kernel(pol_ptr, tea_ptr, out_ptr, V, s_pol, s_tea, chunk, inv_temp, BLOCK: tl.constexpr):
    # out: (B, ns, 6) = max/sumexp of policy, max/sumexp of teacher, NaN counts of policy and teacher
    row = tl.program_id(0).to(tl.int64)
    split = tl.program_id(1)
    ns = tl.num_programs(1)
    start = split * chunk
    end = tl.minimum(start + chunk, V)
    m_p = M_INIT
    s_p = 0.0
    m_t = M_INIT
    s_t = 0.0
    nan_p = 0.0
    nan_t = 0.0
    for rel in range(0, chunk, BLOCK):
        off = start + rel
        cols = off + tl.arange(0, BLOCK)
        msk = cols < end
        zp = tl.load(pol_ptr + row * s_pol + cols, mask=msk, other=0.0).to(tl.float32) * inv_temp
        zt = tl.load(tea_ptr + row * s_tea + cols, mask=msk, other=0.0).to(tl.float32) * inv_temp
        nan_p += tl.sum((zp != zp).to(tl.float32), 0)
        nan_t += tl.sum((zt != zt).to(tl.float32), 0)
        zp = tl.where(msk, zp, NEG_INF)
        zt = tl.where(msk, zt, NEG_INF)
        mp_new = tl.maximum(m_p, tl.max(zp, 0))
        s_p = s_p * tl.exp(m_p - mp_new) + tl.sum(tl.exp(zp - mp_new), 0)
        m_p = mp_new
        mt_new = tl.maximum(m_t, tl.max(zt, 0))
        s_t = s_t * tl.exp(m_t - mt_new) + tl.sum(tl.exp(zt - mt_new), 0)
        m_t = mt_new
    base = out_ptr + (row * ns + split) * 6
    tl.store(base + 0, m_p)
    tl.store(base + 1, s_p)
    tl.store(base + 2, m_t)
    tl.store(base + 3, s_t)
    tl.store(base + 4, nan_p)
    tl.store(base + 5, nan_t)


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
    lo = tl.load(state_in + row * 2)  # the host writes the first pass's state: (-2^31, 2^31)
    hi = tl.load(state_in + row * 2 + 1)
    if not FIRST:
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
        probes = _topp_probes(lo, hi, K)
        acc = tl.zeros((K,), tl.float32)
        start = split * chunk
        end = tl.minimum(start + chunk, V)
        for rel in range(0, chunk, BLOCK):
            off = start + rel
            cols = off + tl.arange(0, BLOCK)
            msk = cols < end
            raw = tl.load(tea_ptr + row * s_tea + cols, mask=msk, other=0.0).to(tl.float32)
            p = tl.where(msk, tl.exp(raw * inv_temp - lse_t), 0.0)
            key = _key(raw).to(tl.int64)
            acc += tl.sum(tl.where(key[None, :] >= probes[:, None], p[None, :], 0.0), 1)
        tl.store(part_out + (row * ns + split) * K + tl.arange(0, K), acc)


@triton.jit
def _alpha_points(lo, hi, d_lo, d_hi, K: tl.constexpr):
    """K-1 evenly spaced interior points of [lo, hi] and, last, the regula-falsi estimate (midpoint if unknown)."""
    j = tl.arange(0, K)
    grid = lo + (hi - lo) * (j + 1).to(tl.float32) / K
    known = (d_lo == d_lo) & (d_hi == d_hi) & (d_hi > d_lo)
    est = tl.where(known, lo - d_lo * (hi - lo) / tl.where(known, d_hi - d_lo, 1.0), 0.5 * (lo + hi))
    est = tl.minimum(tl.maximum(est, lo), hi)
    return tl.where(j == K - 1, est, grid)


@triton.jit
def _alpha_kernel(
    pol_ptr,
    tea_ptr,
    s_pol,
    s_tea,
    V,
    chunk,
    inv_temp,
    stats_ptr,
    thr_ptr,
    extra_ptr,
    part_in,
    part_out,
    state_in,
    state_out,
    alpha_ptr,
    equal_tol,
    FIRST: tl.constexpr,
    LAST: tl.constexpr,
    HAS_SUPPORT: tl.constexpr,
    K: tl.constexpr,
    NS_PAD: tl.constexpr,
    BLOCK: tl.constexpr,
):
    # Root of Delta(a) = E_{q_a}[ell] - c on the support, q_a ∝ exp(lp + a * ell), ell = lt - lp, c = the shift
    # from renormalising both models on the support. state: (2, B, 4) = (lo, hi, Delta(lo), Delta(hi)), NaN =
    # not evaluated; part: (2, B, ns, K, 3) = (max, sum e, sum e * ell) per point; extra: (B, ns, 6) from the first
    # pass = log-mass of each model on the support (max, sumexp) and min / max of ell there.
    row = tl.program_id(0).to(tl.int64)
    split = tl.program_id(1)
    ns = tl.num_programs(1)
    lse_p = _combine_lse(stats_ptr, row, ns, 6, 0, NS_PAD)
    lse_t = _combine_lse(stats_ptr, row, ns, 6, 2, NS_PAD)
    thr = tl.load(thr_ptr + row)  # the host writes -2^31 when there is no support constraint
    lo = tl.load(state_in + row * 4)  # the host writes the first pass's state: (0, 1, nan, nan)
    hi = tl.load(state_in + row * 4 + 1)
    d_lo = tl.load(state_in + row * 4 + 2)
    d_hi = tl.load(state_in + row * 4 + 3)
    if not FIRST:
        # 1) finalise the previous pass: Delta at its K points -> the new bracket
        c = 0.0
        if HAS_SUPPORT:
            c = _combine_lse(extra_ptr, row, ns, 6, 2, NS_PAD) - _combine_lse(extra_ptr, row, ns, 6, 0, NS_PAD)
        i = tl.arange(0, NS_PAD)
        j = tl.arange(0, K)
        base = part_in + ((row * ns + i[:, None]) * K + j[None, :]) * 3
        m = tl.load(base, mask=(i < ns)[:, None], other=M_INIT)  # (NS_PAD, K)
        mm = tl.max(m, 0)  # (K,)
        w = tl.exp(m - mm[None, :])
        s0 = tl.sum(tl.load(base + 1, mask=(i < ns)[:, None], other=0.0) * w, 0)
        s1 = tl.sum(tl.load(base + 2, mask=(i < ns)[:, None], other=0.0) * w, 0)
        delta = s1 / s0 - c  # (K,)
        pts = _alpha_points(lo, hi, d_lo, d_hi, K)
        new_lo = tl.max(tl.where(delta < 0, pts, -1.0), 0)
        new_hi = tl.min(tl.where(delta > 0, pts, 2.0), 0)
        nd_lo = tl.max(tl.where((pts == new_lo) & (delta < 0), delta, NEG_INF), 0)
        nd_hi = tl.min(tl.where((pts == new_hi) & (delta > 0), delta, float("inf")), 0)
        d_lo = tl.where(new_lo > lo, nd_lo, d_lo)
        lo = tl.maximum(lo, new_lo)
        d_hi = tl.where(new_hi < hi, nd_hi, d_hi)
        hi = tl.minimum(hi, new_hi)
        swap = lo > hi  # float noise right at the root: keep a valid interval
        lo, hi = tl.where(swap, hi, lo), tl.where(swap, lo, hi)
        if split == 0:
            tl.store(state_out + row * 4, lo)
            tl.store(state_out + row * 4 + 1, hi)
            tl.store(state_out + row * 4 + 2, d_lo)
            tl.store(state_out + row * 4 + 3, d_hi)
            if LAST:
                ell_min = tl.min(tl.load(extra_ptr + (row * ns + i) * 6 + 4, mask=i < ns, other=float("inf")), 0)
                ell_max = tl.max(tl.load(extra_ptr + (row * ns + i) * 6 + 5, mask=i < ns, other=NEG_INF), 0)
                same = tl.maximum(ell_max - c, c - ell_min) <= equal_tol
                est = tl.max(tl.where(tl.arange(0, K) == K - 1, _alpha_points(lo, hi, d_lo, d_hi, K), -1.0), 0)
                tl.store(alpha_ptr + row, tl.where(same, 0.5, est))
    if not LAST:
        # 2) accumulate this pass: for each point a, online (max, sum e, sum e * ell) with e = exp(lp + a ell - max)
        pts = _alpha_points(lo, hi, d_lo, d_hi, K)  # (K,)
        m = tl.zeros((K,), tl.float32) + M_INIT
        s0 = tl.zeros((K,), tl.float32)
        s1 = tl.zeros((K,), tl.float32)
        mp = M_INIT
        sp = 0.0
        mt = M_INIT
        st = 0.0
        ell_min = float("inf")
        ell_max = NEG_INF
        start = split * chunk
        end = tl.minimum(start + chunk, V)
        for rel in range(0, chunk, BLOCK):
            off = start + rel
            cols = off + tl.arange(0, BLOCK)
            msk = cols < end
            lp, _ = _load_logp(pol_ptr, row, s_pol, cols, msk, inv_temp, lse_p)
            lt, raw_t = _load_logp(tea_ptr, row, s_tea, cols, msk, inv_temp, lse_t)
            on = msk
            if HAS_SUPPORT:
                on = on & (_key(raw_t).to(tl.int64) >= thr)
            ell = tl.where(on, lt - lp, 0.0)
            x = tl.where(on[None, :], lp[None, :] + pts[:, None] * ell[None, :], NEG_INF)  # (K, BLOCK)
            m_new = tl.maximum(m, tl.max(x, 1))
            e = tl.exp(x - m_new[:, None])
            scale = tl.exp(m - m_new)
            s0 = s0 * scale + tl.sum(e, 1)
            s1 = s1 * scale + tl.sum(e * ell[None, :], 1)
            m = m_new
            if FIRST:
                lpm = tl.where(on, lp, NEG_INF)
                ltm = tl.where(on, lt, NEG_INF)
                mp_new = tl.maximum(mp, tl.max(lpm, 0))
                sp = sp * tl.exp(mp - mp_new) + tl.sum(tl.exp(lpm - mp_new), 0)
                mp = mp_new
                mt_new = tl.maximum(mt, tl.max(ltm, 0))
                st = st * tl.exp(mt - mt_new) + tl.sum(tl.exp(ltm - mt_new), 0)
                mt = mt_new
                ell_min = tl.minimum(ell_min, tl.min(tl.where(on, ell, float("inf")), 0))
                ell_max = tl.maximum(ell_max, tl.max(tl.where(on, ell, NEG_INF), 0))
        j = tl.arange(0, K)
        base = part_out + ((row * ns + split) * K + j) * 3
        tl.store(base, m)
        tl.store(base + 1, s0)
        tl.store(base + 2, s1)
        if FIRST:
            eb = extra_ptr + (row * ns + split) * 6
            tl.store(eb + 0, mp)
            tl.store(eb + 1, sp)
            tl.store(eb + 2, mt)
            tl.store(eb + 3, st)
            tl.store(eb + 4, ell_min)
            tl.store(eb + 5, ell_max)
