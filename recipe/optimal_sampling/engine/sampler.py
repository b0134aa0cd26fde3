"""`DualSampler`: a policy and a teacher causal LM decoding in lockstep, each over its own prompt.

Owns batching, padding, the two KV caches, stop handling and the per-token traces. The per-token maths lives in
`step.sample_step`; the maths behind it in `core/`. Knows nothing about tokenizers' text (see `prompts`), verl
or metrics loggers.

This is the reference path (HF forward passes with dynamic caches, left padding, per-row positions); it runs on
CPU and GPU. A faster path may replace `_prefill`/`_decode` without changing `generate`'s contract.
"""

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from .checks import check_max_new_tokens, check_models, check_prompts, check_seed, non_finite_rows, raise_non_finite
from .config import SamplerConfig
from .fast import choose_backend
from .prompts import stop_ids_for
from .step import StepRecord, sample_step

TRACE_FIELDS = ("logp_q", "logp_policy", "logp_teacher", "alpha")
DIAGNOSTIC_FIELDS = ("kl_q_policy", "kl_q_teacher", "ess_policy", "ess_teacher", "entropy_q")
TEACHER_FIELDS = ("logp_teacher", "kl_q_teacher", "ess_teacher")  # the traces that need the teacher's logits


@dataclass
class DualSample:
    """Per sequence lists (one entry per generated token, the stop token included)."""

    token_ids: list[list[int]]
    logp_q: list[list[float]]  # log q*(y_t): the behaviour log-prob
    logp_policy: list[list[float]]  # log pi_theta(y_t), full vocabulary, at the temperature
    logp_teacher: list[list[float]]  # log pi_t(y_t), full vocabulary, at the temperature
    alpha: list[list[float]]  # teacher weight used for y_t (1.0 when forced)
    forced: list[list[bool]]
    support_size: list[list[int]]
    finish_reasons: list[str]  # "stop" | "length"
    diagnostics: dict[str, list[list[float]]] = field(default_factory=dict)  # kl_q_policy, ..., entropy_q
    texts: list[str] | None = None  # filled by `generate_text`

    def flat_traces(self) -> dict[str, list]:
        """Every per-token trace flattened over all sequences (input of `metrics.reduce_metrics`)."""
        names = (*TRACE_FIELDS, "forced", "support_size")
        flat = {name: [x for seq in getattr(self, name) for x in seq] for name in names}
        flat.update({name: [x for seq in values for x in seq] for name, values in self.diagnostics.items()})
        return flat

    def row(self, i: int) -> dict:
        """Sequence i as a JSON-ready dict."""
        out = {name: getattr(self, name)[i] for name in ("token_ids", *TRACE_FIELDS, "forced", "support_size")}
        out.update({name: values[i] for name, values in self.diagnostics.items()})
        out["finish_reason"] = self.finish_reasons[i]
        if self.texts is not None:
            out["text"] = self.texts[i]
        return out


