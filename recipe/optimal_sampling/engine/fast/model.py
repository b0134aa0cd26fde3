"""`StaticQwen3`: a Qwen3 forward for decoding, reading an HF `Qwen3ForCausalLM`'s weights, over a static KV cache.

Owns the cache (one bf16 tensor per K and V: (layers, max_batch, kv_heads, max_seq, head_dim)), chunked prefill
(last-position logits only) and the one-token decode step (every op a fixed-shape kernel, so it can be captured
in a CUDA graph). Rows are left-aligned in the cache: row b's token at position p lives in slot p, so prompts of
different lengths decode together and each row attends to its own slots [0, pos[b]].
Knows nothing about sampling, tokenizers or graphs.

Weights are the HF module's own tensors. q/k/v and gate/up are re-laid out once into one matrix each, and the
HF parameters become views into it (same values, same Parameter objects, no extra memory): HF's forward keeps
working and an in-place weight update (`param.data.copy_`, `load_state_dict`) reaches this model too. Replacing
a Parameter object does not: call `refresh_weights()` after that.
"""

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import kernels as K

PREFILL_TOKENS = 8192  # rows x tokens per prefill chunk: bounds the activations of one chunk


def unsupported_reason(model) -> str | None:
    """Why `StaticQwen3` cannot run this model (an HF model or its config; None when it can)."""
    cfg = getattr(model, "config", model)
    if getattr(cfg, "model_type", None) != "qwen3":
        return f"model_type is {getattr(cfg, 'model_type', None)!r}, the fast path implements 'qwen3'"
    if getattr(cfg, "attention_bias", False):
        return "attention_bias=True is not implemented by the fast path"
    if getattr(cfg, "use_sliding_window", False):
        return "sliding-window attention is not implemented by the fast path"
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    if head_dim < 16 or head_dim & (head_dim - 1):
        return f"head_dim={head_dim}: the fast path needs a power of two >= 16"
    if getattr(cfg, "hidden_act", "silu") != "silu":
        return f"hidden_act={cfg.hidden_act!r}: the fast path implements 'silu'"
    return None


def _fused_rows(linears: list[nn.Linear]) -> Tensor:
    """One (sum of out_features, in_features) matrix whose row blocks are the given layers' weights; each layer's
    weight becomes a view into it. Already fused layers (consecutive views of one buffer) are reused as they are."""
    ws = [m.weight for m in linears]
    n_out, n_in = sum(w.shape[0] for w in ws), ws[0].shape[1]
    first = ws[0]
    consecutive = all(
        w.is_contiguous() and w.untyped_storage().data_ptr() == first.untyped_storage().data_ptr() for w in ws
    ) and all(b.storage_offset() == a.storage_offset() + a.numel() for a, b in zip(ws, ws[1:], strict=False))
    if consecutive:
        return first.detach().new_empty(0).set_(first.untyped_storage(), first.storage_offset(), (n_out, n_in))
    fused = torch.cat([w.detach() for w in ws], dim=0)  # (n_out, n_in)
    row = 0
    for m in linears:
        n = m.weight.shape[0]
        m.weight.data = fused[row : row + n]
        row += n
    return fused


