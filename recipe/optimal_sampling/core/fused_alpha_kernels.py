"""Triton kernel of the alpha search of `core.fused` (kl_symmetry): the root of Delta(alpha) = E_{q_alpha}[ell].

Owns `_alpha_kernel` and its scalar helpers (bracket, Newton, Hermite interpolation). Shares the conventions of
`fused_kernels` (splits, per-lane online sums, finalise-then-accumulate passes); knows nothing about models or
configs. Per pass and row: Delta and Delta' = Var_q[ell] at NP points (per-lane sums in groups of 4 points): the
first pass's 8 points are the grid j / 9, later passes' 4 points are estimate + (-1, -1/3, 1/3, 1) * radius
inside the bracket [lo, hi] (a grid of it while Delta is known at one end only). Between passes
(`_alpha_update`): the bracket shrinks to the nearest points of each sign, the estimate is the root of the cubic
(Hermite) interpolant of Delta and Delta' at its ends (Newton from one end, the secant or the midpoint while an
end is unknown), and the radius is where its error should lie (its distance from the Newton estimate)."""

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
    _logp,
    _online,
    _online_xy,
    _pick,
    _store_lse,
)

NP_FIRST = tl.constexpr(8)  # points of the first pass (fused.ALPHA_POINTS)
NP_NEXT = tl.constexpr(4)  # points of each later pass
NP_MAX = tl.constexpr(8)  # the partial-sum buffer's points axis


@triton.jit
def _points(lo, hi, d_lo, d_hi, est, rad, FIRST: tl.constexpr):
    """The pass's alphas, ascending: (8,) grid j / 9 in the first pass; else (4,) estimate + (-1, -1/3, 1/3, 1) *
    radius clipped to [lo, hi] once Delta is known at both ends, before that the grid lo + (1..4) / 5 (hi - lo)
    (a root near 0 or 1 may sit behind a steep step that Newton from one end cannot see)."""
    if FIRST:
        return (tl.arange(0, NP_FIRST) + 1).to(tl.float32) / 9.0
    else:
        off = (2 * tl.arange(0, NP_NEXT) - 3).to(tl.float32) / 3.0
        both = (d_lo == d_lo) & (d_hi == d_hi)
        centre = tl.where(both, est, 0.5 * (lo + hi))
        r = tl.where(both, rad, 0.3 * (hi - lo))
        return tl.minimum(tl.maximum(centre + r * off, lo), hi)


@triton.jit
def _moments(part_in, row, ns, NP: tl.constexpr, NS_PAD: tl.constexpr):
    """Combine the splits' (max, sum e, sum e ell, sum e ell^2) of the NP points -> (NP,) E[ell], (NP,) E[ell^2]."""
    i = tl.arange(0, NS_PAD)[:, None]
    j = tl.arange(0, NP)[None, :]
    base = part_in + ((row * ns + i) * NP_MAX + j) * 4  # (NS_PAD, NP)
    live = (i < ns) & (j < NP)
    m = tl.load(base, mask=live, other=M_INIT)
    w = tl.exp(m - tl.max(m, 0)[None, :])
    s0 = tl.sum(tl.load(base + 1, mask=live, other=0.0) * w, 0)
    s1 = tl.sum(tl.load(base + 2, mask=live, other=0.0) * w, 0)
    s2 = tl.sum(tl.load(base + 3, mask=live, other=0.0) * w, 0)
    return s1 / s0, s2 / s0


@triton.jit
def _bracket(lo, hi, d_lo, d_hi, v_lo, v_hi, pt, d, v, tol):
    """Shrink [lo, hi] with Delta(pt) = d (slope v): d < -tol moves lo up, d > tol moves hi down (|d| <= tol:
    the sign is not trusted, nothing moves)."""
    up = (d < -tol) & (pt > lo)
    dn = (d > tol) & (pt < hi)
    at = (d == 0) & (tol == 0)
    lo2 = tl.where(up | at, pt, lo)
    hi2 = tl.where(dn | at, pt, hi)
    return lo2, hi2, tl.where(up, d, d_lo), tl.where(dn, d, d_hi), tl.where(up, v, v_lo), tl.where(dn, v, v_hi)


