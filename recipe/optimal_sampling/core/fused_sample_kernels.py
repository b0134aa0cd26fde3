"""Triton kernels of the last pass of `core.fused`: sampling from q* and the per-row record.

Owns `_sample_kernel` (mixing on the support at the final alpha, exponential-race sampling with an in-kernel
Philox stream keyed by (seed, step), the sums behind the diagnostics) and `_epilogue_kernel` (combines the splits
of a row into the token and its record). Shares the helpers and conventions of `fused_kernels` (splits, online
log-sum-exp, order-preserving keys); knows nothing about models or configs.
"""

import triton
import triton.language as tl

from .fused_kernels import FLOOR, M_INIT, NEG_INF, _combine_lse, _key, _load_logp


@triton.jit
def _online(m, s, x):
    """One block of an online log-sum-exp; x: (BLOCK,) with -inf where absent. Returns the new (max, sum)."""
    m_new = tl.maximum(m, tl.max(x, 0))
    return m_new, s * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new), 0)


@triton.jit
def _sample_kernel(
    pol_ptr,
    tea_ptr,
    s_pol,
    s_tea,
    V,
    chunk,
    inv_temp,
    stats_ptr,
    thr_ptr,
    alpha_ptr,
    step_ptr,
    seed_ptr,
    force_n,
    part_ptr,
    HAS_SUPPORT: tl.constexpr,
    DIAG: tl.constexpr,
    NS_PAD: tl.constexpr,
    BLOCK: tl.constexpr,
):
    # part: (B, ns, 16) = q's (max, sum e, sum e ell, sum e lp), race (best value, best index), and for the
    # diagnostics log-sum-exps on the support of lp, lt, lp - a ell, lt + (1 - a) ell, and the support size.
    row = tl.program_id(0).to(tl.int64)
    split = tl.program_id(1)
    ns = tl.num_programs(1)
    lse_p = _combine_lse(stats_ptr, row, ns, 6, 0, NS_PAD)
    lse_t = _combine_lse(stats_ptr, row, ns, 6, 2, NS_PAD)
    thr = tl.load(thr_ptr + row)
    step = tl.load(step_ptr)
    a = tl.where(step < force_n, 1.0, tl.load(alpha_ptr + row))
    seed = tl.load(seed_ptr) + step * 1000003
    m = M_INIT
    s_x = 0.0
    s_ell = 0.0
    s_lp = 0.0
    best = NEG_INF
    best_i = 0.0
    m_sp = M_INIT
    s_sp = 0.0
    m_st = M_INIT
    s_st = 0.0
    m_y1 = M_INIT
    s_y1 = 0.0
    m_y2 = M_INIT
    s_y2 = 0.0
    count = 0.0
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
        ell = lt - lp
        x = tl.where(on, (1.0 - a) * lp + a * lt, NEG_INF)
        m_new = tl.maximum(m, tl.max(x, 0))
        scale = tl.exp(m - m_new)
        e = tl.exp(x - m_new)
        s_x = s_x * scale + tl.sum(e, 0)
        s_ell = s_ell * scale + tl.sum(e * ell, 0)
        s_lp = s_lp * scale + tl.sum(e * lp, 0)
        m = m_new
        # exponential race: argmax log q - log E, E = -log U ~ Exp(1)
        u = tl.maximum(tl.rand(seed, row * V + cols), 1.0e-30)
        r = tl.where(on, x - tl.log(-tl.log(u)), NEG_INF)
        r_best = tl.max(r, 0)
        r_idx = tl.argmax(r, 0)
        better = r_best > best
        best_i = tl.where(better, (off + r_idx).to(tl.float32), best_i)
        best = tl.where(better, r_best, best)
        if DIAG:
            m_sp, s_sp = _online(m_sp, s_sp, tl.where(on, lp, NEG_INF))
            m_st, s_st = _online(m_st, s_st, tl.where(on, lt, NEG_INF))
            m_y1, s_y1 = _online(m_y1, s_y1, tl.where(on, lp - a * ell, NEG_INF))
            m_y2, s_y2 = _online(m_y2, s_y2, tl.where(on, lt + (1.0 - a) * ell, NEG_INF))
            count += tl.sum(on.to(tl.float32), 0)
    base = part_ptr + (row * ns + split) * 16
    tl.store(base + 0, m)
    tl.store(base + 1, s_x)
    tl.store(base + 2, s_ell)
    tl.store(base + 3, s_lp)
    tl.store(base + 4, best)
    tl.store(base + 5, best_i)
    tl.store(base + 6, m_sp)
    tl.store(base + 7, s_sp)
    tl.store(base + 8, m_st)
    tl.store(base + 9, s_st)
    tl.store(base + 10, m_y1)
    tl.store(base + 11, s_y1)
    tl.store(base + 12, m_y2)
    tl.store(base + 13, s_y2)
    tl.store(base + 14, count)


