"""`FastDualEngine`: the GPU path behind `DualSampler.generate` (backend "cuda_graph").

Owns the static state of a decode (both models' KV caches, logits buffers, per-row positions, finished flags,
step counter, seed, and trace buffers of (fields, max_batch, max_steps)), batch-size buckets, and one CUDA graph
per (bucket, sampler config) that holds a whole token step:
  1) fused q* step on both models' logits (support, alpha, mixing, exponential-race sampling, record: core.fused)
  2) bookkeeping: finished rows get token 0, the record goes to column `step` of the trace buffers, rows that
     sampled a stop token are marked finished
  3) both models decode the token (StaticQwen3.decode), writing the next logits in place; positions and step += 1
The host replays the graph and looks at "all finished" only every `check_every` steps; the traces come back to
the host once, at the end. The policy-only modes (the teacher not run) have their own graphs: "policy" samples from
q* = pi_theta (step 1 reads the policy's logits in both slots, alpha fixed at 0) and "greedy" takes the argmax
instead (log q* = 0, a point mass); step 3 decodes the policy alone. Knows nothing about tokenizers, verl or how
prompts were built.
"""

import math
import time

import torch
from torch import Tensor, nn

from ...core.fused import RECORD_FIELDS, fused_available, fused_sample
from ..checks import FIX_DTYPE
from ..config import SamplerConfig
from ..sampler import DIAGNOSTIC_FIELDS, TEACHER_FIELDS, TRACE_FIELDS, DualSample
from ..step import sample_step
from .model import StaticQwen3
from .vmm import SleepableBuffer, unavailable_reason

BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
MODES = ("dual", "policy", "greedy")  # both models / the policy alone, sampled / the policy alone, argmax
SEQ_ROUND, STEP_ROUND = 64, 128  # capacities grow in these steps, so that nearby requests reuse the graphs
_ROW = {name: i for i, name in enumerate(RECORD_FIELDS)}


def reference_record(logits: list[Tensor], config: SamplerConfig, step, generator) -> tuple[Tensor, Tensor]:
    """Without Triton (CPU): `sample_step` on materialised log-probs, packed like the fused record.
    logits: [policy, teacher] (B, V) each. Returns token (B,) and record (F, B) float32."""
    rec = sample_step(logits[0], logits[1], step, config, generator)
    nan = [lg.isnan().any(-1).float() for lg in logits]  # (B,) each
    rows = [rec.logp_q, rec.logp_policy, rec.logp_teacher, rec.alpha, rec.forced.float(), rec.support_size.float()]
    rows += [rec.diagnostics[name] for name in DIAGNOSTIC_FIELDS] + nan
    return rec.token, torch.stack(rows).float()  # (B,), (F, B)


def fused_config_sample(
    logits: list[Tensor], step: Tensor, seed: Tensor, config: SamplerConfig, diagnostics: bool
) -> tuple[Tensor, Tensor]:
    """`fused_sample` of (policy, teacher) logits under `config`'s sampler settings: token (B,), record (F, B)."""
    return fused_sample(
        logits[0],
        logits[1],
        step,
        seed,
        temperature=config.temperature,
        top_p=config.teacher_top_p,
        alpha_method=config.alpha_method,
        fixed_alpha=config.fixed_alpha,
        force_teacher_tokens=config.force_teacher_tokens,
        diagnostics=diagnostics,
    )


def greedy_record(logits_policy: Tensor, record: Tensor) -> Tensor:
    """The argmax instead of the draw: a point mass (log q* = 0, support 1). Rewrites record (F, B) in place and
    returns the argmax tokens (B,)."""
    token = logits_policy.argmax(-1)  # (B,)
    record[_ROW["logp_policy"]] = logits_policy.float().log_softmax(-1).gather(-1, token[:, None])[:, 0]
    record[_ROW["logp_q"]] = 0.0
    record[_ROW["support_size"]] = 1.0
    return token


def bucket_for(batch: int) -> int:
    """The smallest bucket >= batch (beyond the largest bucket: the next multiple of it)."""
    for b in BUCKETS:
        if batch <= b:
            return b
    return math.ceil(batch / BUCKETS[-1]) * BUCKETS[-1]


