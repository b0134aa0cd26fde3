"""`DualSamplerServer`: the Ray actor behind one `dual` rollout replica. It holds a copy of the policy (overwritten
by every weight sync) and the frozen teacher, batches concurrent `generate` requests into `DualSampler.generate`
calls, and answers each with verl's `TokenOutput`: `log_probs = log q*` (what verl's rollout correction divides
by) plus the per-token traces and `global_steps` in `extra_fields`.

Pipeline of one request:
1) `generate` checks the sampling parameters, decides whether the request needs the teacher, queues it and awaits
   its future;
2) `_drain` waits `batch_window_ms` for concurrent requests, takes up to `max_num_seqs` of them of one kind and runs
   one `DualSampler.generate` (for policy-only requests `DualSampler.generate_policy_only`) in a worker thread (the
   event loop keeps accepting requests);
3) each row is cut to its own token budget and returned as a `TokenOutput`, with the forward tokens each model spent
   on it.

Policy-only requests (the teacher is not run): every request while the trainer holds the server in policy-only
validation (`set_policy_only_validation`, with `optimal_sampling.validate_policy_only`), every request when
`optimal_sampling.skip_unused_teacher` is on and the sampler config ignores the teacher (alpha fixed at 0, no
forcing, no support constraint), and requests sent with `policy_only=True` (the on-policy members of a mixed group,
`optimal_sampling.guided_per_prompt`, and those past the trainer's faded limit, `set_guided_limit`). With
`optimal_sampling.score_policy_samples`, policy-only training responses get the teacher's log pi_t(y_t) from one
teacher prefill over (teacher prompt + response) (`engine.scoring`), for the teacher critic of `guided_loss`.

Owns the models' residency (teacher always resident; `sleep` frees cached KV memory only) and the weight-loading
end of the sync. Knows nothing about trainers, datasets or prompts' text: prompts arrive as token ids.
"""

import asyncio
import logging
import os
from dataclasses import dataclass

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from verl.utils.config import omega_conf_to_dataclass
from verl.workers.config import HFModelConfig
from verl.workers.rollout.replica import TokenOutput

from ..engine import DualSample, DualSampler, SamplerConfig, stop_ids_for
from ..engine.policy_only import ignores_teacher
from ..engine.scoring import teacher_logprobs
from .config import OptimalSamplingConfig

logger = logging.getLogger(__name__)