@triton.jit
def _newton(lo, hi, d_lo, d_hi, v_lo, v_hi):
    """Newton from the end nearer the root (|Delta| smaller) if it lands inside [lo, hi], else from the other end,
    else the secant, else the midpoint; and a radius around it: 2 * (curvature / 2 slope) * step^2 where Newton's
    error should lie, a quarter of the bracket where Newton was not taken. NaN Delta = not evaluated."""
    n_lo = lo - d_lo / v_lo
    n_hi = hi - d_hi / v_hi
    in_lo = (n_lo > lo) & (n_lo < hi)  # False for NaN
    in_hi = (n_hi > lo) & (n_hi < hi)
    use_lo = ((d_hi != d_hi) | (tl.abs(d_lo) < tl.abs(d_hi))) & (d_lo == d_lo)
    first_in = tl.where(use_lo, in_lo, in_hi)
    known = (d_lo == d_lo) & (d_hi == d_hi) & (d_hi > d_lo)
    sec = lo - d_lo * (hi - lo) / tl.where(known, d_hi - d_lo, 1.0)
    est = tl.where(use_lo, n_lo, n_hi)
    est = tl.where(first_in, est, tl.where(use_lo, n_hi, n_lo))
    est = tl.where(first_in | tl.where(use_lo, in_hi, in_lo), est, tl.where(known, sec, 0.5 * (lo + hi)))
    only_lo = (d_lo == d_lo) & (d_hi != d_hi)  # Newton past the unevaluated end: try that end
    only_hi = (d_lo != d_lo) & (d_hi == d_hi)
    est = tl.where(only_lo & (n_lo >= hi), hi, tl.where(only_hi & (n_hi <= lo), lo, est))
    width = hi - lo
    curv = tl.abs(v_hi - v_lo) / (2.0 * width * tl.where(use_lo, v_lo, v_hi))
    curv = tl.where(curv == curv, tl.minimum(curv, 1.0e3), 1.0e3)  # NaN or inf (unknown) -> large
    step = est - tl.where(use_lo, lo, hi)
    return est, tl.where(first_in, 2.0 * curv * step * step + 1.0e-6, 0.25 * width)


@triton.jit
def _hermite_root(lo, hi, d_lo, d_hi, v_lo, v_hi):
    """A root in [lo, hi] of the cubic through (lo, Delta, Delta') and (hi, Delta, Delta'): 24 bisection steps
    on t = (alpha - lo) / (hi - lo) (the cubic is negative at 0 and positive at 1)."""
    w = hi - lo
    a = 0.0
    b = 1.0
    for _ in range(24):
        t = 0.5 * (a + b)
        t2 = t * t
        t3 = t2 * t
        h = (2.0 * t3 - 3.0 * t2 + 1.0) * d_lo + (t3 - 2.0 * t2 + t) * w * v_lo
        h += (3.0 * t2 - 2.0 * t3) * d_hi + (t3 - t2) * w * v_hi
        a = tl.where(h < 0, t, a)
        b = tl.where(h < 0, b, t)
    return lo + w * 0.5 * (a + b)


@triton.jit
def _alpha_update(lo, hi, d_lo, d_hi, v_lo, v_hi):
    """Next estimate and radius inside [lo, hi] (the next points: estimate + (-1, 0, 1) * radius). With Delta and
    Delta' known at both ends: the root of their cubic (Hermite) interpolant, radius = its distance from the
    Newton estimate; else `_newton`."""
    est, rad = _newton(lo, hi, d_lo, d_hi, v_lo, v_hi)
    both = (d_lo == d_lo) & (d_hi == d_hi) & (v_lo == v_lo) & (v_hi == v_hi) & (hi > lo)
    herm = _hermite_root(lo, hi, d_lo, d_hi, v_lo, v_hi)
    rad = tl.where(both, tl.abs(herm - est) + 1.0e-6, rad)
    return tl.where(both, herm, est), tl.maximum(tl.minimum(rad, 0.25 * (hi - lo)), 1.0e-7)


@triton.jit
def _store_state(ptr, lo, hi, d_lo, d_hi, v_lo, v_hi, est, rad):
    tl.store(ptr, lo)
    tl.store(ptr + 1, hi)
    tl.store(ptr + 2, d_lo)
    tl.store(ptr + 3, d_hi)
    tl.store(ptr + 4, v_lo)
    tl.store(ptr + 5, v_hi)
    tl.store(ptr + 6, est)
    tl.store(ptr + 7, rad)


