"""`DualSamplerServer`: the Ray actor behind one `dual` rollout replica. It holds a copy of the policy (overwritten
by every weight sync) and the frozen teacher, batches concurrent `generate` requests into `DualSampler.generate`
calls, and answers each with verl's `TokenOutput`: `log_probs = log q*` (what verl's rollout correction divides
by) plus the per-token traces, `global_steps`, its replica rank and weight version in `extra_fields`.

Pipeline of one request:
1) `generate` checks the sampling parameters, decides whether the request needs the teacher, queues it and awaits
   its future;
2) `_drain` waits `batch_window_ms` for concurrent requests, then, in a worker thread (the event loop keeps
   accepting requests), serves the queued requests of the oldest request's kind: with the fast engine and
   `continuous_batching` they stream into `max_num_seqs` fixed slots (`engine.fast.scheduler`; requests arriving
   meanwhile take slots as they free up); otherwise up to `max_num_seqs` of them run as one `DualSampler.generate`
   (for policy-only requests `DualSampler.generate_policy_only`);
3) each row is cut to its own token budget and returned as a `TokenOutput`, with the forward tokens each model spent
   on it.

Policy-only requests (the teacher is not run): every request while the trainer holds the server in policy-only
validation (`set_policy_only_validation`, with `optimal_sampling.validate_policy_only`), every request when
`optimal_sampling.skip_unused_teacher` is on and the sampler config ignores the teacher (alpha fixed at 0, no
forcing, no support constraint), and requests sent with `policy_only=True` (the on-policy members of a mixed group,
`optimal_sampling.guided_per_prompt`, and those past the trainer's faded limit, `set_guided_limit`). With
`optimal_sampling.score_policy_samples`, policy-only training responses get the teacher's log pi_t(y_t) from one
teacher prefill over (teacher prompt + response) (`engine.scoring`), for the teacher critic of `guided_loss`.

Owns the models' residency (teacher always resident; `sleep` frees cached KV memory only), the weight-loading end of
the sync, and what it measures per phase of a step (`phases.PhaseLog`: logged at each transition and returned by
`phase_metrics` for the trainer's `optimal_sampling/server/*`). Knows nothing about trainers, datasets or prompts'
text: prompts arrive as token ids.
"""

import asyncio
import logging
import os
import threading
import time
from dataclasses import dataclass
from functools import partial

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from verl.utils.config import omega_conf_to_dataclass
from verl.workers.config import HFModelConfig
from verl.workers.rollout.replica import TokenOutput

from ..engine import DualSampler, SamplerConfig, stop_ids_for
from ..engine.fast import fast_path_reasons
from ..engine.policy_only import ignores_teacher, policy_only_config
from ..engine.scoring import teacher_logprobs
from .config import OptimalSamplingConfig
from .phases import PhaseLog, cuda_memory

logger = logging.getLogger(__name__)

TRACE_PREFIX = "dual_"  # extra_fields keys: dual_alpha, dual_logp_policy, ...
TRACE_KEYS = ("logp_policy", "logp_teacher", "alpha", "forced", "support_size")
DIAGNOSTIC_KEYS = ("kl_q_policy", "kl_q_teacher", "ess_policy", "ess_teacher", "entropy_q")
FORWARD_TOKEN_KEYS = {"policy": "dual_policy_forward_tokens", "teacher": "dual_teacher_forward_tokens"}  # extra_fields
GUIDED_KEY = "dual_guided"  # extra_fields: True when the response was sampled with the teacher (from q*)
FAST_ENGINE_KEY = "dual_fast_engine"  # extra_fields: 1 when the fast engine sampled the response, else 0
PHASE_PREFIX = "optimal_sampling/server/"  # trainer metrics of the server's phases (`phase_metrics`)
REPLICA_KEY = "dual_replica_rank"  # extra_fields: the replica whose server sampled the response
WEIGHT_VERSION_KEY = "dual_weight_version"  # extra_fields: global_steps of the server's last complete weight sync
SLOT_MARGIN = 128  # slot tokens beyond prompt_length + response_length: the teacher's chat template is longer
BACKEND_OF_ENGINE = {"auto": "auto", "fast": "cuda_graph", "reference": "reference"}  # optimal_sampling.engine