class DualSampler:
    """Samples y_t ~ q*(. | policy context, teacher context) token by token.

    1) pad each model's prompts on the left and prefill its KV cache (last-position logits only);
    2) per step: `sample_step` on both models' logits (alpha, support, forcing, mixing, sampling);
    3) feed the sampled token to both models (finished rows get a pad token and are masked out);
    4) cut each row at its first stop token and return the traces as lists.
    """

    def __init__(
        self,
        policy_model: nn.Module,
        teacher_model: nn.Module,
        config: SamplerConfig | None = None,
        tokenizer=None,
        teacher_tokenizer=None,
        vocab_size: int | None = None,
        backend: str = "auto",
    ):
        """backend: "reference" (this module: HF forwards, dynamic caches; any device), "cuda_graph" (`engine.fast`:
        static caches, fused kernels, CUDA graphs; Qwen3 on CUDA) or "auto" (cuda_graph where it can run).
        With a tokenizer, its EOS id(s) and the teacher tokenizer's join `config.stop_token_ids` (`stop_ids_for`)."""
        check_models(policy_model, teacher_model, config)
        self.policy, self.teacher = policy_model.eval(), teacher_model.eval()
        self.config = config if config is not None else SamplerConfig()
        self.vocab_size = resolve_vocab_size(policy_model, teacher_model, tokenizer, teacher_tokenizer, vocab_size)
        if tokenizer is not None:  # a row ends at the tokenizer's EOS, as generate_text always did
            self.config = self.config.replace(stop_token_ids=stop_ids_for(self.config, tokenizer, teacher_tokenizer))
        self.device = next(policy_model.parameters()).device
        teacher_device = next(teacher_model.parameters()).device
        if teacher_device != self.device:
            raise ValueError(f"policy is on {self.device} but teacher on {teacher_device}: put both on one device")
        self.backend, self.backend_reason = choose_backend(backend, self.device, policy_model, teacher_model)
        self._fast: list = []  # [FastDualEngine] once built; a list so that `_with_config` clones share it

    @torch.no_grad()
    def generate(
        self,
        policy_prompt_ids: list[list[int]],
        teacher_prompt_ids: list[list[int]],
        max_new_tokens: int,
        seed: int | None = None,
    ) -> DualSample:
        """Batched lockstep decode. Row i continues policy_prompt_ids[i] for the policy and teacher_prompt_ids[i]
        for the teacher with the same sampled tokens. Same seed and inputs -> same output."""
        self._check_prompts(policy_prompt_ids, teacher_prompt_ids, max_new_tokens, seed)
        if self.backend == "cuda_graph":
            return self._fast_engine().generate(
                policy_prompt_ids,
                teacher_prompt_ids,
                max_new_tokens,
                torch.seed() % 2**62 if seed is None else seed,
                self.config,
            )
        generator = torch.Generator(self.device).manual_seed(torch.seed() if seed is None else seed)
        stop_ids = torch.tensor(self.config.stop_token_ids, dtype=torch.long, device=self.device)
        # 1) prefill both caches
        policy_state = _prefill(self.policy, policy_prompt_ids, self.device)
        teacher_state = _prefill(self.teacher, teacher_prompt_ids, self.device)
        B = len(policy_prompt_ids)
        finished = torch.zeros(B, dtype=torch.bool, device=self.device)  # (B,)
        records: list[StepRecord] = []
        for step in range(max_new_tokens):
            # 2) one token from q*
            logits_p, logits_t = policy_state.logits[:, : self.vocab_size], teacher_state.logits[:, : self.vocab_size]
            bad = [non_finite_rows(logits_p), non_finite_rows(logits_t)]  # (B,), (B,)
            record = sample_step(logits_p, logits_t, step, self.config, generator)
            record.token = torch.where(finished, torch.zeros_like(record.token), record.token)  # (B,)
            records.append(record)
            finished = finished | torch.isin(record.token, stop_ids)  # (B,)
            # the reference path syncs once per step: the stop test and the non-finite guard in one read
            done, *flags = torch.stack([finished.all(), bad[0].any(), bad[1].any()]).tolist()
            raise_non_finite(flags, bad, step)
            if step + 1 == max_new_tokens or done:
                break
            # 3) both models read the token; finished rows are fed a pad token that their mask hides
            _decode(self.policy, policy_state, record.token, ~finished)
            _decode(self.teacher, teacher_state, record.token, ~finished)
        # 4) cut at stop tokens and convert to lists
        return _assemble(records, self.config.stop_token_ids)

    @torch.no_grad()
    def generate_policy_only(
        self, policy_prompt_ids: list[list[int]], max_new_tokens: int, seed: int | None = None, temperature=None
    ) -> DualSample:
        """Sample from pi_theta alone; the teacher is not run and its traces are NaN (`policy_only`).
        temperature: None = the config's; 0 = greedy (the argmax; log q* = 0, a point mass)."""
        from .policy_only import generate_policy_only, policy_only_config

        self._check_prompts(policy_prompt_ids, None, max_new_tokens, seed)
        if not policy_prompt_ids:
            raise ValueError("no prompts given: policy_prompt_ids is empty")
        temperature = self.config.temperature if temperature is None else temperature
        if isinstance(temperature, bool) or not isinstance(temperature, int | float) or not temperature >= 0:
            raise ValueError(f"temperature must be a number >= 0 (0 = greedy), got {temperature!r}")
        seed = torch.seed() % 2**62 if seed is None else seed
        if self.backend == "cuda_graph":
            config = policy_only_config(temperature, self.config.stop_token_ids)
            mode = "policy" if temperature > 0 else "greedy"
            return self._fast_engine().generate(policy_prompt_ids, None, max_new_tokens, seed, config, mode=mode)
        return generate_policy_only(
            self.policy,
            self.vocab_size,
            policy_prompt_ids,
            max_new_tokens,
            seed,
            self.config.stop_token_ids,
            temperature,
        )

    def continuous(self, slots: int, slot_len: int, check_every: int = 4):
        """A `ContinuousBatcher` (`engine.fast.scheduler`) on this sampler's fast engine: requests stream into
        `slots` fixed rows of `slot_len` tokens (prompt + response). Needs models the fast path implements; runs
        CUDA graphs on CUDA and the kernels' torch twins elsewhere (slow: tests)."""
        from .fast.scheduler import ContinuousBatcher

        return ContinuousBatcher(self._fast_engine(), slots, slot_len, check_every)

    def sleep(self) -> int:
        """Free the fast engine's KV caches, buffers and graphs (the models stay); returns the bytes freed."""
        return self._fast[0].sleep() if self._fast else 0

    def wake(self) -> None:
        """Take back what `sleep` freed (graphs are re-captured on first use)."""
        if self._fast:
            self._fast[0].wake()

    def _fast_engine(self):
        if not self._fast:
            from .fast.engine import FastDualEngine

            self._fast.append(FastDualEngine(self.policy, self.teacher, self.vocab_size))
        return self._fast[0]

    def generate_text(self, prompts: list[str], tokenizer, max_new_tokens: int, seed: int | None = None, **templates):
        """Text in, text out: the policy sees `policy_template` with "{prompt}" filled in, the teacher its chat
        template.
        Stops on `config.stop_token_ids` plus the tokenizers' EOS ids. `templates`: policy_template,
        teacher_chat_template, system_prompt, teacher_tokenizer (see `prompts.build_dual_prompts`)."""
        from .prompts import build_dual_prompts

        if not isinstance(prompts, list | tuple) or not prompts:
            raise ValueError(f"prompts must be a non-empty list of strings, got {prompts!r:.80}")
        if tokenizer is None or not callable(getattr(tokenizer, "encode", None)):
            raise ValueError(
                f"tokenizer must be a Hugging Face tokenizer (with .encode), got {type(tokenizer).__name__}"
            )
        teacher_tokenizer = templates.get("teacher_tokenizer") or tokenizer
        policy_ids, teacher_ids = build_dual_prompts(prompts, tokenizer, **templates)
        config = self.config.replace(stop_token_ids=stop_ids_for(self.config, tokenizer, teacher_tokenizer))
        sampler = self if config == self.config else _with_config(self, config)
        out = sampler.generate(policy_ids, teacher_ids, max_new_tokens, seed)
        out.texts = tokenizer.batch_decode(out.token_ids, skip_special_tokens=True)
        return out

    def _check_prompts(self, policy_prompt_ids, teacher_prompt_ids, max_new_tokens, seed=None):
        """One-line ValueErrors for bad prompts, lengths, seeds; teacher_prompt_ids None = policy-only."""
        check_max_new_tokens(max_new_tokens)
        check_seed(seed)
        check_prompts(policy_prompt_ids, "policy_prompt_ids", self.vocab_size, self.policy, max_new_tokens)
        if teacher_prompt_ids is None:
            return
        check_prompts(teacher_prompt_ids, "teacher_prompt_ids", self.vocab_size, self.teacher, max_new_tokens)
        if len(policy_prompt_ids) != len(teacher_prompt_ids):
            raise ValueError(
                f"policy_prompt_ids has {len(policy_prompt_ids)} prompts but teacher_prompt_ids has "
                f"{len(teacher_prompt_ids)}: pass one policy prompt and one teacher prompt per sequence"
            )
        if not policy_prompt_ids:
            raise ValueError("no prompts given: policy_prompt_ids and teacher_prompt_ids are empty")