class StaticQwen3:
    """Decode-time view of one HF Qwen3 model: `allocate` the cache, `prefill` prompts, `decode` one token per row."""

    def __init__(self, model: nn.Module, vocab_size: int, use_triton: bool):
        reason = unsupported_reason(model)
        if reason is not None:
            raise ValueError(f"the fast decode path cannot run this model: {reason}; use backend='reference'")
        cfg = model.config
        self.model, self.vocab_size, self.use_triton = model, vocab_size, use_triton
        self.n_heads, self.n_kv = cfg.num_attention_heads, cfg.num_key_value_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        self.eps = cfg.rms_norm_eps
        self.dtype = model.get_input_embeddings().weight.dtype
        rotary = model.model.rotary_emb
        self.inv_freq = rotary.inv_freq.detach().float().contiguous()  # (D/2,) the model's rope_theta / scaling
        self.rope_scale = float(getattr(rotary, "attention_scaling", 1.0))
        self.k_cache: Tensor | None = None
        self.v_cache: Tensor | None = None
        self.refresh_weights()

    def refresh_weights(self) -> None:
        """(Re)collect the weight tensors; needed only after Parameter objects were replaced."""
        body = self.model.model
        self.embed = body.embed_tokens.weight.detach()  # (V_rows, C)
        self.final_norm = body.norm.weight.detach()  # (C,)
        self.head = self.model.get_output_embeddings().weight.detach()[: self.vocab_size]  # (V, C)
        self.layers = []
        for layer in body.layers:
            attn, mlp = layer.self_attn, layer.mlp
            self.layers.append(
                {
                    "ln1": layer.input_layernorm.weight.detach(),
                    "qkv": _fused_rows([attn.q_proj, attn.k_proj, attn.v_proj]),  # ((H + 2 KVH) D, C)
                    "q_norm": attn.q_norm.weight.detach(),
                    "k_norm": attn.k_norm.weight.detach(),
                    "o": attn.o_proj.weight.detach(),  # (C, H D)
                    "ln2": layer.post_attention_layernorm.weight.detach(),
                    "gate_up": _fused_rows([mlp.gate_proj, mlp.up_proj]),  # (2 I, C)
                    "down": mlp.down_proj.weight.detach(),  # (C, I)
                }
            )

    # ------------------------------------------------------------------------------------------------ cache
    def cache_bytes(self, batch: int, seq: int) -> int:
        """Bytes of K and V caches for `batch` rows of `seq` slots."""
        return 2 * len(self.layers) * batch * self.n_kv * seq * self.head_dim * self.embed.element_size()

    def allocate(self, batch: int, seq: int, storage: Tensor | None = None) -> None:
        """(Re)allocate the caches for (batch, seq); the old ones are freed first. storage: zeroed uint8 memory of
        at least cache_bytes(batch, seq) to carve them from (e.g. a `vmm.SleepableBuffer`), else torch allocates."""
        self.k_cache = self.v_cache = None
        shape = (len(self.layers), batch, self.n_kv, seq, self.head_dim)
        if storage is None:
            self.k_cache = torch.zeros(shape, dtype=self.dtype, device=self.embed.device)  # (L, B, KVH, S, D)
            self.v_cache = torch.zeros(shape, dtype=self.dtype, device=self.embed.device)  # (L, B, KVH, S, D)
            return
        n = self.cache_bytes(batch, seq) // 2
        assert storage.dtype == torch.uint8 and storage.numel() >= 2 * n, f"{storage.shape=} {n=}"
        self.k_cache = storage[:n].view(self.dtype).view(shape)
        self.v_cache = storage[n : 2 * n].view(self.dtype).view(shape)

    # ---------------------------------------------------------------------------------------------- forward
    def _layers(self, x: Tensor, rows: Tensor, pos: Tensor, attend) -> Tensor:
        """The transformer body on N tokens. x: (N, C) embeddings; rows, pos: (N,) cache row and slot of each
        token; attend(i, q) -> (N, H D) attention of layer i. Returns (N, C) final-normed hidden states."""
        h, res = x, None
        for i, w in enumerate(self.layers):
            # 1) attention block
            h, res = K.add_rms_norm(h, res, w["ln1"], self.eps, self.use_triton)
            qkv = F.linear(h, w["qkv"])  # (N, (H + 2 KVH) D)
            q = K.qk_norm_rope_store(
                qkv,
                w["q_norm"],
                w["k_norm"],
                self.inv_freq,
                self.rope_scale,
                self.eps,
                rows,
                pos,
                self.k_cache[i],
                self.v_cache[i],
                self.n_heads,
                self.use_triton,
            )  # fmt: skip  (N, H, D)
            h = F.linear(attend(i, q), w["o"])  # (N, C)
            # 2) MLP block
            h, res = K.add_rms_norm(h, res, w["ln2"], self.eps, self.use_triton)
            h = F.linear(K.silu_mul(F.linear(h, w["gate_up"]), self.use_triton), w["down"])  # (N, C)
        h, _ = K.add_rms_norm(h, res, self.final_norm, self.eps, self.use_triton)
        return h

    @torch.no_grad()
    def decode(self, tokens: Tensor, pos: Tensor, out: Tensor) -> None:
        """One token per row: tokens (B,) int64 go to cache slots pos (B,) of rows 0..B-1; writes next-token logits
        into out (B, V) (the model dtype). Fixed shapes, no host sync: safe to capture in a CUDA graph."""
        B = tokens.shape[0]
        rows = torch.arange(B, device=tokens.device)  # (B,)
        x = F.embedding(tokens, self.embed)  # (B, C)
        attend = lambda i, q: K.decode_attention(q, self.k_cache[i], self.v_cache[i], pos, self.use_triton)  # noqa: E731
        h = self._layers(x, rows, pos, attend)  # (B, C)
        torch.mm(h, self.head.t(), out=out)

    @torch.no_grad()
    def prefill(self, prompts: list[list[int]], out: Tensor, rows: list[int] | None = None) -> Tensor:
        """Run each prompt into its cache row (rows[b]; default rows 0..len(prompts)-1), slots 0..len-1, in chunks
        of rows x tokens, and write the last prompt position's logits into out[b] (out: (B, V), the model dtype).
        Returns lengths (B,) int64 (the next slot)."""
        dev = self.embed.device
        lengths = torch.tensor([len(p) for p in prompts], dtype=torch.long, device=dev)  # (B,)
        longest = max(len(p) for p in prompts)
        ids = torch.zeros(len(prompts), longest, dtype=torch.long, device=dev)  # (B, L) right-padded
        for b, p in enumerate(prompts):
            ids[b, : len(p)] = torch.tensor(p, dtype=torch.long, device=dev)
        tok_chunk = min(longest, max(64, PREFILL_TOKENS // len(prompts)))
        row_chunk = max(1, PREFILL_TOKENS // tok_chunk)
        for r0 in range(0, len(prompts), row_chunk):
            r1 = min(len(prompts), r0 + row_chunk)
            sel = slice(r0, r1) if rows is None else torch.tensor(rows[r0:r1], dtype=torch.long, device=dev)
            last = torch.zeros(r1 - r0, self.embed.shape[1], dtype=self.dtype, device=dev)  # (R, C)
            for t0 in range(0, max(len(p) for p in prompts[r0:r1]), tok_chunk):
                t1 = min(longest, t0 + tok_chunk)
                h = self._prefill_chunk(ids[r0:r1, t0:t1], sel, t0)  # (R, T, C)
                idx = (lengths[r0:r1] - 1 - t0).clamp(0, t1 - t0 - 1)  # (R,)
                here = (lengths[r0:r1] - 1 >= t0) & (lengths[r0:r1] - 1 < t1)  # (R,)
                last = torch.where(here[:, None], h[torch.arange(r1 - r0, device=dev), idx], last)
            torch.mm(last, self.head.t(), out=out[r0:r1])
        return lengths

    def copy_rows(self, src: list[int], dst: list[int], length: list[int]) -> None:
        """Copy cache slots [0, length[i]) of row src[i] into row dst[i] (a shared prompt's prefill, reused)."""
        for s, d, n in zip(src, dst, length, strict=True):
            self.k_cache[:, d, :, :n] = self.k_cache[:, s, :, :n]  # (L, KVH, n, D)
            self.v_cache[:, d, :, :n] = self.v_cache[:, s, :, :n]

    def _prefill_chunk(self, ids: Tensor, sel: slice | Tensor, t0: int) -> Tensor:
        """Tokens ids (R, T) at slots t0..t0+T-1 of cache rows sel (a slice or (R,) row indices), causal over slots
        [0, t0 + T)."""
        R, T = ids.shape
        dev = ids.device
        row_ids = torch.arange(sel.start, sel.stop, device=dev) if isinstance(sel, slice) else sel  # (R,)
        rows = row_ids.repeat_interleave(T)  # (R T,)
        pos = (t0 + torch.arange(T, device=dev)).repeat(R)  # (R T,)
        causal = torch.ones(T, t0 + T, dtype=torch.bool, device=dev).tril(diagonal=t0)  # (T, t0 + T)
        G = self.n_heads // self.n_kv

        def attend(i: int, q: Tensor) -> Tensor:
            keys = self.k_cache[i, sel, :, : t0 + T].repeat_interleave(G, dim=1)  # (R, H, t0 + T, D)
            vals = self.v_cache[i, sel, :, : t0 + T].repeat_interleave(G, dim=1)  # (R, H, t0 + T, D)
            q = q.view(R, T, self.n_heads, self.head_dim).transpose(1, 2)  # (R, H, T, D)
            out = F.scaled_dot_product_attention(q, keys, vals, attn_mask=causal)  # (R, H, T, D)
            return out.transpose(1, 2).reshape(R * T, self.n_heads * self.head_dim)

        h = self._layers(F.embedding(ids.reshape(-1), self.embed), rows, pos, attend)  # (R T, C)
        return h.view(R, T, -1)