@triton.jit
def _epilogue_kernel(
    pol_ptr,
    tea_ptr,
    s_pol,
    s_tea,
    inv_temp,
    stats_ptr,
    alpha_ptr,
    step_ptr,
    force_n,
    part_ptr,
    rec_ptr,
    tok_ptr,
    ns,
    NS_PAD: tl.constexpr,
):
    # rec: (13, B) float32 in the order of fused.RECORD_FIELDS; tok: (B,) int64.
    row = tl.program_id(0).to(tl.int64)
    B = tl.num_programs(0)
    i = tl.arange(0, NS_PAD)
    live = i < ns
    base = part_ptr + (row * ns + i) * 16
    m = tl.load(base, mask=live, other=M_INIT)
    mm = tl.max(m, 0)
    w = tl.exp(m - mm)
    s_x = tl.sum(tl.load(base + 1, mask=live, other=0.0) * w, 0)
    log_z = mm + tl.log(s_x)
    e_ell = tl.sum(tl.load(base + 2, mask=live, other=0.0) * w, 0) / s_x
    e_lp = tl.sum(tl.load(base + 3, mask=live, other=0.0) * w, 0) / s_x
    race = tl.load(base + 4, mask=live, other=NEG_INF)
    win = tl.argmax(race, 0)
    token = tl.sum(tl.where(i == win, tl.load(base + 5, mask=live, other=0.0), 0.0), 0).to(tl.int64)
    lse_p = _combine_lse(stats_ptr, row, ns, 6, 0, NS_PAD)
    lse_t = _combine_lse(stats_ptr, row, ns, 6, 2, NS_PAD)
    step = tl.load(step_ptr)
    forced = step < force_n
    a = tl.where(forced, 1.0, tl.load(alpha_ptr + row))
    lp_tok = tl.load(pol_ptr + row * s_pol + token).to(tl.float32) * inv_temp - lse_p
    lt_tok = tl.load(tea_ptr + row * s_tea + token).to(tl.float32) * inv_temp - lse_t
    logq_tok = (1.0 - a) * tl.maximum(lp_tok, FLOOR) + a * tl.maximum(lt_tok, FLOOR) - log_z
    lse_sp = _combine_lse(part_ptr, row, ns, 16, 6, NS_PAD)
    lse_st = _combine_lse(part_ptr, row, ns, 16, 8, NS_PAD)
    lse_y1 = _combine_lse(part_ptr, row, ns, 16, 10, NS_PAD)
    lse_y2 = _combine_lse(part_ptr, row, ns, 16, 12, NS_PAD)
    st = stats_ptr + (row * ns + i) * 6
    tl.store(tok_ptr + row, token)
    tl.store(rec_ptr + 0 * B + row, logq_tok)
    tl.store(rec_ptr + 1 * B + row, lp_tok)
    tl.store(rec_ptr + 2 * B + row, lt_tok)
    tl.store(rec_ptr + 3 * B + row, a)
    tl.store(rec_ptr + 4 * B + row, forced.to(tl.float32))
    tl.store(rec_ptr + 5 * B + row, tl.sum(tl.load(base + 14, mask=live, other=0.0), 0))
    tl.store(rec_ptr + 6 * B + row, a * e_ell - log_z)
    tl.store(rec_ptr + 7 * B + row, -(1.0 - a) * e_ell - log_z)
    tl.store(rec_ptr + 8 * B + row, tl.exp(2.0 * lse_sp - log_z - lse_y1))
    tl.store(rec_ptr + 9 * B + row, tl.exp(2.0 * lse_st - log_z - lse_y2))
    tl.store(rec_ptr + 10 * B + row, log_z - e_lp - a * e_ell)
    tl.store(rec_ptr + 11 * B + row, tl.sum(tl.load(st + 4, mask=live, other=0.0), 0))
    tl.store(rec_ptr + 12 * B + row, tl.sum(tl.load(st + 5, mask=live, other=0.0), 0))
