"""Triton kernels of the last pass of `core.fused`: sampling from q* and the per-row record.

Owns `_sample_kernel` (mixing on the support at the final alpha, exponential-race sampling with an in-kernel
Philox stream keyed by (seed, step): one stream per batch with the row in the counter, or with ROW_STREAMS one
stream per row keyed by that row's own (seed, step), so a row's draws do not depend on its slot; the sums
behind the diagnostics) and `_epilogue_kernel` (combines the splits of a row into the token and its record).
Shares the helpers and conventions of `fused_kernels` (splits, per-lane online log-sum-exp, order-preserving
keys); knows nothing about models or configs.
"""

import triton
import triton.language as tl

from .fused_kernels import (
    FLOOR,
    M_INIT,
    NEG_INF,
    _combine_lse,
    _key,
    _lane_lse,
    _load,
    _log_approx,
    _logp,
    _online,
    _online_xy,
    _store_lse,
)


@triton.jit
def _uniform(seed, offset, BLOCK: tl.constexpr):
    """(BLOCK,) uniforms in (0, 1]: one Philox call per 4 consecutive columns (offset: (BLOCK // 4,) int64, a unique
    counter per group of 4), its 4 outputs interleaved so that column 4 i + j gets output j of group i."""
    r0, r1, r2, r3 = tl.randint4x(seed, offset)
    bits = tl.interleave(tl.interleave(r0, r2), tl.interleave(r1, r3)).to(tl.int32, bitcast=True)
    bits = tl.where(bits < 0, -bits - 1, bits)  # as triton.language.random.uint_to_uniform_float
    return tl.maximum(bits.to(tl.float32) * 4.6566127342e-10, 1.0e-30)


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
    ROW_STREAMS: tl.constexpr = False,
):
    # part: (B, ns, 16) = q's (max, sum e, sum e ell, sum e lp), race (best value, best index), and for the
    # diagnostics log-sum-exps on the support of lp, lt, lp - a ell, lt + (1 - a) ell, and the support size.
    row = tl.program_id(0).to(tl.int64)
    split = tl.program_id(1)
    ns = tl.num_programs(1)
    lse_p = _combine_lse(stats_ptr, row, ns, 6, 0, NS_PAD)
    lse_t = _combine_lse(stats_ptr, row, ns, 6, 2, NS_PAD)
    thr = 0
    if HAS_SUPPORT:
        thr = tl.load(thr_ptr + row).to(tl.int32)
    if ROW_STREAMS:  # step, seed: (B,) per row; the Philox counter is the column alone
        step = tl.load(step_ptr + row)
        seed = tl.load(seed_ptr + row) + step * 1000003
        counter0 = row * 0
    else:  # step, seed: () for the batch; the counter includes the row
        step = tl.load(step_ptr)
        seed = tl.load(seed_ptr) + step * 1000003
        counter0 = row * V
    a = tl.where(step < force_n, 1.0, tl.load(alpha_ptr + row))
    z = tl.zeros((BLOCK,), tl.float32)
    m, s_x, s_ell, s_lp = z + M_INIT, z, z, z
    best, best_i = z + NEG_INF, z
    m_sp, s_sp, m_st, s_st, m_y1, s_y1, m_y2, s_y2 = z + M_INIT, z, z + M_INIT, z, z + M_INIT, z, z + M_INIT, z
    count = z
    start = split * chunk
    end = tl.minimum(start + chunk, V)
    cols = start + tl.arange(0, BLOCK)
    groups = counter0 + start + 4 * tl.arange(0, BLOCK // 4)  # Philox counters of this block's groups of 4
    nxt_p = _load(pol_ptr, row, s_pol, cols, end)
    nxt_t = _load(tea_ptr, row, s_tea, cols, end)
    for _ in range(0, chunk, BLOCK):
        on = cols < end
        lp = _logp(nxt_p, inv_temp, lse_p)
        lt = _logp(nxt_t, inv_temp, lse_t)
        if HAS_SUPPORT:
            on = on & (_key(nxt_t.to(tl.float32)) >= thr)
        here = cols
        cols += BLOCK
        nxt_p = _load(pol_ptr, row, s_pol, cols, end)
        nxt_t = _load(tea_ptr, row, s_tea, cols, end)
        ell = lt - lp
        x = tl.where(on, lp + a * ell, NEG_INF)  # (1 - a) lp + a lt
        m, s_x, s_ell, s_lp = _online_xy(m, s_x, s_ell, s_lp, x, ell, lp)
        # exponential race: argmax log q - log E, E = -log U ~ Exp(1)
        r = tl.where(on, x - _log_approx(-tl.log(_uniform(seed, groups, BLOCK))), NEG_INF)
        groups += BLOCK
        better = r > best
        best_i = tl.where(better, here.to(tl.float32), best_i)
        best = tl.where(better, r, best)
        if DIAG:
            m_sp, s_sp = _online(m_sp, s_sp, tl.where(on, lp, NEG_INF))
            m_st, s_st = _online(m_st, s_st, tl.where(on, lt, NEG_INF))
            m_y1, s_y1 = _online(m_y1, s_y1, tl.where(on, lp - a * ell, NEG_INF))
            m_y2, s_y2 = _online(m_y2, s_y2, tl.where(on, lt + (1.0 - a) * ell, NEG_INF))
            count += on.to(tl.float32)
    base = part_ptr + (row * ns + split) * 16
    mm, t0, w = _lane_lse(m, s_x)
    tl.store(base + 0, mm)
    tl.store(base + 1, t0)
    tl.store(base + 2, tl.sum(s_ell * w, 0))
    tl.store(base + 3, tl.sum(s_lp * w, 0))
    win = tl.argmax(best, 0)
    tl.store(base + 4, tl.max(best, 0))
    tl.store(base + 5, tl.sum(tl.where(tl.arange(0, BLOCK) == win, best_i, 0.0), 0))
    if DIAG:
        _store_lse(base + 6, m_sp, s_sp)
        _store_lse(base + 8, m_st, s_st)
        _store_lse(base + 10, m_y1, s_y1)
        _store_lse(base + 12, m_y2, s_y2)
        tl.store(base + 14, tl.sum(count, 0))


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
    ROW_STREAMS: tl.constexpr = False,
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
    if ROW_STREAMS:
        step = tl.load(step_ptr + row)
    else:
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
