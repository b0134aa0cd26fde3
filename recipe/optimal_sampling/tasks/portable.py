"""Portable training arithmetic for the task models: the same seed gives the same weights on any machine.

Owns `PortableQwen3` (the forward pass of transformers' `Qwen3ForCausalLM`, written out in float64 over parameters
named like the HF state dict), its seeded initialisation, `snap_` (rounding to a coarse float grid) and the
conversion to a float32 HF model. Knows nothing about the addition task, the cache or the sampler.

Why: tiny models learn addition in sudden jumps, so a last-bit difference in one matmul (another CPU's SIMD width,
another torch or transformers version, another thread count) grows into another model within a few hundred steps.
Three measures remove every source of such differences:
1. initial weights come from NumPy's PCG64 (`default_rng(seed)`), whose normals are the same on every platform,
   not from torch's generator paths (which differ by CPU features) nor from transformers' `_init_weights`;
2. the forward and backward run in float64 with no float32 islands (transformers' Qwen3 computes RMSNorm,
   rotary tables and the attention softmax in float32), so machine-to-machine differences stay ~1e-16 relative;
3. after every optimizer step the parameters are rounded to PARAM_BITS mantissa bits and AdamW's moments to
   STATE_BITS (`snap_`): a 1e-16 difference moves a value to another grid point only when it lies within 1e-16 of
   a rounding midpoint (odds ~1e-10 per value and step), so both machines hold bit-identical state after every step.
PARAM_BITS = 20 keeps a resolution of ~1e-6 relative, far below the smallest AdamW update (lr_min ~ 5e-4).
"""

import hashlib

import numpy as np
import torch
from torch import Tensor, nn
from transformers import Qwen3Config, Qwen3ForCausalLM

PARAM_BITS = 20  # mantissa bits kept in the parameters after every step (float32 has 24)
STATE_BITS = 16  # mantissa bits kept in AdamW's moments
INIT_STD = 0.02  # transformers' default initializer_range
MASK_VALUE = -1e30  # finite, so that a fully masked (left-pad) query row gives a uniform row, not NaN


def snap_(t: Tensor, bits: int) -> Tensor:
    """Round `t` in place to `bits` mantissa bits, half to even: x = m · 2^e, m in [0.5, 1) -> round(m · 2^bits)."""
    mantissa, exponent = torch.frexp(t)
    return t.copy_(torch.ldexp(torch.round(mantissa * 2.0**bits) / 2.0**bits, exponent))


