"""The small fused ops of a Qwen3 decode step, each as a Triton kernel with a torch twin that defines it.

Owns: add + RMSNorm, q/k RMSNorm + RoPE + KV-cache store, decode attention over each row's own cache length
(split over the sequence, flash-decoding style, GQA heads of one KV head together), and SiLU(gate) * up.
Knows nothing about models or sampling. Numerics follow HF's Qwen3 (float32 statistics, products rounded to
the model dtype where HF rounds them); RoPE is applied in float32 and rounded once.

Every op takes `use_triton`: True on CUDA (or under TRITON_INTERPRET=1 on CPU, slowly); the torch twin runs
anywhere and is what the CPU tests compare HF against.
"""

import functools

import torch
import torch.nn.functional as F
from torch import Tensor

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - CPU-only installs
    triton = None


@functools.cache
def _sm_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4


# ---------------------------------------------------------------------------------------------------- torch twins
def _rms(x: Tensor, w: Tensor, eps: float) -> Tensor:
    """HF Qwen3RMSNorm: float32 statistics, normalised value rounded to x.dtype, times the weight."""
    xf = x.float()
    n = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)
    return w * n


def _rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """x: (N, heads, D) float32; cos, sin: (N, 1, D/2). Rotates the two halves (HF rotate_half)."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


# --------------------------------------------------------------------------------------------------- public ops
def add_rms_norm(x: Tensor, residual: Tensor | None, w: Tensor, eps: float, use_triton: bool) -> tuple[Tensor, Tensor]:
    """h = residual + x (in x.dtype, as HF adds), out = RMSNorm(h). x, residual: (N, C). Returns (out, h)."""
    if not use_triton:
        h = x if residual is None else residual + x
        return _rms(h, w, eps), h
    N, C = x.shape
    out = torch.empty_like(x)  # (N, C)
    h = x if residual is None else torch.empty_like(x)  # (N, C)
    _add_rms_kernel[(N,)](
        x, x if residual is None else residual, w, out, h, C, eps, HAS_RES=residual is not None,
        BLOCK=triton.next_power_of_2(C), num_warps=8,
    )  # fmt: skip
    return out, h


def qk_norm_rope_store(
    qkv: Tensor, q_w: Tensor, k_w: Tensor, inv_freq: Tensor, rope_scale: float, eps: float,
    rows: Tensor, pos: Tensor, k_cache: Tensor, v_cache: Tensor, n_heads: int, use_triton: bool,
) -> Tensor:  # fmt: skip
    """Split qkv (N, (H + 2 KVH) D), RMSNorm q and k per head, rotate both by their token's position, store k and
    v at cache[rows[n], :, pos[n]]. caches: (B, KVH, S, D). Returns q: (N, H, D) in the model dtype."""
    N = qkv.shape[0]
    n_kv, D = k_cache.shape[1], k_cache.shape[3]
    if not use_triton:
        q, k, v = qkv.split([n_heads * D, n_kv * D, n_kv * D], dim=-1)
        q, k = _rms(q.view(N, n_heads, D), q_w, eps), _rms(k.reshape(N, n_kv, D), k_w, eps)
        ang = pos.float()[:, None] * inv_freq[None, :]  # (N, D/2)
        cos, sin = (ang.cos() * rope_scale)[:, None], (ang.sin() * rope_scale)[:, None]  # (N, 1, D/2)
        q, k = _rope(q.float(), cos, sin).to(qkv.dtype), _rope(k.float(), cos, sin).to(qkv.dtype)
        k_cache[rows, :, pos] = k  # (N, KVH, D) into (B, KVH, S, D)
        v_cache[rows, :, pos] = v.reshape(N, n_kv, D)
        return q
    q = torch.empty(N, n_heads, D, dtype=qkv.dtype, device=qkv.device)  # (N, H, D)
    _qk_rope_kernel[(N, n_heads + n_kv)](
        qkv, q_w, k_w, inv_freq, rows, pos, q, k_cache, v_cache, qkv.stride(0), n_heads, n_kv, eps, rope_scale,
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), D=D, num_warps=1,
    )  # fmt: skip
    return q


def decode_attention(q: Tensor, k_cache: Tensor, v_cache: Tensor, pos: Tensor, use_triton: bool) -> Tensor:
    """One query per row over that row's cache slots [0, pos[b]]. q: (B, H, D); caches: (B, KVH, S, D) with
    B rows used; pos: (B,). Returns (B, H * D) in the model dtype (softmax scale D^-0.5, as Qwen3)."""
    B, H, D = q.shape
    n_kv, S = k_cache.shape[1], k_cache.shape[2]
    G = H // n_kv
    if not use_triton:
        keys = k_cache[:B].repeat_interleave(G, dim=1)  # (B, H, S, D)
        vals = v_cache[:B].repeat_interleave(G, dim=1)  # (B, H, S, D)
        scores = torch.einsum("bhd,bhsd->bhs", q.float(), keys.float()) * D**-0.5  # (B, H, S)
        live = torch.arange(S, device=q.device)[None, :] <= pos[:, None]  # (B, S)
        scores = scores.masked_fill(~live[:, None, :], float("-inf"))
        out = torch.einsum("bhs,bhsd->bhd", scores.softmax(-1), vals.float())  # (B, H, D)
        return out.to(q.dtype).reshape(B, H * D)
    block_n = 64
    splits = max(1, min(triton.cdiv(S, block_n), triton.cdiv(4 * _sm_count(q.device), B * n_kv)))
    chunk = triton.cdiv(triton.cdiv(S, splits), block_n) * block_n
    splits = triton.cdiv(S, chunk)
    acc = torch.empty(B, H, splits, D, dtype=torch.float32, device=q.device)  # (B, H, splits, D)
    ml = torch.empty(B, H, splits, 2, dtype=torch.float32, device=q.device)  # (B, H, splits, 2)
    _attn_split_kernel[(B, n_kv, splits)](
        q, k_cache, v_cache, pos, acc, ml, D**-0.5, k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), chunk,
        H, G=G, G_PAD=max(16, triton.next_power_of_2(G)), D=D, BLOCK_N=block_n,
        PREC="ieee" if q.dtype == torch.float32 else None, num_warps=4,
    )  # fmt: skip
    out = torch.empty(B, H * D, dtype=q.dtype, device=q.device)  # (B, H * D)
    _attn_combine_kernel[(B * H,)](acc, ml, out, splits, NS_PAD=max(2, triton.next_power_of_2(splits)), D=D)
    return out


def silu_mul(gate_up: Tensor, use_triton: bool) -> Tensor:
    """SiLU(gate) * up with HF's roundings. gate_up: (N, 2 I) = [gate | up]. Returns (N, I)."""
    N, two_i = gate_up.shape
    inter = two_i // 2
    if not use_triton:
        gate, up = gate_up.split(inter, dim=-1)
        return F.silu(gate) * up
    out = torch.empty(N, inter, dtype=gate_up.dtype, device=gate_up.device)  # (N, I)
    block = 1024
    _silu_mul_kernel[(N, triton.cdiv(inter, block))](gate_up, out, inter, BLOCK=block, num_warps=4)
    return out