def _with_config(sampler: DualSampler, config: SamplerConfig) -> DualSampler:
    clone = object.__new__(DualSampler)
    clone.__dict__.update(sampler.__dict__, config=config)
    return clone


def resolve_vocab_size(policy_model, teacher_model, tokenizer=None, teacher_tokenizer=None, vocab_size=None) -> int:
    """The shared vocabulary size V: both models' logits are cut to their first V rows.
    Padded embedding tables (e.g. 152,064 vs 151,936 rows) are fine when a tokenizer (or `vocab_size`) says how
    many rows are real; different tokenizers, or a model smaller than the tokenizer, are errors."""
    rows_p, rows_t = _output_rows(policy_model), _output_rows(teacher_model)
    if tokenizer is not None and teacher_tokenizer is not None:
        check_shared_vocabulary(tokenizer, teacher_tokenizer)
    if vocab_size is None and tokenizer is not None:
        vocab_size = len(tokenizer)
    if vocab_size is None:
        if rows_p != rows_t:
            raise ValueError(
                f"the policy has {rows_p} output rows and the teacher {rows_t}: pass tokenizer= (or vocab_size=) so "
                "that padded rows can be cut to the shared tokenizer size"
            )
        return rows_p
    if vocab_size > min(rows_p, rows_t):
        raise ValueError(
            f"the tokenizer has {vocab_size} tokens but the policy has {rows_p} output rows and the teacher {rows_t}: "
            "the models do not cover this tokenizer's vocabulary (wrong checkpoint or tokenizer?)"
        )
    return vocab_size