class _State:
    """Every tensor a captured step reads or writes, allocated once per capacity (graphs hold their addresses)."""

    def __init__(self, models: tuple, batch: int, seq: int, steps: int, vocab: int, sleepable: bool = False):
        dev = models[0].embed.device
        self.batch, self.seq, self.steps = batch, seq, steps
        # sleepable: the KV caches live in memory whose pages `sleep` can release at fixed addresses (vmm)
        self.buffers = [SleepableBuffer(m.cache_bytes(batch, seq), dev) for m in models] if sleepable else []
        for m, buf in zip(models, self.buffers or [None] * len(models), strict=True):
            m.allocate(batch, seq, None if buf is None else buf.tensor)
        self.logits = [torch.zeros(batch, vocab, dtype=m.dtype, device=dev) for m in models]  # (B, V) each
        self.pos = [torch.zeros(batch, dtype=torch.long, device=dev) for _ in models]  # (B,) next cache slot
        self.finished = torch.zeros(batch, dtype=torch.bool, device=dev)  # (B,)
        self.step = torch.zeros((), dtype=torch.long, device=dev)  # () tokens generated so far
        self.seed = torch.zeros((), dtype=torch.long, device=dev)  # ()
        self.trace = torch.zeros(len(RECORD_FIELDS), batch, steps, dtype=torch.float32, device=dev)  # (F, B, T)
        self.tokens = torch.zeros(batch, steps, dtype=torch.long, device=dev)  # (B, T)
        # continuous batching (`slots`): each row's own request
        self.row_step = torch.zeros(batch, dtype=torch.long, device=dev)  # (B,) tokens the row's request has
        self.row_seed = torch.zeros(batch, dtype=torch.long, device=dev)  # (B,) the request's seed
        self.limit = torch.zeros(batch, dtype=torch.long, device=dev)  # (B,) the request's max_new_tokens