TRACE_PREFIX = "dual_"  # extra_fields keys: dual_alpha, dual_logp_policy, ...
TRACE_KEYS = ("logp_policy", "logp_teacher", "alpha", "forced", "support_size")
DIAGNOSTIC_KEYS = ("kl_q_policy", "kl_q_teacher", "ess_policy", "ess_teacher", "entropy_q")
FORWARD_TOKEN_KEYS = {"policy": "dual_policy_forward_tokens", "teacher": "dual_teacher_forward_tokens"}  # extra_fields
GUIDED_KEY = "dual_guided"  # extra_fields: True when the response was sampled with the teacher (from q*)


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
        # 1) models and tokenizers (the policy starts from its checkpoint; the first sync overwrites it)
        policy_path = model_config.local_path
        teacher_path = self.os_config.teacher_path
        self.policy = _load_model(policy_path, self.dtype, self.device)
        self.teacher = _load_model(teacher_path, self.dtype, self.device)
        tokenizer = AutoTokenizer.from_pretrained(model_config.local_tokenizer_path or policy_path)
        teacher_tokenizer = AutoTokenizer.from_pretrained(teacher_path)
        # 2) the sampler; DualSampler compares the two vocabularies and raises on a mismatch
        eos = stop_ids_for(SamplerConfig(), tokenizer, teacher_tokenizer)
        sampler_config = self.os_config.sampler_config(self.config.temperature, eos)
        self.sampler = DualSampler(
            self.policy, self.teacher, sampler_config, tokenizer=tokenizer, teacher_tokenizer=teacher_tokenizer
        )
        self.max_batch = int(self.config.max_num_seqs)
        # 3) when the teacher can be left out (see the module docstring)
        self.teacher_unused = self.os_config.skip_unused_teacher and ignores_teacher(sampler_config)
        self._policy_only_validation = False  # switched by the trainer around validation
        self._guided_limit: int | None = None  # guided members per group under the trainer's fade; None = no limit
        self.global_steps = 0
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
        self._pending.append(
            _Request(list(prompt_ids), list(teacher_prompt_ids), max_tokens, future, policy_only, temperature, score)
        )
        if self._drainer is None or self._drainer.done():
            self._drainer = asyncio.create_task(self._drain())
        return await future

    async def _drain(self) -> None:
        """Serve queued requests in batches until the queue is empty."""
        while self._pending:
            await asyncio.sleep(self.os_config.batch_window_ms / 1000)
            batch = self._take_batch()
            try:
                async with self._lock():
                    sample = await asyncio.to_thread(self._run_batch, batch)
            except Exception as e:  # every waiting request sees the error
                logger.exception("dual sampler batch failed")
                for request in batch:
                    request.future.set_exception(e)
                continue
            for i, request in enumerate(batch):
                request.future.set_result(self._token_output(sample, i, request))

    def _take_batch(self) -> list[_Request]:
        """Up to `max_num_seqs` queued requests of the oldest request's kind, in arrival order."""
        kind = self._pending[0].kind
        batch = [r for r in self._pending if r.kind == kind][: self.max_batch]
        taken = {id(r) for r in batch}
        self._pending = [r for r in self._pending if id(r) not in taken]
        return batch

    def _run_batch(self, batch: list[_Request]) -> DualSample:
        self._batches += 1
        seed = int(self.config.seed) * 1_000_003 + self.replica_rank * 10_007 + self._batches
        policy_ids, max_new_tokens = [r.policy_ids for r in batch], max(r.max_tokens for r in batch)
        if batch[0].policy_only:
            sample = self.sampler.generate_policy_only(policy_ids, max_new_tokens, seed, batch[0].temperature)
            return self._score_with_teacher(batch, sample)
        return self.sampler.generate(policy_ids, [r.teacher_ids for r in batch], max_new_tokens, seed=seed)

    def _token_output(self, sample: DualSample, i: int, request: _Request) -> TokenOutput:
        n = min(len(sample.token_ids[i]), request.max_tokens)
        traces = {TRACE_PREFIX + k: [float(x) for x in getattr(sample, k)[i][:n]] for k in TRACE_KEYS}
        traces.update({TRACE_PREFIX + k: sample.diagnostics[k][i][:n] for k in DIAGNOSTIC_KEYS})
        # forward tokens: the prompt's positions (prefill) plus the n - 1 response tokens fed back in decode
        teacher_ran = not request.policy_only or request.score  # decoded with q*, or scored by a prefill
        forward = {
            FORWARD_TOKEN_KEYS["policy"]: len(request.policy_ids) + n - 1,
            FORWARD_TOKEN_KEYS["teacher"]: len(request.teacher_ids) + n - 1 if teacher_ran else 0,
        }
        return TokenOutput(
            token_ids=sample.token_ids[i][:n],
            log_probs=sample.logp_q[i][:n],
            stop_reason="completed",
            extra_fields={"global_steps": self.global_steps, **traces, **forward, GUIDED_KEY: not request.policy_only},
        )

    def _lock(self) -> asyncio.Lock:
        if self._model_lock is None:
            self._model_lock = asyncio.Lock()
        return self._model_lock

    # ---- teacher scoring of policy-only responses and the guidance fade (guided_loss) -------------------------------

    def _score_with_teacher(self, batch: list[_Request], sample: DualSample) -> DualSample:
        """Fill log pi_t(y_t) of the rows whose request asks for it, with one teacher prefill over (teacher prompt +
        response cut to the request's budget); teacher forward tokens: the prompt plus the n - 1 response tokens fed
        (prefill, not decode). The other rows keep NaN."""
        rows = [i for i, r in enumerate(batch) if r.score]
        if not rows:
            return sample
        responses = [sample.token_ids[i][: batch[i].max_tokens] for i in rows]
        prompts = [batch[i].teacher_ids for i in rows]
        scores = teacher_logprobs(self.teacher, prompts, responses, self.config.temperature, self.sampler.vocab_size)
        for i, row in zip(rows, scores, strict=True):
            sample.logp_teacher[i] = row + sample.logp_teacher[i][len(row) :]
        return sample

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
        """Weights never leave the device (the teacher is frozen and the policy copy is overwritten in place)."""

    async def sleep(self) -> None:
        """Free cached KV memory for the trainer; both models stay resident."""
        async with self._lock():
            if self.device.type == "cuda":
                torch.cuda.empty_cache()

    async def clear_kv_cache(self) -> None:
        await self.sleep()

    async def release_kv_cache(self) -> None:
        await self.sleep()

    async def resume_kv_cache(self) -> None:
        """KV caches are allocated per batch; nothing to restore."""

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