@triton.jit
def _alpha_finalise(state_in, part_in, row, ns, shift, tol, PREV_FIRST: tl.constexpr, NS_PAD: tl.constexpr):
    """The previous pass's points (placed from state_in; Delta = E[ell] - shift) -> the new state (lo, hi, Delta
    and Delta' at both ends, estimate, radius)."""
    sb = state_in + row * 8
    lo, hi, d_lo, d_hi = tl.load(sb), tl.load(sb + 1), tl.load(sb + 2), tl.load(sb + 3)
    v_lo, v_hi, est, rad = tl.load(sb + 4), tl.load(sb + 5), tl.load(sb + 6), tl.load(sb + 7)
    NP: tl.constexpr = NP_FIRST if PREV_FIRST else NP_NEXT
    pts = _points(lo, hi, d_lo, d_hi, est, rad, PREV_FIRST)
    m1, m2 = _moments(part_in, row, ns, NP, NS_PAD)
    d = m1 - shift
    v = m2 - m1 * m1
    for k in tl.static_range(NP):  # ascending points: each moves lo up or hi down
        lo, hi, d_lo, d_hi, v_lo, v_hi = _bracket(
            lo, hi, d_lo, d_hi, v_lo, v_hi, _pick(pts, k), _pick(d, k), _pick(v, k), tol
        )
    est, rad = _alpha_update(lo, hi, d_lo, d_hi, tl.maximum(v_lo, 0.0), tl.maximum(v_hi, 0.0))
    return lo, hi, d_lo, d_hi, v_lo, v_hi, est, rad


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
    PREV_FIRST: tl.constexpr,
    LAST: tl.constexpr,
    HAS_SUPPORT: tl.constexpr,
    NS_PAD: tl.constexpr,
    BLOCK: tl.constexpr,
):
    # Root of Delta(a) = E_{q_a}[ell] on the support, q_a ∝ exp(lp + a * ell), lp, lt = both models' log-probs
    # renormalised on the support (as `core.solve_alpha`), ell = lt - lp. state: (2, B, 8) = (lo, hi, Delta(lo),
    # Delta(hi), Delta'(lo), Delta'(hi), estimate, radius), NaN = not evaluated. part: (2, B, ns, 8, 4) = (max,
    # sum e, sum e ell, sum e ell^2) per point. extra: (B, ns, 6) from the first pass = log-mass of each model on
    # the support (max, sumexp), min / max of the unnormalised ell there. The first pass knows no log-mass yet: it
    # uses unnormalised log-probs, so its Delta = E[ell] - c (c = the log-mass difference) carries float32 noise
    # ~ ulp(c); signs within 1e-6 (1 + |log-masses|) of 0 are not trusted.
    row = tl.program_id(0).to(tl.int64)
    split = tl.program_id(1)
    ns = tl.num_programs(1)
    mass_p = 0.0  # log-masses on the support: 0 without one, from `extra` after the first pass
    mass_t = 0.0
    if FIRST:
        lo, hi, est, rad = 0.0, 1.0, 0.5, 0.25
        d_lo = float("nan")  # Delta at the ends: not evaluated yet
        d_hi = d_lo
        if split == 0:
            _store_state(state_out + row * 8, lo, hi, d_lo, d_hi, d_lo, d_hi, est, rad)
    else:
        # 1) finalise the previous pass
        if HAS_SUPPORT:
            mass_p = _combine_lse(extra_ptr, row, ns, 6, 0, NS_PAD)
            mass_t = _combine_lse(extra_ptr, row, ns, 6, 2, NS_PAD)
        shift = 0.0
        tol = 0.0
        if PREV_FIRST:
            shift = mass_t - mass_p
            tol = 1.0e-6 * (1.0 + tl.abs(mass_p) + tl.abs(mass_t))
        state = _alpha_finalise(state_in, part_in, row, ns, shift, tol, PREV_FIRST, NS_PAD)
        lo, hi, d_lo, d_hi, v_lo, v_hi, est, rad = state
        if split == 0:
            _store_state(state_out + row * 8, lo, hi, d_lo, d_hi, v_lo, v_hi, est, rad)
            if LAST:
                i = tl.arange(0, NS_PAD)
                ell_min = tl.min(tl.load(extra_ptr + (row * ns + i) * 6 + 4, mask=i < ns, other=float("inf")), 0)
                ell_max = tl.max(tl.load(extra_ptr + (row * ns + i) * 6 + 5, mask=i < ns, other=NEG_INF), 0)
                c = mass_t - mass_p
                same = tl.maximum(ell_max - c, c - ell_min) <= equal_tol
                tl.store(alpha_ptr + row, tl.where(same, 0.5, tl.minimum(tl.maximum(est, 0.0), 1.0)))
    if not LAST:
        # 2) accumulate this pass
        lse_p = _combine_lse(stats_ptr, row, ns, 6, 0, NS_PAD)
        lse_t = _combine_lse(stats_ptr, row, ns, 6, 2, NS_PAD)
        thr = 0
        if HAS_SUPPORT:
            thr = tl.load(thr_ptr + row).to(tl.int32)
        _alpha_accumulate(
            pol_ptr, tea_ptr, s_pol, s_tea, row, split, ns, V, chunk, inv_temp, lse_p, lse_t, mass_p, mass_t, thr,
            _points(lo, hi, d_lo, d_hi, est, rad, FIRST), part_out, extra_ptr, FIRST, HAS_SUPPORT, BLOCK,
        )  # fmt: skip