class FastDualEngine:
    """Static caches + CUDA graphs for two Qwen3 models sampling from q* in lockstep (see the module docstring).

    use_graphs: capture steps in CUDA graphs (default: on CUDA). check_every: steps between host checks for
    "all rows finished". diagnostics: compute the five per-token diagnostics (cheap: sums in the sampling pass).
    keep_graphs_on_sleep: put the KV caches in CUDA virtual memory (`vmm`) so that `sleep` releases their pages
    at fixed addresses and the graphs survive it (else `sleep` drops caches and graphs; `sleep_mode` says which)."""

    def __init__(
        self,
        policy: nn.Module,
        teacher: nn.Module,
        vocab_size: int,
        use_graphs: bool | None = None,
        check_every: int = 8,
        diagnostics: bool = True,
        keep_graphs_on_sleep: bool = False,
    ):
        self.device = next(policy.parameters()).device
        self.fused = fused_available(self.device)
        self.models = (StaticQwen3(policy, vocab_size, self.fused), StaticQwen3(teacher, vocab_size, self.fused))
        self.vocab_size, self.check_every, self.diagnostics = vocab_size, check_every, diagnostics
        self.use_graphs = self.device.type == "cuda" if use_graphs is None else use_graphs
        if self.use_graphs and not (self.device.type == "cuda" and self.fused):
            raise ValueError("use_graphs=True needs a CUDA device with Triton; pass use_graphs=False")
        self.state: _State | None = None
        self.graphs: dict[tuple[int, SamplerConfig, str], torch.cuda.CUDAGraph] = {}  # (bucket, config, mode)
        self.warmup_seconds: dict[tuple[int, SamplerConfig, str], float] = {}  # capture cost per graph key
        self._pool = torch.cuda.graph_pool_handle() if self.use_graphs else None
        self._stops: dict[SamplerConfig, Tensor] = {}
        self._asleep: tuple[int, int, int] | None = None  # the capacity to take back on `wake`
        vmm_reason = unavailable_reason(self.device) if self.use_graphs else "no CUDA graphs to keep"
        self.sleep_mode = "keep_graphs" if keep_graphs_on_sleep and vmm_reason is None else "drop"
        self.sleep_mode_reason = vmm_reason if keep_graphs_on_sleep and vmm_reason else None

    # ------------------------------------------------------------------------------------------------- public
    @torch.no_grad()
    def generate(
        self,
        policy_prompt_ids,
        teacher_prompt_ids,
        max_new_tokens: int,
        seed: int,
        config: SamplerConfig,
        mode: str = "dual",
    ):
        """Same contract as `DualSampler.generate` (inputs already validated there). mode "policy" / "greedy": the
        contract of `DualSampler.generate_policy_only` instead (config must ignore the teacher; teacher_prompt_ids
        unused)."""
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        B = len(policy_prompt_ids)
        bucket = bucket_for(B)
        prompts = (policy_prompt_ids, teacher_prompt_ids)[: 2 if mode == "dual" else 1]
        longest = max(len(p) for side in prompts for p in side)
        # 1) capacity (may reallocate, which drops the captured graphs)
        self.reserve(bucket, longest + max_new_tokens, max_new_tokens)
        step_fn = self._step_fn(bucket, config, mode)
        # 2) prefill the caches (the policy's alone in the policy-only modes), reset the per-call state
        self._reset(prompts, bucket, seed)
        # 3) decode: replay, with a host check every `check_every` steps
        steps = 0
        while steps < max_new_tokens:
            step_fn(steps)
            steps += 1
            if steps % self.check_every == 0 and bool(self.state.finished[:B].all()):
                break
        # 4) traces back to the host, cut at stop tokens
        return self._assemble(B, steps, config, mode)

    def reserve(self, batch: int, seq: int, steps: int) -> None:
        """Make room for `batch` rows of `seq` cache slots and `steps` trace columns; raises MemoryError early
        (naming the memory needed) when the caches cannot fit next to the models."""
        s = self.state
        if s is not None and s.buffers:  # keep_graphs sleep: map the caches back before anything runs
            self.wake()
        if s is not None and batch <= s.batch and seq <= s.seq and steps <= s.steps:
            return
        batch = max(batch, s.batch if s else 0)
        seq = max(math.ceil(seq / SEQ_ROUND) * SEQ_ROUND, s.seq if s else 0)
        steps = max(math.ceil(steps / STEP_ROUND) * STEP_ROUND, s.steps if s else 0)
        self._check_memory(batch, seq, steps)
        self.state, self.graphs = None, {}
        if self.use_graphs:  # the old graphs are gone: a fresh pool (reusing a released one trips the allocator)
            self._pool = torch.cuda.graph_pool_handle()
        self.state = _State(self.models, batch, seq, steps, self.vocab_size, self.sleep_mode == "keep_graphs")

    def sleep(self) -> int:
        """Free memory for the trainer's phase; `wake` (or any decode) takes the same capacity back. Returns the bytes
        freed. sleep_mode "drop": the whole static state (both KV caches, logits, traces) and the CUDA graphs with
        their pool; graphs are re-captured on first use after waking (`warmup_seconds` says what a capture costs).
        sleep_mode "keep_graphs": the KV caches' pages only; their addresses, the graphs and the small buffers stay."""
        st = self.state
        if st is None:
            return 0
        freed = sum(m.cache_bytes(st.batch, st.seq) for m in self.models)
        if st.buffers:  # keep_graphs: release the caches' pages only; graphs and the other buffers stay
            for buf in st.buffers:
                buf.sleep()
            return freed
        freed += sum(t.numel() * t.element_size() for t in (*st.logits, st.trace, st.tokens))
        self._asleep = (st.batch, st.seq, st.steps)
        self.state, self.graphs = None, {}
        for m in self.models:
            m.k_cache = m.v_cache = None
        if self.use_graphs:
            self._pool = torch.cuda.graph_pool_handle()
            torch.cuda.synchronize(self.device)
            torch.cuda.empty_cache()
        return freed

    def wake(self) -> None:
        """Take back what `sleep` freed (raises MemoryError, naming the sizes, if it no longer fits)."""
        if self.state is not None:
            for buf in self.state.buffers:
                buf.wake()
        elif self._asleep is not None:
            self.reserve(*self._asleep)
        self._asleep = None

    # ------------------------------------------------------------------------------------------ the step
    def _step(self, bucket: int, config: SamplerConfig, host_step: int | None = None, mode: str = "dual") -> None:
        st = self.state
        logits = [lg[:bucket] for lg in st.logits]  # (bucket, V) each
        models = self.models if mode == "dual" else self.models[:1]
        if mode != "dual":  # q* = pi_theta: the policy's logits stand in for the teacher's, which alpha = 0 ignores
            logits = [logits[0], logits[0]]
        # 1) one token per row from q*
        if self.fused:
            token, record = fused_config_sample(logits, st.step, st.seed, config, self.diagnostics)  # (b,), (F, b)
        else:
            token, record = reference_record(logits, config, host_step, self._generator)
        if mode == "greedy":
            token = greedy_record(logits[0], record)
        # 2) bookkeeping
        finished = st.finished[:bucket]
        token = torch.where(finished, torch.zeros_like(token), token)  # (bucket,)
        st.trace[:, :bucket].index_copy_(2, st.step.view(1), record.unsqueeze(-1))
        st.tokens[:bucket].index_copy_(1, st.step.view(1), token.unsqueeze(-1))
        if config.stop_token_ids:
            finished |= torch.isin(token, self._stop_ids(config))
        # 3) both models (the policy alone in the policy-only modes) read the token
        for model, pos, out in zip(models, st.pos, logits, strict=False):  # models: 1 or 2
            model.decode(token, pos[:bucket], out)
            pos[:bucket] += 1
        st.step += 1

    def _stop_ids(self, config: SamplerConfig) -> Tensor:
        """The stop ids on the device, made once per config outside any capture (a host copy can't be captured)."""
        if config not in self._stops:
            self._stops[config] = torch.tensor(config.stop_token_ids, dtype=torch.long, device=self.device)
        return self._stops[config]

    def _step_fn(self, bucket: int, config: SamplerConfig, mode: str = "dual"):
        """A callable(step) running one step: a CUDA graph replay (captured on first use) or an eager step."""
        if not self.use_graphs:
            return lambda step: self._step(bucket, config, step, mode)
        key = (bucket, config, mode)
        if key not in self.graphs:
            self.graphs[key] = self.capture(key, lambda: self._step(bucket, config, mode=mode))
        return lambda step: self.graphs[key].replay()

    def capture(self, key: tuple, step) -> torch.cuda.CUDAGraph:
        """Warm up step() (compiles kernels on first use) on dummy state, then capture one call of it. The per-call
        state is zeroed before and after (every row finished): callers set it up after capturing."""
        t0 = time.perf_counter()
        self._zero_state()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                step()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            step()
        torch.cuda.synchronize()
        self._zero_state()
        self.warmup_seconds[key] = time.perf_counter() - t0
        return graph

    def _zero_state(self) -> None:
        st = self.state
        for t in (*st.pos, *st.logits, st.step, st.row_step, st.row_seed, st.limit):
            t.zero_()
        st.finished.fill_(True)

    # ------------------------------------------------------------------------------------------- per call
    def _reset(self, prompts: tuple, bucket: int, seed: int) -> None:
        """Prefill each model in `prompts` ((policy,) or (policy, teacher) prompt lists) and reset the call state."""
        st, B = self.state, len(prompts[0])
        for model, side, pos, lg in zip(self.models, prompts, st.pos, st.logits, strict=False):  # prompts: 1 or 2
            pos[:B] = model.prefill(side, lg[:B])
            pos[B:bucket] = 0  # padding rows decode garbage from slot 0; they are never read
            lg[B:bucket] = 0
        st.finished[:B] = False
        st.finished[B:bucket] = True
        st.step.zero_()
        st.seed.fill_(seed)
        self._generator = torch.Generator(self.device).manual_seed(seed)

    def _assemble(self, B: int, steps: int, config: SamplerConfig, mode: str = "dual") -> DualSample:
        st = self.state
        tokens = st.tokens[:B, :steps].tolist()  # (B, T)
        rec = st.trace[:, :B, :steps].cpu()  # (F, B, T)
        models = (("policy", "nan_policy"), ("teacher", "nan_teacher"))[: 2 if mode == "dual" else 1]
        if mode != "dual":  # the teacher's rows were computed against the policy: not computed (NaN), as the reference
            rec[[_ROW[name] for name in TEACHER_FIELDS]] = float("nan")
        bad = [name for name, row in models if rec[_ROW[row]].any()]
        if bad:
            raise FloatingPointError(
                f"the {' and '.join(bad)} model produced NaN or infinite logits: {FIX_DTYPE}; the sample was discarded"
            )
        stop = set(config.stop_token_ids)
        ends = [next((t + 1 for t, tok in enumerate(row) if tok in stop), None) for row in tokens]
        lengths = [steps if e is None else e for e in ends]
        cut = lambda rows: [r[:n] for r, n in zip(rows, lengths, strict=True)]  # noqa: E731
        field = lambda name: cut(rec[_ROW[name]].tolist())  # noqa: E731
        diagnostics = {name: field(name) for name in DIAGNOSTIC_FIELDS} if self.diagnostics else {}
        return DualSample(
            token_ids=cut(tokens),
            **{name: field(name) for name in TRACE_FIELDS},
            forced=[[bool(x) for x in r] for r in field("forced")],
            support_size=[[int(x) for x in r] for r in field("support_size")],
            finish_reasons=["length" if e is None else "stop" for e in ends],
            diagnostics=diagnostics,
        )

    def _check_memory(self, batch: int, seq: int, steps: int) -> None:
        if self.device.type != "cuda":
            return
        cache = [m.cache_bytes(batch, seq) for m in self.models]
        need = sum(cache) + 2 * batch * self.vocab_size * 2 + len(RECORD_FIELDS) * batch * steps * 4
        held = self.state is not None and sum(m.cache_bytes(self.state.batch, self.state.seq) for m in self.models)
        free, total = torch.cuda.mem_get_info(self.device)
        cached = torch.cuda.memory_reserved(self.device) - torch.cuda.memory_allocated(self.device)
        margin = max(2 << 30, total // 20)  # prefill activations and the graphs' workspaces
        available = free + cached + int(held or 0) - margin
        if need > available:
            gib = 1 << 30
            per_token = sum(m.cache_bytes(1, 1) for m in self.models) / 1024
            raise MemoryError(
                f"batch {batch} x {seq} cache slots needs {need / gib:.1f} GiB for the KV caches and buffers "
                f"(policy {cache[0] / gib:.1f} GiB + teacher {cache[1] / gib:.1f} GiB; {per_token:.0f} KiB per token "
                f"of context) but only {available / gib:.1f} GiB are free on {torch.cuda.get_device_name(self.device)} "
                "next to the two models: lower the batch or the context, or give the teacher its own GPU"
            )