@dataclass
class _Request:
    policy_ids: list[int]
    teacher_ids: list[int]
    max_tokens: int
    future: asyncio.Future
    policy_only: bool = False  # sampled from pi_theta without running the teacher
    temperature: float = 1.0  # 0 = greedy (policy-only validation only)
    score: bool = False  # a policy-only response the teacher scores afterwards (score_policy_samples)

    @property
    def kind(self) -> tuple[bool, float]:
        """Requests of one kind share a decode."""
        return self.policy_only, self.temperature


class DualSamplerServer:
    """One policy copy + one frozen teacher on one device, serving token-in/token-out requests in batches."""

    def __init__(self, config, model_config, replica_rank: int = 0, cuda_visible_devices: str | None = None):
        # Ray leaves CUDA_VISIBLE_DEVICES to us (RAY_EXPERIMENTAL_NOSET_*): use the trainer worker's GPU.
        if cuda_visible_devices:
            os.environ["CUDA_VISIBLE_DEVICES"] = cuda_visible_devices
        self.config = omega_conf_to_dataclass(config)
        model_config = omega_conf_to_dataclass(model_config, dataclass_type=HFModelConfig)
        self.replica_rank = replica_rank
        self.os_config = OptimalSamplingConfig.from_engine_kwargs(self.config.engine_kwargs)
        on_gpu = bool(cuda_visible_devices) and torch.cuda.is_available()
        self.device = torch.device("cuda", 0) if on_gpu else torch.device("cpu")
        # bf16 on GPU as configured; float32 on CPU (bf16 matmuls there are slow and only serve tests)
        self.dtype = getattr(torch, self.config.dtype) if on_gpu else torch.float32
        self.phases = PhaseLog(partial(cuda_memory, self.device) if on_gpu else None)
        # 1) models and tokenizers (the policy starts from its checkpoint; the first sync overwrites it)
        policy_path = model_config.local_path
        teacher_path = self.os_config.teacher_path
        self._check_engine_before_loading(policy_path, teacher_path)
        self.policy = _load_model(policy_path, self.dtype, self.device)
        self.teacher = _load_model(teacher_path, self.dtype, self.device)
        tokenizer = AutoTokenizer.from_pretrained(model_config.local_tokenizer_path or policy_path)
        teacher_tokenizer = AutoTokenizer.from_pretrained(teacher_path)
        # 2) the sampler; DualSampler compares the two vocabularies and raises on a mismatch
        eos = stop_ids_for(SamplerConfig(), tokenizer, teacher_tokenizer)
        sampler_config = self.os_config.sampler_config(self.config.temperature, eos)
        self.sampler = DualSampler(
            self.policy,
            self.teacher,
            sampler_config,
            tokenizer=tokenizer,
            teacher_tokenizer=teacher_tokenizer,
            backend=BACKEND_OF_ENGINE[self.os_config.engine],
        )
        self.max_batch = int(self.config.max_num_seqs)
        self.fast_engine = self.sampler.backend == "cuda_graph"
        logger.warning(
            "dual server %d: %s engine (%s)", replica_rank, "fast" if self.fast_engine else "reference",
            self.sampler.backend_reason,
        )  # fmt: skip
        rollout = self.config  # a slot holds max_model_len tokens, else a prompt, a response and the teacher's template
        self.slot_len = int(rollout.max_model_len or rollout.prompt_length + rollout.response_length + SLOT_MARGIN)
        self.batcher = self._make_batcher() if self.fast_engine and self.os_config.continuous_batching else None
        self._pending_lock = threading.Lock()  # _pending is shared with the worker thread of a continuous serve
        self._seeds = 0
        # 3) when the teacher can be left out (see the module docstring)
        self.teacher_unused = self.os_config.skip_unused_teacher and ignores_teacher(sampler_config)
        self._policy_only_validation = False  # switched by the trainer around validation
        self._guided_limit: int | None = None  # guided members per group under the trainer's fade; None = no limit
        self.global_steps = 0
        self.weight_version = -1  # global_steps of the last complete weight sync; -1 = never synced (checkpoint)
        self._pending: list[_Request] = []
        self._drainer: asyncio.Task | None = None
        self._model_lock: asyncio.Lock | None = None  # created on the actor's event loop
        self._loaded: set[str] = set()
        self._batches = 0

    # ---- generation -------------------------------------------------------------------------------------------

    async def generate(
        self,
        prompt_ids: list[int],
        sampling_params: dict,
        request_id: str,
        image_data=None,
        video_data=None,
        teacher_prompt_ids: list[int] | None = None,
        policy_only: bool = False,
        group_index: int | None = None,
        **_,
    ) -> TokenOutput:
        """Sample one response from q*. `prompt_ids` is the policy prompt, `teacher_prompt_ids` the teacher's.
        `policy_only=True` (on-policy members of a mixed group) samples from pi_theta without running the teacher;
        `group_index` (the response's index in its group) is compared with the trainer's faded guided limit."""
        if image_data or video_data:
            raise ValueError("the dual backend is text-only: image_data/video_data are not supported")
        if teacher_prompt_ids is None:
            raise ValueError(
                f"request {request_id} has no teacher_prompt_ids: the dual backend needs the optimal_sampling_agent "
                "loop (actor_rollout_ref.rollout.agent.default_agent_loop), which sends the teacher's prompt"
            )
        validating = self._policy_only_validation
        _check_sampling_params(sampling_params, self.config.temperature, policy_only_validation=validating)
        max_tokens = int(sampling_params.get("max_tokens") or self.config.response_length)
        future = asyncio.get_running_loop().create_future()
        temperature = float(sampling_params.get("temperature", self.config.temperature))
        policy_only = validating or self.teacher_unused or bool(policy_only) or self._past_guided_limit(group_index)
        score = policy_only and not validating and self.os_config.score_policy_samples
        request = _Request(
            list(prompt_ids), list(teacher_prompt_ids), max_tokens, future, policy_only, temperature, score
        )
        if self.batcher is not None:  # too long for a slot: this request fails now, naming the sizes
            try:
                self.batcher.check([self._slot_request(request)], self._mode(request))
            except ValueError as e:
                raise ValueError(
                    f"{e} (a slot holds actor_rollout_ref.rollout.max_model_len tokens, default prompt_length + "
                    f"response_length + {SLOT_MARGIN}: raise max_model_len)"
                ) from None
        with self._pending_lock:
            self._pending.append(request)
        if self._drainer is None or self._drainer.done():
            self._drainer = asyncio.create_task(self._drain())
        return await future

    async def _drain(self) -> None:
        """Serve queued requests in batches (or streamed through the slots) until the queue is empty."""
        while self._pending:
            await asyncio.sleep(self.os_config.batch_window_ms / 1000)
            if self.batcher is not None:
                async with self._lock():
                    await asyncio.to_thread(self._serve_continuous, self._pending[0].kind, asyncio.get_running_loop())
                continue
            batch = self._take_batch()
            try:
                async with self._lock():
                    rows = await asyncio.to_thread(self._run_batch, batch)
            except Exception as e:  # every waiting request sees the error
                logger.exception("dual sampler batch failed")
                for request in batch:
                    request.future.set_exception(e)
                continue
            for i, request in enumerate(batch):
                request.future.set_result(self._token_output(rows[i], request))

    def _serve_continuous(self, kind: tuple, loop: asyncio.AbstractEventLoop) -> None:
        """(worker thread) Stream the queued requests of `kind`, and those arriving meanwhile, through the slots;
        each future gets its TokenOutput, or the error if the engine fails."""
        taken: dict[int, _Request] = {}  # pulled, not yet answered

        def pull(n: int) -> list:
            batch = self._take_batch(kind, n)
            taken.update((id(r), r) for r in batch)
            return [self._slot_request(r, self._next_seed()) for r in batch]

        delivered = [0, 0]  # requests, tokens

        def deliver(slot_request, row: dict) -> None:
            request = taken.pop(id(slot_request.tag))
            try:
                result, error = self._token_output(self._score_rows([request], [row])[0], request), None
                delivered[0], delivered[1] = delivered[0] + 1, delivered[1] + len(result.token_ids)
            except Exception as e:  # this request sees it; the others go on
                result, error = None, e
            loop.call_soon_threadsafe(_resolve, request.future, result, error)

        self._batches += 1
        t0 = time.perf_counter()
        try:
            self.batcher.serve(pull, deliver, self._config(kind), self._mode(kind))
        except Exception as e:  # every request in flight sees the error; queued ones get the next serve
            logger.exception("dual sampler serve failed")
            for request in taken.values():
                loop.call_soon_threadsafe(_resolve, request.future, None, e)
        self.phases.count(time.perf_counter() - t0, *delivered)

    def _make_batcher(self):
        """The continuous batcher, its slots allocated now: a capacity that cannot fit fails at start-up."""
        batcher = self.sampler.continuous(self.max_batch, self.slot_len)
        try:
            batcher.reserve()
        except MemoryError as e:
            raise MemoryError(
                f"{e} (the slots are actor_rollout_ref.rollout.max_num_seqs={self.max_batch} x max_model_len="
                f"{self.slot_len} tokens: lower max_num_seqs or max_model_len / prompt_length + response_length)"
            ) from None
        return batcher

    def _slot_request(self, request: _Request, seed: int = 0):
        from ..engine.fast.scheduler import Request

        teacher_ids = None if request.policy_only else request.teacher_ids
        return Request(request.policy_ids, teacher_ids, request.max_tokens, seed, tag=request)

    def _next_seed(self) -> int:
        from ..engine.fast.scheduler import request_seed

        self._seeds += 1
        return request_seed(int(self.config.seed) * 1_000_003 + self.replica_rank * 10_007, self._seeds)

    def _mode(self, kind: tuple | _Request) -> str:
        policy_only, temperature = kind.kind if isinstance(kind, _Request) else kind
        return "dual" if not policy_only else "policy" if temperature > 0 else "greedy"

    def _config(self, kind: tuple) -> SamplerConfig:
        policy_only, temperature = kind
        stops = self.sampler.config.stop_token_ids
        return policy_only_config(temperature, stops) if policy_only else self.sampler.config

    def _check_engine_before_loading(self, policy_path: str, teacher_path: str | None) -> None:
        """engine=fast where the fast engine cannot run: fail before loading any weights, naming why."""
        if self.os_config.engine != "fast" or teacher_path is None:
            return
        from transformers import AutoConfig

        reasons = fast_path_reasons(
            self.device, AutoConfig.from_pretrained(policy_path), AutoConfig.from_pretrained(teacher_path)
        )
        if reasons:
            raise ValueError(
                f"actor_rollout_ref.rollout.engine_kwargs.optimal_sampling.engine=fast but the fast engine cannot run "
                f"here: {'; '.join(reasons)}. Use engine=auto (the reference path, slower) or models and a device it "
                "supports"
            )

    def _take_batch(self, kind: tuple | None = None, n: int | None = None) -> list[_Request]:
        """Up to n (default `max_num_seqs`) queued requests of `kind` (default: the oldest request's), in arrival
        order."""
        with self._pending_lock:
            kind = self._pending[0].kind if kind is None else kind
            batch = [r for r in self._pending if r.kind == kind][: self.max_batch if n is None else n]
            taken = {id(r) for r in batch}
            self._pending = [r for r in self._pending if id(r) not in taken]
        return batch

    def _run_batch(self, batch: list[_Request]) -> list[dict]:
        """One static batch; its rows (`DualSample.row`), teacher-scored where asked."""
        self._batches += 1
        t0 = time.perf_counter()
        seed = int(self.config.seed) * 1_000_003 + self.replica_rank * 10_007 + self._batches
        policy_ids, max_new_tokens = [r.policy_ids for r in batch], max(r.max_tokens for r in batch)
        if batch[0].policy_only:
            sample = self.sampler.generate_policy_only(policy_ids, max_new_tokens, seed, batch[0].temperature)
        else:
            sample = self.sampler.generate(policy_ids, [r.teacher_ids for r in batch], max_new_tokens, seed=seed)
        rows = self._score_rows(batch, [sample.row(i) for i in range(len(batch))])
        tokens = sum(min(len(row["token_ids"]), r.max_tokens) for row, r in zip(rows, batch, strict=True))
        self.phases.count(time.perf_counter() - t0, len(batch), tokens)
        return rows

    def _token_output(self, row: dict, request: _Request) -> TokenOutput:
        """One response (`DualSample.row`) cut to the request's token budget."""
        n = min(len(row["token_ids"]), request.max_tokens)
        traces = {TRACE_PREFIX + k: [float(x) for x in row[k][:n]] for k in TRACE_KEYS}
        traces.update({TRACE_PREFIX + k: row[k][:n] for k in DIAGNOSTIC_KEYS})
        # forward tokens: the prompt's positions (prefill) plus the n - 1 response tokens fed back in decode
        teacher_ran = not request.policy_only or request.score  # decoded with q*, or scored by a prefill
        forward = {
            FORWARD_TOKEN_KEYS["policy"]: len(request.policy_ids) + n - 1,
            FORWARD_TOKEN_KEYS["teacher"]: len(request.teacher_ids) + n - 1 if teacher_ran else 0,
        }
        return TokenOutput(
            token_ids=row["token_ids"][:n],
            log_probs=row["logp_q"][:n],
            stop_reason="completed",
            extra_fields={
                "global_steps": self.global_steps,
                **traces,
                **forward,
                GUIDED_KEY: not request.policy_only,
                FAST_ENGINE_KEY: int(self.fast_engine),
                REPLICA_KEY: self.replica_rank,
                WEIGHT_VERSION_KEY: self.weight_version,
            },
        )

    def _lock(self) -> asyncio.Lock:
        if self._model_lock is None:
            self._model_lock = asyncio.Lock()
        return self._model_lock

    # ---- teacher scoring of policy-only responses and the guidance fade (guided_loss) -------------------------------

    def _score_rows(self, requests: list[_Request], rows: list[dict]) -> list[dict]:
        """Fill log pi_t(y_t) of the rows whose request asks for it (`DualSample.row` dicts; static batches pass a
        batch, continuous batching one row as it finishes), with one teacher prefill over (teacher prompt +
        response cut to the request's budget): prefill, not decode. The other rows keep NaN."""
        wanted = [i for i, r in enumerate(requests) if r.score]
        if not wanted:
            return rows
        prompts = [requests[i].teacher_ids for i in wanted]
        responses = [rows[i]["token_ids"][: requests[i].max_tokens] for i in wanted]
        scores = teacher_logprobs(self.teacher, prompts, responses, self.config.temperature, self.sampler.vocab_size)
        rows = list(rows)
        for i, row in zip(wanted, scores, strict=True):
            rows[i] = {**rows[i], "logp_teacher": list(row) + list(rows[i]["logp_teacher"][len(row) :])}
        return rows

    async def set_guided_limit(self, limit: int | None) -> None:
        """Responses whose index in their group is >= `limit` are sampled from the policy alone (the trainer's
        guidance fade, `guided_loss.fade_*`); None lifts the limit."""
        self._guided_limit = None if limit is None else int(limit)

    def _past_guided_limit(self, group_index: int | None) -> bool:
        return self._guided_limit is not None and group_index is not None and int(group_index) >= self._guided_limit

    # ---- weight sync (called by DualServerAdapter) -------------------------------------------------------------

    async def update_weights_bucket(self, named_tensors: list[tuple[str, torch.Tensor]]) -> None:
        """Copy a bucket of full HF-named policy tensors into the policy copy (dtype and device converted)."""
        async with self._lock():
            targets = self.policy.state_dict(keep_vars=True)  # tied lm_head.weight and embed share one tensor
            unknown = [name for name, _ in named_tensors if name not in targets]
            if unknown:
                raise KeyError(f"weight sync sent tensors the server's policy does not have: {unknown[:8]}")
            with torch.no_grad():
                for name, tensor in named_tensors:
                    target = targets[name]
                    assert target.shape == tensor.shape, f"{name}: {target.shape=} {tensor.shape=}"
                    target.copy_(tensor.to(device=target.device, dtype=target.dtype))
                    self._loaded.add(name)

    async def finish_weight_update(self, global_steps: int | None = None) -> int:
        """Check that every policy parameter was received, then start serving the new version."""
        expected = {name for name, _ in self.policy.named_parameters()}  # a tied lm_head appears once
        missing = sorted(expected - self._loaded)
        self._loaded = set()
        if missing:
            raise KeyError(f"weight sync did not send {len(missing)} policy parameters, e.g. {missing[:8]}")
        if global_steps is not None:
            self.global_steps = int(global_steps)
        self.weight_version = self.global_steps
        async with self._lock():
            self._enter_phase("rollout")
        return self.global_steps

    async def set_global_steps(self, global_steps: int) -> None:
        self.global_steps = int(global_steps)

    async def get_global_steps(self) -> int:
        return self.global_steps

    async def set_policy_only_validation(self, on: bool) -> None:
        """While on, every request is sampled from the policy alone (the trainer's validation; sync training never
        overlaps it with rollout requests)."""
        self._policy_only_validation = bool(on)

    # ---- memory and control (RolloutReplica calls these on every server) ------------------------------------------

    async def wake_up(self, tags: list[str] | None = None) -> None:
        """Take back the fast engine's KV caches and buffers (weights never leave the device: the teacher is frozen
        and the policy copy is overwritten in place)."""
        async with self._lock():
            if self.phases.phase in ("train", "start"):  # the first wake of a weight sync (verl wakes twice)
                self._enter_phase("sync")
            self.sampler.wake()

    async def sleep(self) -> None:
        """Free the fast engine's KV caches, buffers and graphs and cached memory for the trainer; both models stay
        resident."""
        async with self._lock():
            self._enter_phase("train")  # the rollout's numbers are taken before anything is freed
            freed = self.sampler.sleep()
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
                logger.info("dual server %d asleep: %.2f GiB of engine state freed", self.replica_rank, freed / 2**30)

    def _enter_phase(self, phase: str) -> None:
        """(under the model lock: no graph is being captured) End the current phase; log what it measured."""
        line = self.phases.enter(phase)
        if line:
            logger.warning("dual server %d step %d: %s", self.replica_rank, self.global_steps, line)

    async def phase_metrics(self) -> dict[str, float]:
        """The last completed sync, rollout and train phases' numbers (`phases.PhaseLog`), as trainer metrics."""
        return self.phases.metrics(PHASE_PREFIX)

    async def clear_kv_cache(self) -> None:
        await self.sleep()

    async def release_kv_cache(self) -> None:
        await self.sleep()

    async def resume_kv_cache(self) -> None:
        await self.wake_up()

    async def abort_all_requests(self, reject_request: bool = False) -> dict:
        """Sync training never aborts; requests already queued finish normally."""
        return {"aborted_count": 0, "request_ids": []}

    async def resume_generation(self) -> None:
        pass

    async def start_profile(self, **kwargs) -> None:
        pass

    async def stop_profile(self) -> None:
        pass

    async def ping(self) -> str:
        return f"dual server {self.replica_rank} on {self.device}"