@triton.jit
def _acc_point(st, lpm, a, ell, ell2):
    """One point's per-lane (max, sum e, sum e ell, sum e ell^2) after one block: e = exp(lp + a ell - max)."""
    return _online_xy(st[0], st[1], st[2], st[3], lpm + a * ell, ell, ell2)


@triton.jit
def _acc4(group, pts, k, lpm, ell, ell2):
    """`_acc_point` for a group of 4 points: pts[k], ..., pts[k + 3]."""
    return (
        _acc_point(group[0], lpm, _pick(pts, k), ell, ell2),
        _acc_point(group[1], lpm, _pick(pts, k + 1), ell, ell2),
        _acc_point(group[2], lpm, _pick(pts, k + 2), ell, ell2),
        _acc_point(group[3], lpm, _pick(pts, k + 3), ell, ell2),
    )


@triton.jit
def _alpha_accumulate(
    pol_ptr, tea_ptr, s_pol, s_tea, row, split, ns, V, chunk, inv_temp, lse_p, lse_t, mass_p, mass_t, thr, pts,
    part_out, extra_ptr, FIRST: tl.constexpr, HAS_SUPPORT: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    """Per lane, for each point a of pts (NP,): online (max, sum e, sum e ell, sum e ell^2), e = exp(lp + a ell -
    max), in groups of 4 points (1-D per-lane sums: no layout shuffles); in the first pass also both models'
    log-mass on the support and the range of ell there."""
    z = tl.zeros((BLOCK,), tl.float32)
    point = (z + M_INIT, z, z, z)
    group = (point, point, point, point)
    acc = (group, group) if FIRST else (group,)
    mp, mt, sp, st = z + M_INIT, z + M_INIT, z, z
    ell_min = z + float("inf")
    ell_max = z + NEG_INF
    start = split * chunk
    end = tl.minimum(start + chunk, V)
    cols = start + tl.arange(0, BLOCK)
    nxt_p = _load(pol_ptr, row, s_pol, cols, end)
    nxt_t = _load(tea_ptr, row, s_tea, cols, end)
    for _ in range(0, chunk, BLOCK):
        on = cols < end
        lp = _logp(nxt_p, inv_temp, lse_p)
        lt = _logp(nxt_t, inv_temp, lse_t)
        if HAS_SUPPORT:  # as core.mixture.restrict + solve_alpha: floor, renormalise on the support, floor
            on = on & (_key(nxt_t.to(tl.float32)) >= thr)
            lp = tl.maximum(lp - mass_p, FLOOR)
            lt = tl.maximum(lt - mass_t, FLOOR)
        cols += BLOCK
        nxt_p = _load(pol_ptr, row, s_pol, cols, end)
        nxt_t = _load(tea_ptr, row, s_tea, cols, end)
        ell = tl.where(on, lt - lp, 0.0)
        lpm = tl.where(on, lp, NEG_INF)
        ell2 = ell * ell
        if FIRST:
            acc = (_acc4(acc[0], pts, 0, lpm, ell, ell2), _acc4(acc[1], pts, 4, lpm, ell, ell2))
            mp, sp = _online(mp, sp, lpm)
            mt, st = _online(mt, st, tl.where(on, lt, NEG_INF))
            ell_min = tl.minimum(ell_min, tl.where(on, ell, float("inf")))
            ell_max = tl.maximum(ell_max, tl.where(on, ell, NEG_INF))
        else:
            acc = (_acc4(acc[0], pts, 0, lpm, ell, ell2),)
    base = part_out + (row * ns + split) * NP_MAX * 4
    for g in tl.static_range(len(acc)):
        for k in tl.static_range(4):
            pt = acc[g][k]
            _store_point(base + (4 * g + k) * 4, pt[0], pt[1], pt[2], pt[3])
    if FIRST:
        eb = extra_ptr + (row * ns + split) * 6
        _store_lse(eb, mp, sp)
        _store_lse(eb + 2, mt, st)
        tl.store(eb + 4, tl.min(ell_min, 0))
        tl.store(eb + 5, tl.max(ell_max, 0))


@triton.jit
def _store_point(ptr, m, s0, s1, s2):
    """Reduce one point's per-lane sums across lanes and store (max, sum e, sum e ell, sum e ell^2)."""
    mm, t0, w = _lane_lse(m, s0)
    tl.store(ptr, mm)
    tl.store(ptr + 1, t0)
    tl.store(ptr + 2, tl.sum(s1 * w, 0))
    tl.store(ptr + 3, tl.sum(s2 * w, 0))