def check_shared_vocabulary(tokenizer, teacher_tokenizer) -> None:
    """Raise unless the two tokenizers map the same strings to the same ids (cheap: call before loading weights)."""
    if tokenizer.get_vocab() != teacher_tokenizer.get_vocab():
        raise ValueError(
            f"the policy and teacher tokenizers have different vocabularies ({len(tokenizer)} vs "
            f"{len(teacher_tokenizer)} tokens, or the same size with other ids): q* mixes two distributions over "
            "one vocabulary, so use a teacher from the same tokenizer family as the policy"
        )


def _output_rows(model: nn.Module) -> int:
    head = model.get_output_embeddings()
    return int(head.weight.shape[0]) if head is not None else int(model.config.vocab_size)


@dataclass
class _ModelState:
    """One model's decode state: cache, attention mask, next positions and the latest next-token logits."""

    cache: object
    attention_mask: Tensor  # (B, L) 1 = real token
    next_position: Tensor  # (B,) position id of the next token
    logits: Tensor  # (B, V_rows) float32 next-token logits


def _prefill(model: nn.Module, prompts: list[list[int]], device: torch.device) -> _ModelState:
    """Left-pad, run the prompt once, keep the cache and the last position's logits only."""
    L = max(len(p) for p in prompts)
    ids = torch.zeros(len(prompts), L, dtype=torch.long, device=device)  # (B, L)
    mask = torch.zeros_like(ids)  # (B, L)
    for i, p in enumerate(prompts):
        ids[i, L - len(p) :] = torch.tensor(p, dtype=torch.long, device=device)
        mask[i, L - len(p) :] = 1
    positions = (mask.cumsum(-1) - 1).clamp_min(0)  # (B, L) per-row positions, 0 on the padding
    out = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True, logits_to_keep=1)
    return _ModelState(out.past_key_values, mask, mask.sum(-1), out.logits[:, -1].float())


def _decode(model: nn.Module, state: _ModelState, token: Tensor, active: Tensor) -> None:
    """Feed one token per row; rows that are no longer active are masked out of attention."""
    state.attention_mask = torch.cat([state.attention_mask, active.long().unsqueeze(-1)], dim=-1)  # (B, L + 1)
    out = model(
        input_ids=token.unsqueeze(-1),  # (B, 1)
        attention_mask=state.attention_mask,
        position_ids=state.next_position.unsqueeze(-1),  # (B, 1)
        past_key_values=state.cache,
        use_cache=True,
    )
    state.cache, state.logits = out.past_key_values, out.logits[:, -1].float()
    state.next_position = state.next_position + 1


def _assemble(records: list[StepRecord], stop_token_ids: tuple[int, ...]) -> DualSample:
    """Stack the per-step records (T of them) and cut each row after its first stop token."""
    stacked = {
        name: torch.stack([getattr(r, name) for r in records], dim=1).tolist()
        for name in ("token", *TRACE_FIELDS, "forced", "support_size")
    }  # each (B, T)
    diag = {name: torch.stack([r.diagnostics[name] for r in records], dim=1).tolist() for name in DIAGNOSTIC_FIELDS}
    stop = set(stop_token_ids)
    lengths, reasons = [], []
    for row in stacked["token"]:
        end = next((t + 1 for t, tok in enumerate(row) if tok in stop), None)
        lengths.append(len(row) if end is None else end)
        reasons.append("length" if end is None else "stop")
    cut = lambda rows: [r[:n] for r, n in zip(rows, lengths, strict=True)]  # noqa: E731
    return DualSample(
        token_ids=cut(stacked["token"]),
        **{name: cut(stacked[name]) for name in (*TRACE_FIELDS, "forced", "support_size")},
        finish_reasons=reasons,
        diagnostics={name: cut(values) for name, values in diag.items()},
    )