def _resolve(future: asyncio.Future, result, error: Exception | None) -> None:
    """(event loop) Answer a request unless its caller has gone."""
    if not future.done():
        future.set_exception(error) if error is not None else future.set_result(result)


def _load_model(path: str, dtype: torch.dtype, device: torch.device):
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation="sdpa")
    return model.to(device).eval().requires_grad_(False)


def _check_sampling_params(params: dict, temperature: float, policy_only_validation: bool = False) -> None:
    """Sampling parameters that the dual sampler cannot honour without making log q* wrong are errors. Policy-only
    validation takes any temperature >= 0 (0 = greedy)."""
    requested = float(params.get("temperature", temperature))
    if policy_only_validation and requested < 0:
        raise ValueError(f"request temperature={requested}: policy-only validation needs a temperature >= 0")
    if not policy_only_validation and requested != temperature:
        raise ValueError(
            f"request temperature={params.get('temperature')} but the dual server samples at {temperature}: "
            "greedy/tempered requests are served only in policy-only validation (optimal_sampling."
            "validate_policy_only=true); otherwise keep rollout.val_kwargs.temperature=1.0"
        )
    if float(params.get("top_p", 1.0)) != 1.0 or int(params.get("top_k", -1)) not in (-1, 0):
        raise ValueError(f"top_p/top_k are not supported by the dual server (got {params}); use teacher_top_p")