def hf_parameter_shapes(config: Qwen3Config) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every trainable parameter of `Qwen3ForCausalLM(config)` (tied weights listed once)."""
    with torch.device("meta"):
        model = Qwen3ForCausalLM(config)
    return {name: tuple(p.shape) for name, p in model.named_parameters()}


def rope_theta(config: Qwen3Config) -> float:
    """The rotary base, wherever this transformers version keeps it."""
    params = getattr(config, "rope_parameters", None) or {}
    return float(params.get("rope_theta", getattr(config, "rope_theta", 10000.0)))


def _rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    return weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


def _rotate_half(x: Tensor) -> Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class PortableQwen3(nn.Module):
    """`Qwen3ForCausalLM`'s forward in float64 (eager attention, tied or untied head), for training only.

    Called like the HF model (`input_ids`, `attention_mask`, `position_ids`, `labels`, `logits_to_keep`) and returns
    an object with `.logits` (B, T', V) and `.loss` (mean next-token cross entropy over labels != -100, as HF)."""

    def __init__(self, config: Qwen3Config, seed: int):
        super().__init__()
        assert config.hidden_act == "silu" and not config.attention_bias, f"unsupported: {config}"
        self.config = config
        rng = np.random.default_rng(seed)
        shapes = hf_parameter_shapes(config)
        self.names = sorted(shapes)  # drawn in name order, whatever order a transformers version registers modules
        tensors = []
        for name in self.names:
            shape = shapes[name]
            if name.endswith("norm.weight"):
                tensors.append(torch.ones(shape, dtype=torch.float64))
            else:
                tensors.append(snap_(torch.from_numpy(rng.standard_normal(shape) * INIT_STD), PARAM_BITS))
        self.params = nn.ParameterList([nn.Parameter(t) for t in tensors])

    def p(self, name: str) -> Tensor:
        return self.params[self.names.index(name)]

    def forward(self, input_ids, attention_mask=None, position_ids=None, labels=None, logits_to_keep=0):
        cfg, (B, T) = self.config, input_ids.shape
        device = input_ids.device
        mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask  # (B, T)
        if position_ids is None:
            position_ids = torch.arange(T, device=device).expand(B, T)  # (B, T)
        causal = torch.tril(torch.ones(T, T, dtype=torch.bool, device=device))  # (T, T)
        allowed = causal & mask.bool()[:, None, None, :]  # (B, 1, T, T)
        cos, sin = self._rotary(position_ids)  # (B, 1, T, D) each
        h = self.p("model.embed_tokens.weight")[input_ids]  # (B, T, H)
        for i in range(cfg.num_hidden_layers):
            h = h + self._attention(i, self._norm(f"model.layers.{i}.input_layernorm", h), cos, sin, allowed)
            h = h + self._mlp(i, self._norm(f"model.layers.{i}.post_attention_layernorm", h))
        h = self._norm("model.norm", h)
        head = self.p("model.embed_tokens.weight" if cfg.tie_word_embeddings else "lm_head.weight")
        logits = h[:, -logits_to_keep:] @ head.T  # (B, T', V)
        loss = None
        if labels is not None:
            loss = nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100)
        return _Output(logits, loss)

    def _norm(self, name: str, x: Tensor) -> Tensor:
        return _rms_norm(x, self.p(f"{name}.weight"), self.config.rms_norm_eps)

    def _rotary(self, position_ids: Tensor) -> tuple[Tensor, Tensor]:
        D = self.config.head_dim
        exponents = torch.arange(0, D, 2, dtype=torch.float64, device=position_ids.device) / D  # (D/2,)
        inv_freq = 1.0 / rope_theta(self.config) ** exponents  # (D/2,)
        freqs = position_ids[..., None].double() * inv_freq  # (B, T, D/2)
        emb = torch.cat((freqs, freqs), dim=-1)[:, None]  # (B, 1, T, D)
        return emb.cos(), emb.sin()

    def _attention(self, i: int, x: Tensor, cos: Tensor, sin: Tensor, allowed: Tensor) -> Tensor:
        cfg, pre, (B, T, _) = self.config, f"model.layers.{i}.self_attn.", x.shape
        D, n_kv = cfg.head_dim, cfg.num_key_value_heads

        def heads(name: str, n: int) -> Tensor:
            return (x @ self.p(pre + f"{name}_proj.weight").T).view(B, T, n, D)  # (B, T, n, D)

        q = self._norm(pre + "q_norm", heads("q", cfg.num_attention_heads))  # (B, T, H, D)
        k = self._norm(pre + "k_norm", heads("k", n_kv))  # (B, T, n_kv, D)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), heads("v", n_kv).transpose(1, 2)  # (B, n, T, D)
        q, k = q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin
        groups = cfg.num_attention_heads // n_kv
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)  # (B, H, T, D)
        scores = (q @ k.transpose(2, 3)) * D**-0.5  # (B, H, T, T)
        weights = scores.masked_fill(~allowed, MASK_VALUE).softmax(dim=-1)  # (B, H, T, T)
        out = (weights @ v).transpose(1, 2).reshape(B, T, -1)  # (B, T, H * D)
        return out @ self.p(pre + "o_proj.weight").T  # (B, T, hidden)

    def _mlp(self, i: int, x: Tensor) -> Tensor:
        pre = f"model.layers.{i}.mlp."
        gate, up = x @ self.p(pre + "gate_proj.weight").T, x @ self.p(pre + "up_proj.weight").T
        return (nn.functional.silu(gate) * up) @ self.p(pre + "down_proj.weight").T

    @torch.no_grad()
    def snap_(self, optimizer: torch.optim.Optimizer) -> None:
        """Round the parameters to PARAM_BITS and the optimizer's float moments to STATE_BITS (see the module doc)."""
        for param in self.params:
            snap_(param, PARAM_BITS)
            for value in optimizer.state.get(param, {}).values():
                if torch.is_tensor(value) and value.is_floating_point() and value.dim() > 0:
                    snap_(value, STATE_BITS)

    def state_copy(self) -> list[Tensor]:
        return [p.detach().clone() for p in self.params]

    @torch.no_grad()
    def load_copy(self, state: list[Tensor]) -> None:
        for param, value in zip(self.params, state, strict=True):
            param.copy_(value)

    def to_hf(self) -> Qwen3ForCausalLM:
        """A float32 `Qwen3ForCausalLM` holding these weights (exact: PARAM_BITS < 24), in eval mode."""
        model = Qwen3ForCausalLM(self.config)
        named = dict(model.named_parameters())
        with torch.no_grad():
            for name, param in zip(self.names, self.params, strict=True):
                named[name].copy_(param.float().cpu())
        return model.eval()


class _Output:
    def __init__(self, logits: Tensor, loss: Tensor | None):
        self.logits, self.loss = logits, loss


def weights_sha256(model: torch.nn.Module) -> str:
    """sha256 over the float32 weights in name order: equal on two machines exactly when training was portable."""
    digest = hashlib.sha256()
    for name, value in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(value.detach().float().contiguous().numpy().tobytes())
    return digest.hexdigest()