# ------------------------------------------------------------------------------------------------------ kernels
if triton is not None:

    @triton.jit
    def _add_rms_kernel(x_ptr, r_ptr, w_ptr, out_ptr, h_ptr, C, eps, HAS_RES: tl.constexpr, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK)
        msk = cols < C
        dt = out_ptr.dtype.element_ty
        h = tl.load(x_ptr + row * C + cols, mask=msk, other=0.0)
        if HAS_RES:
            h = (h.to(tl.float32) + tl.load(r_ptr + row * C + cols, mask=msk, other=0.0).to(tl.float32)).to(dt)
            tl.store(h_ptr + row * C + cols, h, mask=msk)
        hf = h.to(tl.float32)
        n = (hf * tl.rsqrt(tl.sum(hf * hf, 0) / C + eps)).to(dt).to(tl.float32)
        w = tl.load(w_ptr + cols, mask=msk, other=0.0).to(tl.float32)
        tl.store(out_ptr + row * C + cols, (w * n).to(dt), mask=msk)

    @triton.jit
    def _qk_rope_kernel(
        qkv_ptr, qw_ptr, kw_ptr, freq_ptr, rows_ptr, pos_ptr, q_ptr, kc_ptr, vc_ptr, s_qkv, H, KVH, eps, rope_scale,
        s_cb, s_ch, s_cs, D: tl.constexpr,
    ):  # fmt: skip
        # program (token n, head h): h < H is a query head, else key head h - H (which also moves v)
        n = tl.program_id(0).to(tl.int64)
        h = tl.program_id(1)
        dt = q_ptr.dtype.element_ty
        half = tl.arange(0, D // 2)
        is_q = h < H
        pos = tl.load(pos_ptr + n)
        ang = pos.to(tl.float32) * tl.load(freq_ptr + half)
        cos = tl.cos(ang) * rope_scale
        sin = tl.sin(ang) * rope_scale
        src = qkv_ptr + n * s_qkv + h * D  # q heads, then k heads, then v heads
        x1 = tl.load(src + half).to(tl.float32)
        x2 = tl.load(src + D // 2 + half).to(tl.float32)
        r = tl.rsqrt((tl.sum(x1 * x1, 0) + tl.sum(x2 * x2, 0)) / D + eps)
        w1 = tl.where(is_q, tl.load(qw_ptr + half), tl.load(kw_ptr + half)).to(tl.float32)
        w2 = tl.where(is_q, tl.load(qw_ptr + D // 2 + half), tl.load(kw_ptr + D // 2 + half)).to(tl.float32)
        y1 = (w1 * (x1 * r).to(dt).to(tl.float32)).to(dt).to(tl.float32)
        y2 = (w2 * (x2 * r).to(dt).to(tl.float32)).to(dt).to(tl.float32)
        o1 = (y1 * cos - y2 * sin).to(dt)
        o2 = (y2 * cos + y1 * sin).to(dt)
        all_q = (half < D) & is_q
        all_k = (half < D) & (h >= H)
        q_dst = q_ptr + (n * H + h) * D
        tl.store(q_dst + half, o1, mask=all_q)
        tl.store(q_dst + D // 2 + half, o2, mask=all_q)
        kvh = h - H
        slot = tl.load(rows_ptr + n).to(tl.int64) * s_cb + kvh * s_ch + pos.to(tl.int64) * s_cs
        tl.store(kc_ptr + slot + half, o1, mask=all_k)
        tl.store(kc_ptr + slot + D // 2 + half, o2, mask=all_k)
        v_src = qkv_ptr + n * s_qkv + (H + KVH + kvh) * D
        v1 = tl.load(v_src + half, mask=all_k, other=0.0)
        v2 = tl.load(v_src + D // 2 + half, mask=all_k, other=0.0)
        tl.store(vc_ptr + slot + half, v1, mask=all_k)
        tl.store(vc_ptr + slot + D // 2 + half, v2, mask=all_k)

    @triton.jit
    def _attn_split_kernel(
        q_ptr, k_ptr, v_ptr, pos_ptr, acc_ptr, ml_ptr, scale, s_cb, s_ch, s_cs, chunk, H,
        G: tl.constexpr, G_PAD: tl.constexpr, D: tl.constexpr, BLOCK_N: tl.constexpr, PREC: tl.constexpr,
    ):  # fmt: skip
        # program (row b, kv head, split): the G query heads of this kv head over keys [split*chunk, ...) ∩ [0, L)
        b = tl.program_id(0).to(tl.int64)
        kvh = tl.program_id(1)
        sp = tl.program_id(2)
        nsp = tl.num_programs(2)
        length = tl.load(pos_ptr + b) + 1
        start = sp * chunk
        g = tl.arange(0, G_PAD)
        d = tl.arange(0, D)
        heads = kvh * G + g
        q = tl.load(q_ptr + (b * H + heads)[:, None] * D + d[None, :], mask=(g < G)[:, None], other=0.0)
        m = tl.zeros((G_PAD,), tl.float32) - 1.0e30
        l_sum = tl.zeros((G_PAD,), tl.float32)
        acc = tl.zeros((G_PAD, D), tl.float32)
        base = b * s_cb + kvh * s_ch
        n_iter = tl.cdiv(tl.maximum(tl.minimum(chunk, length - start), 0), BLOCK_N)  # 0 past the row's length
        for it in range(0, n_iter):
            n = start + it * BLOCK_N + tl.arange(0, BLOCK_N)
            live = n < length
            k = tl.load(k_ptr + base + n[:, None] * s_cs + d[None, :], mask=live[:, None], other=0.0)
            s = tl.dot(q, tl.trans(k), input_precision=PREC) * scale  # (G_PAD, BLOCK_N)
            s = tl.where(live[None, :], s, float("-inf"))
            m_new = tl.maximum(m, tl.max(s, 1))
            p = tl.exp(s - m_new[:, None])
            corr = tl.exp(m - m_new)
            v = tl.load(v_ptr + base + n[:, None] * s_cs + d[None, :], mask=live[:, None], other=0.0)
            acc = acc * corr[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PREC)
            l_sum = l_sum * corr + tl.sum(p, 1)
            m = m_new
        row = (b * H + heads) * nsp + sp  # (G_PAD,)
        tl.store(acc_ptr + row[:, None] * D + d[None, :], acc, mask=(g < G)[:, None])
        tl.store(ml_ptr + row * 2, m, mask=g < G)
        tl.store(ml_ptr + row * 2 + 1, l_sum, mask=g < G)

    @triton.jit
    def _attn_combine_kernel(acc_ptr, ml_ptr, out_ptr, nsp, NS_PAD: tl.constexpr, D: tl.constexpr):
        bh = tl.program_id(0).to(tl.int64)
        i = tl.arange(0, NS_PAD)
        d = tl.arange(0, D)
        live = i < nsp
        m = tl.load(ml_ptr + (bh * nsp + i) * 2, mask=live, other=-1.0e30)
        w = tl.exp(m - tl.max(m, 0))
        l_sum = tl.sum(tl.load(ml_ptr + (bh * nsp + i) * 2 + 1, mask=live, other=0.0) * w, 0)
        acc = tl.load(acc_ptr + (bh * nsp + i)[:, None] * D + d[None, :], mask=live[:, None], other=0.0)
        out = tl.sum(acc * w[:, None], 0) / l_sum
        tl.store(out_ptr + bh * D + d, out.to(out_ptr.dtype.element_ty))

    @triton.jit
    def _silu_mul_kernel(gu_ptr, out_ptr, inter, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        msk = cols < inter
        dt = out_ptr.dtype.element_ty
        g = tl.load(gu_ptr + row * 2 * inter + cols, mask=msk, other=0.0).to(tl.float32)
        u = tl.load(gu_ptr + row * 2 * inter + inter + cols, mask=msk, other=0.0).to(tl.float32)
        s = (g / (1.0 + tl.exp(-g))).to(dt).to(tl.float32)
        tl.store(out_ptr + row * inter + cols, (s * u).to(dt), mask=msk)
